"""`kws bench ...`: speed and memory measured on the machine it runs on (medians over repeats).

- `kws bench stream`: the live path (Detector) with one thread at 10, 32 and 100 ms chunks
  against re-running the model on a 1-s window every 100 ms (the faster of the stream engine
  and, where torch is installed, PyTorch's forward), the state size, and the peak resident
  memory of `kws listen --input FILE --fast`.
- `kws bench live`: a file played in real time through the microphone's path (a reader thread,
  the block queue, the Worker) and the real-time factor the Worker measures, beside the bench's
  for the same audio and a Detector's that sleeps the block's length before each block.
- `kws bench model` (needs torch): per preset, training time per clip and inference time per
  second of audio, offline (a whole clip at once) and streaming in 32-ms chunks.

Other modules add their own benchmarks: each module named in BENCH_MODULES has a
`register(bench_subparsers)` like kws.cli's command modules.
"""

import importlib
import json
import math
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf
from threadpoolctl import threadpool_info, threadpool_limits

from kws.audio import MAX_RATE, MIN_RATE, SAMPLE_RATE, resample
from kws.errors import KwsError
from kws.labels import LABELS
from kws.runtime import StreamEngine
from kws.stream import Detector

BENCH_MODULES: tuple[str, ...] = ("app.bench", "app.hardening")
STREAM_CHUNKS_MS = (10, 32, 100)
SLIDING_WINDOW_S = 1.0
SLIDING_HOP_S = 0.1


def bench_audio(seconds: float, seed: int = 0) -> np.ndarray:
    """Seeded noise with tone bursts: compute does not depend on content, but keep it audio-like."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    audio = 0.01 * rng.standard_normal(n)
    for start in rng.uniform(0, max(seconds - 0.5, 0.0), size=max(1, int(seconds / 2))):
        on = (t >= start) & (t < start + 0.4)
        audio[on] += 0.2 * np.sin(2 * np.pi * rng.uniform(200, 3000) * t[on])
    return audio.astype(np.float32)


def n_runs(n: int) -> str:
    return f"{n} run" if n == 1 else f"{n} runs"


def median_seconds(run, repeats: int) -> float:
    return interleaved_median_seconds({"run": run}, repeats)["run"]


def interleaved_median_seconds(runs: dict, repeats: int, cpu: dict | None = None) -> dict:
    """{name: median seconds} of each run, timed round-robin so that a drift in the machine's
    speed touches every run alike and their ratios stay fair. `cpu`, when given, receives the
    median CPU seconds of this process for each run: other jobs on a shared machine change them
    far less than the wall-clock times."""
    for run in runs.values():
        run()  # warm-up: first calls allocate and pick kernels
    times = {name: [] for name in runs}
    cpu_times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run()
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)
    if cpu is not None:
        cpu.update((name, statistics.median(t)) for name, t in cpu_times.items())
    return {name: statistics.median(t) for name, t in times.items()}


def machine() -> dict:
    """The CPU, and the thread count of the BLAS NumPy calls (and of torch, where loaded)."""
    blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    found = {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
             "numpy": np.__version__, "threads": max(blas, default=1)}
    torch = sys.modules.get("torch")
    if torch is not None:
        found.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    return found


def reference_model(path):
    """The PyTorch model the engine at `path` was exported from, for side-by-side timings:
    `path` itself when it is a checkpoint, the shipped checkpoint for the shipped model; None
    when torch is not installed or there is no checkpoint."""
    from kws import default_checkpoint_path
    from kws.cli import load

    try:
        import torch
    except ImportError:
        return None
    if path is None or str(path).endswith(".pt"):
        checkpoint = Path(path) if path else default_checkpoint_path()
        if checkpoint.is_file():
            torch.set_num_threads(1)
            return load(checkpoint)
    return None


# ----------------------------------------------------------------------------- bench stream

def streaming_run(engine, audio: np.ndarray, chunk: int):
    """The live path: a fresh Detector fed `audio` in blocks of `chunk` samples."""
    def run():
        detector = Detector(engine)
        for start in range(0, len(audio), chunk):
            detector.process(audio[start:start + chunk])
    return run


def torch_stream_run(model, audio: np.ndarray, chunk: int):
    """`model.stream` itself (PyTorch), the reference the stream engine is tested against."""
    import torch

    def run():
        state = model.primed_state(1)
        with torch.inference_mode():
            for start in range(0, len(audio), chunk):
                _, state = model.stream(torch.from_numpy(audio[start:start + chunk])[None], state)
    return run


def sliding_window_runs(engine, model, audio: np.ndarray) -> tuple[dict, float]:
    """({way: run}, audio seconds covered) for the model re-run on a 1-s window every 100 ms,
    each window read out as in training (softmax of the mean of its per-step logits), two
    ways: the stream engine on each window from a stream's start state, and the PyTorch
    model's whole-sequence `forward` (when `model` is not None). The faster one is the fair
    baseline."""
    window, hop = int(SLIDING_WINDOW_S * SAMPLE_RATE), int(SLIDING_HOP_S * SAMPLE_RATE)
    starts = range(0, len(audio) - window + 1, hop)

    def forward():
        import torch

        with torch.inference_mode():
            for s in starts:
                torch.softmax(model(torch.from_numpy(audio[s:s + window])[None]).mean(1), -1)

    def on_engine():
        for s in starts:
            mean = engine.stream(audio[s:s + window], engine.start_state())[0].mean(0)
            e = np.exp(mean - mean.max())
            e / e.sum()
    runs = {"engine": on_engine} if model is None else {"forward": forward, "engine": on_engine}
    return runs, len(starts) * SLIDING_HOP_S


# The child reports its own peak (VmHWM): ru_maxrss from wait4 would not do, as Linux carries
# it across exec, so a child of this process (torch loaded) would report this process's peak.
_REPORT_PEAK = """import atexit, runpy, sys
def report():
    peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    sys.stderr.write("kws-peak-rss-kb " + peak.split()[1] + "\\n")
atexit.register(report)
sys.argv[0] = "kws"
runpy.run_module("kws.cli", run_name="__main__")
"""


def peak_rss_bytes(argv: list[str]) -> int:
    """Peak resident memory of `kws argv` run in a child process."""
    proc = subprocess.run([sys.executable, "-c", _REPORT_PEAK, *argv], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise KwsError(f"kws {' '.join(argv)} failed: {proc.stderr[-500:]}")
    return int(proc.stderr.rsplit("kws-peak-rss-kb ", 1)[1].split()[0]) * 1024


def bench_stream(args) -> int:
    from kws import default_model_path
    from kws.cli import load_engine

    if args.seconds < SLIDING_WINDOW_S:
        raise KwsError(f"--seconds must be at least the {SLIDING_WINDOW_S:g}-s sliding window")
    with threadpool_limits(1, user_api="blas"):
        return _bench_stream(args, load_engine(args.model), reference_model(args.model),
                             str(args.model or default_model_path()))


def _bench_stream(args, engine, model, model_path: str) -> int:
    audio = bench_audio(args.seconds)
    result = {"machine": machine(), "audio_seconds": args.seconds, "repeats": args.repeats}
    runs = {f"rtf_{ms}ms": streaming_run(engine, audio, int(SAMPLE_RATE * ms / 1000))
            for ms in STREAM_CHUNKS_MS}
    if model is not None:
        runs["rtf_32ms_torch_stream"] = torch_stream_run(model, audio, int(SAMPLE_RATE * 0.032))
    windows, covered = sliding_window_runs(engine, model, audio)
    runs.update((f"rtf_sliding_window_{way}", run) for way, run in windows.items())
    cpu = {}
    seconds = interleaved_median_seconds(runs, args.repeats, cpu)
    for name, t in seconds.items():
        result[name] = t / (covered if name.startswith("rtf_sliding") else args.seconds)
    for ms in STREAM_CHUNKS_MS:
        result[f"cpu_rtf_{ms}ms"] = cpu[f"rtf_{ms}ms"] / args.seconds
    result["rtf_sliding_window"] = min(result[f"rtf_sliding_window_{way}"] for way in windows)
    # Same 100-ms update rate on both sides; the 32-ms figure updates three times as often.
    result["sliding_window_ratio"] = result["rtf_sliding_window"] / result["rtf_100ms"]
    result["sliding_window_ratio_32ms"] = result["rtf_sliding_window"] / result["rtf_32ms"]
    result["state_bytes"] = engine.state_bytes
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "bench.wav"
        sf.write(wav, bench_audio(args.rss_seconds, seed=1), SAMPLE_RATE)
        result["peak_rss_bytes"] = peak_rss_bytes(
            ["listen", "--model", model_path, "--input", str(wav), "--fast"])
        result["peak_rss_model_loaded_bytes"] = peak_rss_bytes(["info", "--model", model_path])
        result["rss_audio_seconds"] = args.rss_seconds
    if args.json:
        print(json.dumps(result))
        return 0
    m = result["machine"]
    print(f"one thread of {m['cpu']} ({m['cpus']} CPUs), numpy {m['numpy']}, "
          f"{args.seconds:g} s of audio, median of {n_runs(args.repeats)} timed round-robin")
    for ms in STREAM_CHUNKS_MS:
        print(f"streaming, {ms:>3} ms chunks: real-time factor {result[f'rtf_{ms}ms']:.4f} "
              f"(in CPU time {result[f'cpu_rtf_{ms}ms']:.4f})")
    if model is not None:
        print(f"PyTorch model.stream, 32 ms: real-time factor {result['rtf_32ms_torch_stream']:.4f} "
              f"(the stream engine is {result['rtf_32ms_torch_stream'] / result['rtf_32ms']:.1f}x faster)")
    ways = ", ".join(f"{way} {result[f'rtf_sliding_window_{way}']:.4f}" for way in windows)
    print(f"1-s window every 100 ms:   real-time factor {result['rtf_sliding_window']:.4f} ({ways})")
    print(f"sliding window / streaming: {result['sliding_window_ratio']:.1f}x at the same "
          f"100-ms rate, {result['sliding_window_ratio_32ms']:.1f}x against 32-ms chunks")
    print(f"state: {result['state_bytes']:,} bytes")
    print(f"peak RSS of kws listen --input ({args.rss_seconds:g} s) --fast: "
          f"{result['peak_rss_bytes'] / 2**20:.1f} MiB (kws info alone: "
          f"{result['peak_rss_model_loaded_bytes'] / 2**20:.1f} MiB)")
    return 0


# ----------------------------------------------------------------------------- bench live

def play_through_worker(engine, path: str, chunk_s: float, fast: bool = False) -> tuple[float, float, float]:
    """(audio seconds, Worker compute seconds, and in CPU time) of `path` played as `kws listen
    --input` plays it (in real time unless `fast`): reader thread, block queue, resampler, Detector."""
    from kws.listen import QUEUE_SECONDS, Worker, play_file

    blocks = queue.Queue(maxsize=max(2, math.ceil(QUEUE_SECONDS / chunk_s)))
    detector, stop = Detector(engine), threading.Event()
    worker = Worker(detector, sf.info(path).samplerate, blocks, lambda found: None)
    threads = [threading.Thread(target=worker.run, name="kws-detector", daemon=True),
               threading.Thread(target=play_file, name="kws-file", daemon=True,
                                args=(path, chunk_s, fast, blocks, stop))]
    for thread in threads:
        thread.start()
    worker.finished.wait()
    for thread in threads:
        thread.join()
    if worker.error is not None:
        raise worker.error
    if worker.source_error is not None:
        raise worker.source_error
    return detector.time_s, worker.compute_seconds, worker.compute_cpu_seconds


def paced_run(engine, audio: np.ndarray, chunk: int, period_s: float,
              spin: bool = False) -> tuple[float, float]:
    """(seconds, CPU seconds) a Detector spends on `audio` fed in blocks of `chunk` samples in
    one thread that sleeps `period_s` before each block, as the live worker waits for the
    next one: what waiting alone costs (caches and branch predictors are cold when the thread
    wakes), without the live path's threads, queue and resampler. With `spin`, the thread
    busy-waits instead, keeping its core: what remains is what the machine forgets while time
    passes, not what sleeping costs."""
    detector, wall, cpu = Detector(engine), 0.0, 0.0
    for start in range(0, len(audio), chunk):
        if spin:
            until = time.perf_counter() + period_s
            while time.perf_counter() < until:
                pass
        else:
            time.sleep(period_s)
        t0, c0 = time.perf_counter(), time.thread_time()
        detector.process(audio[start:start + chunk])
        wall += time.perf_counter() - t0
        cpu += time.thread_time() - c0
    return wall, cpu


def bench_live(args) -> int:
    from kws.cli import load_engine

    engine = load_engine(args.model)
    audio = bench_audio(args.seconds)
    chunk_s = args.chunk_ms / 1000
    with threadpool_limits(1, user_api="blas"), tempfile.TemporaryDirectory() as tmp:
        wav = str(Path(tmp) / "live.wav")
        sf.write(wav, resample(audio, SAMPLE_RATE, args.rate), args.rate, subtype="FLOAT")
        audio_s, compute_s, compute_cpu_s = play_through_worker(engine, wav, chunk_s)
        chunk = round(SAMPLE_RATE * chunk_s)
        paced_s, paced_cpu_s = paced_run(engine, audio, chunk, chunk_s)
        spun_s, spun_cpu_s = paced_run(engine, audio, chunk, chunk_s, spin=True)
        cpu = {}
        bench = interleaved_median_seconds({"bench": streaming_run(engine, audio, chunk)}, args.repeats, cpu)
        used = machine()
    result = {"machine": used, "audio_seconds": audio_s, "rate": args.rate, "chunk_ms": args.chunk_ms,
              "rtf_live": compute_s / audio_s, "rtf_paced": paced_s / args.seconds,
              "rtf_spun": spun_s / args.seconds, "cpu_rtf_spun": spun_cpu_s / args.seconds,
              "rtf_bench": bench["bench"] / args.seconds, "cpu_rtf_live": compute_cpu_s / audio_s,
              "cpu_rtf_paced": paced_cpu_s / args.seconds, "cpu_rtf_bench": cpu["bench"] / args.seconds}
    result["live_over_bench"] = result["rtf_live"] / result["rtf_bench"]
    result["cpu_live_over_bench"] = result["cpu_rtf_live"] / result["cpu_rtf_bench"]
    result["cpu_live_over_paced"] = result["cpu_rtf_live"] / result["cpu_rtf_paced"]
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{audio_s:.1f} s at {args.rate} Hz played in real time through kws listen's path "
          f"in {args.chunk_ms:g}-ms blocks: real-time factor {result['rtf_live']:.4f} "
          f"(in CPU time {result['cpu_rtf_live']:.4f})")
    print(f"the same audio through a Detector alone (median of {n_runs(args.repeats)}): "
          f"{result['rtf_bench']:.4f} (in CPU time {result['cpu_rtf_bench']:.4f}); live / bench = "
          f"{result['live_over_bench']:.2f} ({result['cpu_live_over_bench']:.2f} in CPU time)")
    print(f"a Detector alone, sleeping {args.chunk_ms:g} ms before each block: "
          f"{result['rtf_paced']:.4f} (in CPU time {result['cpu_rtf_paced']:.4f}); in CPU time, "
          f"live / paced = {result['cpu_live_over_paced']:.2f}: what the live path adds to waiting")
    print(f"the same, busy-waiting {args.chunk_ms:g} ms instead of sleeping: {result['rtf_spun']:.4f} "
          f"(in CPU time {result['cpu_rtf_spun']:.4f}): the cost of time passing between blocks, "
          f"without sleep and wake-up")
    return 0


# ----------------------------------------------------------------------------- bench model

def training_seconds_per_clip(model, batch: int, repeats: int, context_s: float = 0.5) -> float:
    """One optimiser step on a batch of 1-s clips each after `context_s` of other audio (as
    kws train does), loss on the mean logits of the clip's steps, divided by the batch size."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    context = int(context_s * SAMPLE_RATE)
    x = torch.from_numpy(0.1 * rng.standard_normal((batch, context + SAMPLE_RATE), np.float32))
    y = torch.from_numpy(rng.integers(0, model.cfg.n_classes, batch))
    clip_steps = SAMPLE_RATE // model.cfg.stride
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()

    def step():
        optimiser.zero_grad()
        logits = model(x)[:, -clip_steps:].mean(1)
        F.cross_entropy(logits, y).backward()
        optimiser.step()
    seconds = median_seconds(step, repeats) / batch
    model.eval()
    return seconds


def mingru_pass_seconds(model, batch: int, repeats: int) -> dict:
    """One minGRU layer's forward and backward over a training example's steps, step by step and
    by the log-space parallel scan, timed side by side: {"stepwise": s, "scan": s}."""
    import torch

    from kws.model import MinGRU

    torch.manual_seed(0)
    gru = MinGRU(model.cfg.width)
    steps = (model.cfg.context_samples + SAMPLE_RATE) // model.cfg.stride
    x = torch.randn(batch, steps, model.cfg.width)

    def run(stepwise: bool):
        gru.zero_grad()
        gru(x, stepwise=stepwise).square().mean().backward()
    return interleaved_median_seconds({"stepwise": lambda: run(True), "scan": lambda: run(False)}, repeats)


def offline_seconds_per_audio_second(model, repeats: int) -> float:
    """One forward pass over a whole 1-s clip."""
    import torch

    clip = torch.from_numpy(bench_audio(1.0))[None]

    def run():
        with torch.inference_mode():
            model(clip)
    return median_seconds(run, repeats)


def stream_seconds_per_audio_second(model, repeats: int, seconds: float = 3.0) -> float:
    """The stream engine (what a Detector runs) fed 32-ms chunks."""
    audio = bench_audio(seconds)
    chunk = int(0.032 * SAMPLE_RATE)
    engine = StreamEngine.from_model(model)

    def run():
        state = engine.start_state()
        for start in range(0, len(audio), chunk):
            _, state = engine.stream(audio[start:start + chunk], state)
    return median_seconds(run, repeats) / seconds


def bench_model(args) -> int:
    from kws.cli import require_torch

    require_torch("kws bench model")
    import torch

    from kws.model import MGRADE, PRESETS, parameter_count, preset

    if args.threads:
        torch.set_num_threads(args.threads)
    unknown = [name for name in args.presets if name not in PRESETS]
    if unknown:
        raise KwsError(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    torch.manual_seed(0)
    # --threads holds for the stream engine's BLAS too (None: NumPy's default)
    with threadpool_limits(args.threads or None, user_api="blas"):
        result = {"machine": machine(), "repeats": args.repeats, "batch": args.batch, "presets": {}}
        for name in args.presets:
            model = MGRADE(preset(name, LABELS)).eval()
            result["presets"][name] = {
                "parameters": parameter_count(model),
                "stride": model.cfg.stride,
                "train_seconds_per_clip": training_seconds_per_clip(model, args.batch, args.repeats),
                "mingru_train_pass_seconds": mingru_pass_seconds(model, args.batch, args.repeats),
                "offline_seconds_per_audio_second":
                    offline_seconds_per_audio_second(model, args.repeats),
                "stream_32ms_seconds_per_audio_second":
                    stream_seconds_per_audio_second(model, args.repeats),
            }
    if args.json:
        print(json.dumps(result))
        return 0
    m = result["machine"]
    print(f"{m['threads']} thread(s) of {m['cpu']} ({m['cpus']} CPUs), torch {m['torch']}, "
          f"median of {n_runs(args.repeats)}, training batch {args.batch}")
    print("offline: PyTorch forward over a 1-s clip; stream: the NumPy engine (what a Detector runs) "
          "in 32-ms chunks")
    print(f"{'preset':<8} {'params':>8} {'train s/clip':>13} {'offline s/audio-s':>18} "
          f"{'stream 32ms s/audio-s':>22} {'minGRU pass: step / scan (s)':>29}")
    for name, r in result["presets"].items():
        gru = r["mingru_train_pass_seconds"]
        print(f"{name:<8} {r['parameters']:>8,} {r['train_seconds_per_clip']:>13.4f} "
              f"{r['offline_seconds_per_audio_second']:>18.4f} "
              f"{r['stream_32ms_seconds_per_audio_second']:>22.4f} "
              f"{gru['stepwise']:>13.4f} / {gru['scan']:.4f}")
    return 0


def register(sub):
    from kws.cli import COMMANDS
    from kws.listen import number_where, positive

    rate_in_range = number_where(lambda v: MIN_RATE <= v <= MAX_RATE and v == int(v),
                                 f"a sample rate from {MIN_RATE} to {MAX_RATE} Hz")

    def sample_rate(text: str) -> int:  # what --rate takes: as kws serve and kws listen accept
        return int(rate_in_range(text))

    p = sub.add_parser("bench", help=COMMANDS["bench"][1])
    bench_sub = p.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)

    s = bench_sub.add_parser("stream", help="streaming vs sliding-window cost, state size, "
                             "peak memory of kws listen (one thread)")
    s.add_argument("--model", help="model file or checkpoint (default: $KWS_MODEL or the shipped model)")
    s.add_argument("--seconds", type=float, default=20.0, help="audio per timed run (20)")
    s.add_argument("--repeats", type=positive(int), default=5, help="timed runs; the median is reported (5)")
    s.add_argument("--rss-seconds", type=positive(float), default=60.0,
                   help="length of the file kws listen streams for the memory figure (60)")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=bench_stream)

    v = bench_sub.add_parser("live", help="a file played in real time through kws listen's "
                             "path: its real-time factor beside the bench's (one thread)")
    v.add_argument("--model", help="model file or checkpoint (default: $KWS_MODEL or the shipped model)")
    v.add_argument("--seconds", type=positive(float), default=20.0, help="audio played (20)")
    v.add_argument("--rate", type=sample_rate, default=SAMPLE_RATE,
                   help=f"sample rate of the played file, as a microphone's, {MIN_RATE} to {MAX_RATE} Hz (16000)")
    v.add_argument("--chunk-ms", type=positive(float), default=32.0, help="block length (32)")
    v.add_argument("--repeats", type=positive(int), default=5, help="bench runs (5)")
    v.add_argument("--json", action="store_true", help="print one JSON object")
    v.set_defaults(func=bench_live)

    m = bench_sub.add_parser("model", help="training and inference time of each preset (needs torch)")
    m.add_argument("--presets", type=lambda s: s.split(","), default=["paper", "edge"],
                   help="comma separated (default: paper,edge)")
    m.add_argument("--repeats", type=positive(int), default=5, help="timed runs; the median is reported (5)")
    m.add_argument("--batch", type=positive(int), default=8, help="training batch size (8)")
    m.add_argument("--threads", type=int, default=0,
                   help="torch threads, and the stream engine's BLAS threads (default: the libraries')")
    m.add_argument("--json", action="store_true", help="print one JSON object")
    m.set_defaults(func=bench_model)

    for name in BENCH_MODULES:
        importlib.import_module(name).register(bench_sub)
