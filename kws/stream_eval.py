"""`kws eval-stream`: keyword spotting measured the way it is used, on long streams.

A stream is a run of slots, 3-6 s each. Most slots hold one clip of the split at a random time,
at a random gain (-10..+5 dB), over background noise at a random SNR (5-20 dB, speech RMS over
the 1-s clip against noise RMS, as in training); the rest hold only noise, from near silence to
loud (-70..-25 dBFS). Noise comes from the held-out end of the split's noise recordings (see
kws.data.read_noise). The stream runs through the same `Detector` that `kws listen` uses, in
32-ms blocks.

Scoring. Each clip's word is where its 10-ms frames are within 20 dB of its loudest frame (an
energy estimate of the word's start and end). A detection is a hit when its label is the clip's
and it comes between the word's start and one second after its end; each word is hit at most
once; every other detection is a false accept. Latency is detection time minus word end. Only
the chosen words (default: the 17 words the shared data covers well) are reported; clips of the
other words stay in the stream as speech that must not fire.

The DET curve comes from replaying the recorded per-step logits through fresh Detectors at other
thresholds (`Detector.process_logits`), so every point uses the same decision path.
"""

import json
import math
import resource
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kws.audio import SAMPLE_RATE, load_audio
from kws.data import WELL_COVERED, read_noise, read_split, word_bounds
from kws.errors import KwsError
from kws.stream import (DEFAULT_CHUNK_SAMPLES, DEFAULT_REFRACTORY_S, DEFAULT_THRESHOLD,
                        DEFAULT_WINDOW_S, Detection, Detector, parse_threshold, parse_words)

SLOT_S = (3.0, 6.0)
KEYWORD_FREE_SLOTS = 0.2
SNR_DB = (5.0, 20.0)
GAIN_DB = (-10.0, 5.0)
QUIET_DBFS = (-70.0, -25.0)
MAX_LATENCY_S = 1.0
FADE_S = 0.01
DET_THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7,
                  0.75, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
MEMORY_TOLERANCE_BYTES = 5 * 2**20
SUMMARY_KEYS = ("recall", "false_accepts_per_hour", "keywords", "latency_ms_median")


@dataclass(frozen=True)
class Placement:
    label: str
    start_s: float  # word onset (energy estimate), stream time
    end_s: float  # word end


# ----------------------------------------------------------------------------- building streams

def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))) + 1e-8)


def _noise(noise: list[np.ndarray], length: int, rng: np.random.Generator) -> np.ndarray:
    recording = noise[rng.integers(len(noise))]
    if len(recording) <= length:
        recording = np.tile(recording, length // len(recording) + 1)
    start = rng.integers(len(recording) - length + 1)
    piece = recording[start:start + length].astype(np.float32)
    fade = min(int(FADE_S * SAMPLE_RATE), length // 2)  # no clicks where slots meet
    ramp = np.linspace(0, 1, fade, dtype=np.float32)
    piece[:fade] *= ramp
    piece[length - fade:] *= ramp[::-1]
    return piece / _rms(piece)


def stream_slots(clips, noise: list[np.ndarray], seconds: float, seed: int,
                 start_s: float = 0.0) -> Iterator[tuple[np.ndarray, list[Placement]]]:
    """Seeded slots of a test stream, generated one at a time (constant memory), until
    `seconds` of audio: (audio, placements in stream time counted from `start_s`)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(clips))
    made, next_clip = 0, 0
    total = int(seconds * SAMPLE_RATE)
    while made < total:
        length = min(int(rng.uniform(*SLOT_S) * SAMPLE_RATE), total - made)
        background = _noise(noise, length, rng)
        placements = []
        if rng.random() < KEYWORD_FREE_SLOTS or length < 2 * SAMPLE_RATE:
            audio = background * 10 ** (rng.uniform(*QUIET_DBFS) / 20)
        else:
            clip = clips[order[next_clip % len(order)]]
            next_clip += 1
            speech = load_audio(clip.path)[: length - SAMPLE_RATE // 2]
            speech = speech * np.float32(10 ** (rng.uniform(*GAIN_DB) / 20))
            noise_rms = _rms(speech) * 10 ** (-rng.uniform(*SNR_DB) / 20)
            audio = background * noise_rms
            at = int(rng.integers(SAMPLE_RATE // 4, length - len(speech) + 1))
            audio[at:at + len(speech)] += speech
            first, last = word_bounds(speech)
            t0 = start_s + (made + at) / SAMPLE_RATE
            placements.append(Placement(clip.label, t0 + first / SAMPLE_RATE,
                                        t0 + last / SAMPLE_RATE))
        yield np.clip(audio, -1, 1).astype(np.float32), placements
        made += length


# ----------------------------------------------------------------------------- running, scoring

@dataclass
class StreamRun:
    detections: list[Detection]
    placements: list[Placement]
    seconds: float
    logits: np.ndarray | None  # (steps, n_classes) when recorded, for the DET curve
    compute_seconds: float


def run_stream(detector: Detector, slots, record_logits: bool = False, on_slot=None) -> StreamRun:
    """Feed slots to the detector in DEFAULT_CHUNK_SAMPLES blocks, exactly as listen does."""
    import time

    detections, placements, logits = [], [], []
    carry = np.zeros(0, np.float32)
    compute = 0.0
    chunk = DEFAULT_CHUNK_SAMPLES
    for audio, slot_placements in slots:
        placements += slot_placements
        audio = np.concatenate([carry, audio])
        whole = len(audio) // chunk * chunk
        for start in range(0, whole, chunk):
            t0 = time.perf_counter()
            detections += detector.process(audio[start:start + chunk])
            compute += time.perf_counter() - t0
            if record_logits:
                logits.append(detector.last_logits.copy())
        carry = audio[whole:]
        if on_slot:
            on_slot(detector)
    if len(carry):
        detections += detector.process(carry)
        if record_logits:
            logits.append(detector.last_logits.copy())
    return StreamRun(detections, placements, detector.time_s,
                     np.concatenate(logits) if record_logits else None, compute)


def score(detections: list[Detection], placements: list[Placement], words, seconds: float,
          window: tuple[float, float] = (0.0, math.inf)) -> dict:
    """Recall, false accepts per hour and latency of detections against the placed words,
    counting only words and detections whose time falls in `window` (stream seconds)."""
    lo, hi = window
    hi = min(hi, seconds)
    words = set(words)
    targets = [p for p in placements if p.label in words and lo <= p.start_s < hi]
    unmatched = {i: p for i, p in enumerate(placements)}
    hits, latencies, false_accepts = set(), [], 0
    for d in detections:
        match = next((i for i, p in unmatched.items() if p.label == d.label
                      and p.start_s <= d.time_s <= p.end_s + MAX_LATENCY_S), None)
        if match is None:
            false_accepts += lo <= d.time_s < hi
            continue
        p = unmatched.pop(match)
        if p.label in words and lo <= p.start_s < hi:
            hits.add(match)
            latencies.append(1000 * (d.time_s - p.end_s))
    hours = max(hi - lo, 1e-9) / 3600
    per_word = {}
    for w in sorted(words):
        n = sum(p.label == w for p in targets)
        if n:
            per_word[w] = round(sum(placements[i].label == w for i in hits) / n, 4)
    return {
        "recall": len(hits) / len(targets) if targets else float("nan"),
        "false_accepts_per_hour": false_accepts / hours,
        "latency_ms_median": float(np.median(latencies)) if latencies else float("nan"),
        "latency_ms_p90": float(np.percentile(latencies, 90)) if latencies else float("nan"),
        "keywords": len(targets),
        "hits": len(hits),
        "false_accepts": false_accepts,
        "hours": hours,
        "recall_per_word": per_word,
    }


def det_curve(model, run: StreamRun, words, window_s: float, refractory_s: float,
              thresholds=DET_THRESHOLDS) -> list[dict]:
    """Recall and false accepts per hour at each threshold, replaying the recorded logits."""
    points = []
    for t in thresholds:
        detector = Detector(model, threshold=float(t), words=words, window_s=window_s,
                            refractory_s=refractory_s)
        found = detector.process_logits(run.logits)
        s = score(found, run.placements, words, run.seconds)
        points.append({"threshold": float(t), "recall": s["recall"],
                       "false_accepts_per_hour": s["false_accepts_per_hour"]})
    return points


def best_at(points: list[dict], max_false_accepts_per_hour: float) -> dict | None:
    """The DET point with the highest recall at no more than the given false accept rate."""
    ok = [p for p in points if p["false_accepts_per_hour"] <= max_false_accepts_per_hour]
    return max(ok, key=lambda p: (p["recall"], -p["threshold"])) if ok else None


def clip_accuracy(model, clips, seed: int, batch: int = 64) -> dict:
    """Clip accuracy (mean-logit readout over each clip's own steps) with the stream state
    reset before every clip to the state a stream starts in (`model.primed_state`, what
    `classify` does), and carried from one clip to the next in a seeded order."""
    order = np.random.default_rng(seed).permutation(len(clips))
    audio = [np.pad(a, (0, max(0, SAMPLE_RATE - len(a))))[:SAMPLE_RATE]
             for a in (load_audio(clips[i].path) for i in order)]
    labels = [model.cfg.labels.index(clips[i].label) for i in order]
    reset, carried = [], []
    with torch.inference_mode():
        for start in range(0, len(audio), batch):
            x = torch.from_numpy(np.stack(audio[start:start + batch]))
            reset += model.classify(x).argmax(1).tolist()
        state = model.primed_state(1)
        for a in audio:
            logits, state = model.stream(torch.from_numpy(a)[None], state)
            carried.append(int(logits[0].mean(0).argmax()))
    labels = np.array(labels)
    return {"clip_accuracy_reset": float(np.mean(np.array(reset) == labels)),
            "clip_accuracy_carried": float(np.mean(np.array(carried) == labels)),
            "clips": len(labels)}


# ----------------------------------------------------------------------------- DET picture

_DIGITS = {  # 3x5 pixel glyphs for tick labels
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001001001001", "8": "111101111101111",
    "9": "111101111001111", ".": "000000000000010", "%": "101001010100101",
}


def _text(image: np.ndarray, x: int, y: int, text: str, scale: int = 2):
    for k, ch in enumerate(text):
        glyph = np.array([int(b) for b in _DIGITS[ch]], bool).reshape(5, 3)
        block = np.kron(glyph, np.ones((scale, scale), bool))
        x0 = x + k * 4 * scale
        region = image[y:y + block.shape[0], x0:x0 + block.shape[1]]
        region[block[: region.shape[0], : region.shape[1]]] = 0


def _line(image: np.ndarray, p0, p1, color, width: int = 1):
    n = int(max(abs(p1[0] - p0[0]), abs(p1[1] - p0[1]))) + 1
    xs = np.linspace(p0[0], p1[0], n).round().astype(int)
    ys = np.linspace(p0[1], p1[1], n).round().astype(int)
    for dx in range(-(width // 2), width - width // 2):
        for dy in range(-(width // 2), width - width // 2):
            x = np.clip(xs + dx, 0, image.shape[1] - 1)
            y = np.clip(ys + dy, 0, image.shape[0] - 1)
            image[y, x] = color


def det_image(points: list[dict], operating: dict | None = None) -> np.ndarray:
    """A log-log DET plot, (H, W, 3) uint8: x false accepts per hour (0.1-1000), y miss rate
    (0.1%-100%). Grid lines at decades; the curve in blue, the operating point in red."""
    h, w, left, bottom, top, right = 360, 480, 60, 40, 14, 30
    image = np.full((h, w, 3), 255, np.uint8)
    x_range, y_range = (-1.0, 3.0), (-3.0, 0.0)

    def xy(fa, miss):
        fx = (np.log10(max(fa, 10 ** x_range[0])) - x_range[0]) / (x_range[1] - x_range[0])
        fy = (np.log10(max(miss, 10 ** y_range[0])) - y_range[0]) / (y_range[1] - y_range[0])
        return left + fx * (w - left - right), h - bottom - fy * (h - bottom - top)

    for decade, label in zip(range(-1, 4), ("0.1", "1", "10", "100", "1000")):
        x, _ = xy(10.0 ** decade, 1.0)
        _line(image, (x, top), (x, h - bottom), (220, 220, 220))
        _text(image, int(x) - 4 * len(label), h - bottom + 8, label)
    for decade, label in zip(range(-3, 1), ("0.1%", "1%", "10%", "100%")):
        _, y = xy(1.0, 10.0 ** decade)
        _line(image, (left, y), (w - right, y), (220, 220, 220))
        _text(image, 4, int(y) - 5, label)
    _line(image, (left, top), (left, h - bottom), (0, 0, 0))
    _line(image, (left, h - bottom), (w - right, h - bottom), (0, 0, 0))
    curve = sorted((p["false_accepts_per_hour"], 1 - p["recall"]) for p in points)
    for a, b in zip(curve, curve[1:]):
        _line(image, xy(*a), xy(*b), (30, 80, 200), width=2)
    for p in curve:
        _line(image, xy(*p), xy(*p), (30, 80, 200), width=5)
    if operating:
        point = xy(operating["false_accepts_per_hour"], 1 - operating["recall"])
        _line(image, point, point, (220, 30, 30), width=9)
    return image


def write_png(path: "str | Path", image: np.ndarray, description: str = ""):
    """An 8-bit RGB PNG, written with zlib and struct (no imaging library needed)."""
    import struct
    import zlib

    image = np.ascontiguousarray(image, dtype=np.uint8)
    h, w, _ = image.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, w * 3)], axis=1)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    if description:
        png += chunk(b"tEXt", b"Description\x00" + description.encode("latin-1", "replace"))
    png += chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


# ----------------------------------------------------------------------------- the command

def _rss_bytes() -> int:
    """Resident memory now (Linux /proc), else the peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _state_max(detector: Detector) -> float:
    return max(float(np.abs(s).max()) for s in detector.state[1:] if s is not None)


def evaluate(model, data: Path, split: str, minutes: float, seed: int, words, threshold,
             window_s: float, refractory_s: float, det_png: Path | None) -> dict:
    clips = read_split(data, split)
    noise = read_noise(data, split)
    detector = Detector(model, threshold=threshold, words=words, window_s=window_s,
                        refractory_s=refractory_s)
    run = run_stream(detector, stream_slots(clips, noise, minutes * 60, seed), record_logits=True)
    result = score(run.detections, run.placements, words, run.seconds)
    points = det_curve(model, run, words, window_s, refractory_s)
    result.update({
        "split": split, "minutes": run.seconds / 60, "seed": seed,
        "threshold": threshold if threshold is not None else DEFAULT_THRESHOLD,
        "window_s": window_s, "refractory_s": refractory_s, "words": list(words),
        "real_time_factor": run.compute_seconds / run.seconds,
        "det_curve": points,
        "best_at_2_false_accepts_per_hour": best_at(points, 2.0),
    })
    result.update(clip_accuracy(model, clips, seed))
    if det_png:
        write_png(det_png, det_image(points, result),
                  "DET curve of kws eval-stream: x false accepts per hour (log), y miss rate (log)")
        result["det_png"] = str(det_png)
    return result


def long_run_check(model, data: Path, split: str, minutes: float, seed: int, words, threshold,
                   window_s: float, refractory_s: float, compare_minutes: float) -> dict:
    """One stream of `minutes`: the same `compare_minutes` of audio at its start and its end,
    other audio between. Passes when memory stays within 5 MB after the first compare window
    and the end scores no worse than the start (same audio, so only the carried state differs)."""
    if minutes < 2 * compare_minutes:
        raise KwsError(f"--long-run-check needs --minutes of at least twice the compared "
                       f"{compare_minutes:g} minutes")
    clips, noise = read_split(data, split), read_noise(data, split)
    compare_s, total_s = compare_minutes * 60, minutes * 60
    slots = [
        stream_slots(clips, noise, compare_s, seed),
        stream_slots(clips, noise, total_s - 2 * compare_s, seed + 1, start_s=compare_s),
        stream_slots(clips, noise, compare_s, seed, start_s=total_s - compare_s),
    ]
    detector = Detector(model, threshold=threshold, words=words, window_s=window_s,
                        refractory_s=refractory_s)
    memory, state_max = [], []

    def watch(d: Detector):
        memory.append((d.time_s, _rss_bytes()))
        state_max.append((d.time_s, _state_max(d)))

    run = run_stream(detector, (s for part in slots for s in part), on_slot=watch)
    baseline = next(rss for t, rss in memory if t >= compare_s)
    growth = max(rss for t, rss in memory if t >= compare_s) - baseline
    first = score(run.detections, run.placements, words, run.seconds, (0, compare_s))
    last = score(run.detections, run.placements, words, run.seconds, (total_s - compare_s, total_s))
    no_worse = (last["recall"] >= first["recall"]
                and last["false_accepts_per_hour"] <= first["false_accepts_per_hour"])
    return {
        "minutes": run.seconds / 60, "compare_minutes": compare_minutes,
        "rss_after_warmup_bytes": baseline, "rss_growth_bytes": growth,
        "memory_flat": growth <= MEMORY_TOLERANCE_BYTES,
        "state_max_first": max(v for t, v in state_max if t <= compare_s),
        "state_max_last": max(v for t, v in state_max if t > total_s - compare_s),
        "first": {k: first[k] for k in SUMMARY_KEYS},
        "last": {k: last[k] for k in SUMMARY_KEYS},
        "no_worse": no_worse,
        "real_time_factor": run.compute_seconds / run.seconds,
        "passed": growth <= MEMORY_TOLERANCE_BYTES and no_worse,
    }


def _print_report(r: dict):
    print(f"stream: {r['minutes']:.1f} min of the {r['split']} split, {r['keywords']} keywords, "
          f"threshold {r['threshold']}, window {r['window_s']} s, refractory {r['refractory_s']} s")
    print(f"recall {r['recall']:.1%}  false accepts/hour {r['false_accepts_per_hour']:.2f}  "
          f"latency median {r['latency_ms_median']:.0f} ms, p90 {r['latency_ms_p90']:.0f} ms")
    best = r["best_at_2_false_accepts_per_hour"]
    if best:
        print(f"best at <= 2 false accepts/hour: recall {best['recall']:.1%} at threshold "
              f"{best['threshold']} ({best['false_accepts_per_hour']:.2f}/h)")
    print(f"clip accuracy over {r['clips']} clips: state reset {r['clip_accuracy_reset']:.1%}, "
          f"carried {r['clip_accuracy_carried']:.1%}")
    if "det_png" in r:
        print(f"DET curve: {r['det_png']}")


def _print_long_run(r: dict):
    print(f"long run: {r['minutes']:.0f} min, memory growth after warm-up "
          f"{r['rss_growth_bytes'] / 2**20:.2f} MB ({'flat' if r['memory_flat'] else 'NOT flat'}), "
          f"largest state value {r['state_max_first']:.3f} first vs {r['state_max_last']:.3f} last")
    for name in ("first", "last"):
        s = r[name]
        print(f"  {name} {r['compare_minutes']:g} min: recall {s['recall']:.1%} of "
              f"{s['keywords']}, false accepts/hour {s['false_accepts_per_hour']:.2f}")
    print("passed" if r["passed"] else "FAILED")


def eval_stream(args) -> int:
    from kws.cli import load

    torch.set_num_threads(args.threads)
    model = load(args.model)
    words = args.words or [w for w in WELL_COVERED if w in model.cfg.labels]
    common = dict(model=model, data=Path(args.data), split=args.split, minutes=args.minutes,
                  seed=args.seed, words=words, threshold=args.threshold,
                  window_s=args.window_s, refractory_s=args.refractory_s)
    if args.long_run_check:
        result = long_run_check(**common, compare_minutes=args.compare_minutes)
        if args.json:
            print(json.dumps(result))
        else:
            _print_long_run(result)
        return 0 if result["passed"] else 1
    result = evaluate(**common, det_png=Path(args.det_png) if args.det_png else None)
    if args.json:
        print(json.dumps(result))
    else:
        _print_report(result)
    return 0


def register(sub):
    from kws.listen import argument, positive

    p = sub.add_parser("eval-stream", help="recall, false accepts/hour and latency on long "
                       "test streams through the live detection path")
    p.add_argument("--model", help="checkpoint (default: the shipped model or $KWS_MODEL)")
    p.add_argument("--data", required=True, help="Speech Commands folder (official layout)")
    p.add_argument("--split", default="testing", choices=("validation", "testing"))
    p.add_argument("--minutes", type=positive(float), default=10.0, help="stream length (10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--words", type=argument(parse_words),
                   help="keywords, comma separated (default: the 17 well-covered words)")
    p.add_argument("--threshold", type=argument(parse_threshold), help=f"detection probability "
                   f"(default {DEFAULT_THRESHOLD}), or per word: yes=0.9,no=0.7")
    p.add_argument("--window-s", type=positive(float), default=DEFAULT_WINDOW_S,
                   help=f"seconds of logits averaged into a score ({DEFAULT_WINDOW_S:g})")
    p.add_argument("--refractory-s", type=float, default=DEFAULT_REFRACTORY_S)
    p.add_argument("--det-png", default="det.png", help="where to draw the DET curve "
                   "(default det.png; '' for none)")
    p.add_argument("--long-run-check", action="store_true", help="instead: check that memory "
                   "stays flat and detection does not degrade over --minutes (use >= 60)")
    p.add_argument("--compare-minutes", type=positive(float), default=10.0,
                   help="with --long-run-check: minutes compared at the start and the end (10)")
    p.add_argument("--threads", type=positive(int), default=1, help="torch threads (1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=eval_stream)
