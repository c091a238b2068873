"""`kws listen`: spot keywords live in a microphone stream (or a file played as one).

Threads: the audio source (the PortAudio callback, or a file reader) only copies blocks into a
bounded queue; one worker thread takes them, resamples to 16 kHz and runs the streaming
Detector, whose state carries from block to block. A full queue drops the block and counts it,
so a slow machine loses audio visibly instead of growing memory.
"""

import argparse
import contextlib
import json
import math
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
from threadpoolctl import threadpool_limits

from kws.audio import (RESAMPLE_QUALITY, SAMPLE_RATE, TRUNCATED_WAV, AudioError, check_header, mono_blocks,
                       wav_is_truncated)
from kws.errors import KwsError
from kws.stream import DEFAULT_THRESHOLD, Detection, Detector, parse_threshold, parse_words

QUEUE_SECONDS = 10.0  # audio the worker may fall behind before blocks are dropped


class Resampler:
    """Streaming resampler (libsoxr, as `kws.audio.resample`): blocks in any sizes give the
    samples of resampling the whole signal at once (within 1e-6), a few milliseconds late."""

    def __init__(self, orig_sr: int, new_sr: int = SAMPLE_RATE):
        self.identity = orig_sr == new_sr
        self._stream = None if self.identity else soxr.ResampleStream(
            orig_sr, new_sr, 1, dtype="float32", quality=RESAMPLE_QUALITY)

    def process(self, audio: np.ndarray) -> np.ndarray:
        audio = np.asarray(audio, dtype=np.float32)
        if self.identity:
            return audio
        return self._stream.resample_chunk(audio)

    def flush(self) -> np.ndarray:
        """The rest of the signal, as if it ended here (what whole-signal resampling outputs);
        the resampler is done after it."""
        if self.identity:
            return np.zeros(0, dtype=np.float32)
        # Let go of libsoxr's stream now: one still alive at interpreter exit makes nanobind
        # print a leak report.
        stream, self._stream = self._stream, None
        return stream.resample_chunk(np.zeros(0, np.float32), last=True)


# ----------------------------------------------------------------------------- sources

@dataclass
class Counters:
    dropped_blocks: int = 0  # blocks lost because the worker fell behind
    dropped_frames: int = 0
    overflows: int = 0  # input overflows PortAudio reported


def import_sounddevice():
    try:
        import sounddevice
    except OSError:
        raise KwsError("the PortAudio library is missing; install it (Debian/Ubuntu: "
                       "apt-get install libportaudio2) or use --input FILE") from None
    return sounddevice


def parse_device(device: str | None):
    """'3' -> 3 (an index), any other text is a (part of a) device name."""
    if device is None:
        return None
    return int(device) if device.strip().isdigit() else device


def list_devices() -> str:
    sd = import_sounddevice()
    lines = []
    for index, dev in enumerate(sd.query_devices()):
        if dev["max_input_channels"] > 0:
            lines.append(f"{index:>3}  {dev['name']}  ({dev['max_input_channels']} ch, "
                         f"{dev['default_samplerate']:.0f} Hz default)")
    return "\n".join(lines) if lines else "no audio input devices found"


def input_settings(device, rate: int | None) -> tuple[int, int, str]:
    """(device index, sample rate, name) of a usable input device, or a KwsError saying why
    not. Without `rate`: 16 kHz if the device takes it, else the device's default rate."""
    sd = import_sounddevice()
    try:
        info = sd.query_devices(device, "input")
    except ValueError as e:
        raise KwsError(f"{e}; see `kws listen --list-devices`") from None
    except sd.PortAudioError:
        raise KwsError("no audio input device found; connect a microphone (or check "
                       "PulseAudio/ALSA), or stream a file with --input FILE") from None
    if rate is None:
        try:
            sd.check_input_settings(info["index"], channels=1, samplerate=SAMPLE_RATE,
                                    dtype="float32")
            rate = SAMPLE_RATE
        except sd.PortAudioError:
            rate = int(info["default_samplerate"])
    try:
        sd.check_input_settings(info["index"], channels=1, samplerate=rate, dtype="float32")
    except sd.PortAudioError as e:
        raise KwsError(f"input device {info['name']!r} does not record at {rate} Hz ({e}); "
                       f"try --rate {int(info['default_samplerate'])}") from None
    return info["index"], rate, info["name"]


def open_microphone(device: int, rate: int, block_seconds: float, blocks: queue.Queue,
                    counters: Counters):
    """A started PortAudio input stream whose callback feeds `blocks`."""
    sd = import_sounddevice()

    def callback(indata, frames, _time, status):
        # Runs on PortAudio's thread: copy and hand over, nothing else.
        if status.input_overflow:
            counters.overflows += 1
        try:
            blocks.put_nowait(indata[:, 0].copy())
        except queue.Full:
            counters.dropped_blocks += 1
            counters.dropped_frames += frames

    try:
        stream = sd.InputStream(device=device, channels=1, samplerate=rate, dtype="float32",
                                blocksize=max(1, round(rate * block_seconds)), callback=callback)
        stream.start()
    except sd.PortAudioError as e:
        raise KwsError(f"cannot open input device {device} at {rate} Hz: {e}") from None
    return stream


def file_rate(path: str) -> int:
    """The sample rate of the audio file at `path`, once its header is checked as /predict checks it."""
    if not Path(path).exists():
        raise KwsError(f"no audio file at {path}")
    if not Path(path).is_file():
        raise KwsError(f"{path} is not a regular file (a folder, a pipe or a device): give an audio file")
    if Path(path).stat().st_size == 0:
        raise KwsError(f"{path} is empty (0 bytes): give an audio file")
    try:
        info = sf.info(path)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise KwsError(f"cannot read {path}: {e}") from None
    try:
        check_header(info.samplerate, info.channels)
    except AudioError as e:
        raise KwsError(f"cannot play {path}: {e}") from None
    return info.samplerate


def play_file(path: str, block_seconds: float, fast: bool, blocks: queue.Queue,
              stop: threading.Event):
    """Read `path` block by block into `blocks` (constant memory), each block when it would have
    been recorded (its end) unless `fast`. Ends with None; a file that cannot be played to its
    end (damaged, truncated, samples that are not numbers, no audio at all) puts an AudioError
    before it, after the audio that could be read. Runs in its own thread."""
    def offer(item) -> bool:
        while not stop.is_set():
            try:
                blocks.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        with open(path, "rb") as raw:
            truncated = wav_is_truncated(raw)
        with sf.SoundFile(path) as f:
            block = max(1, round(f.samplerate * block_seconds))
            start, sent = time.monotonic(), 0
            # Decoded in large reads, handed over in blocks: soundfile seeks after every read,
            # and libmpg123 decodes the MP3 frame after a seek without its bit reservoir.
            for decoded in mono_blocks(f):
                for at in range(0, len(decoded), block):
                    data = decoded[at:at + block]
                    sent += len(data)
                    if not fast:
                        time.sleep(max(0.0, start + sent / f.samplerate - time.monotonic()))
                    if not offer(data):
                        return
            if sent == 0:
                raise AudioError("it holds no audio samples")
            if truncated:
                raise AudioError(TRUNCATED_WAV)
    except (AudioError, sf.LibsndfileError, RuntimeError) as e:
        reason = e if isinstance(e, AudioError) else f"cannot decode audio: {e}"
        offer(AudioError(f"could not play {path} to its end: {reason}"))
    finally:
        blocks.put(None)


# ----------------------------------------------------------------------------- worker

def format_detection(d: Detection, as_json: bool) -> str:
    wall = datetime.now().isoformat(timespec="milliseconds")
    if as_json:
        return json.dumps({"time_s": round(d.time_s, 3), "label": d.label,
                           "score": round(d.score, 4), "wall_time": wall})
    return f"{wall}  stream {d.time_s:9.2f} s  {d.label:<10} {d.score:.3f}"


class Worker:
    """The detecting side of the pipeline: takes blocks at `rate` from the queue, resamples,
    detects, and hands the detections of every call to `on_detections`; stops at None, after
    flushing the detector so that a word at the very end is reported. `kws listen` prints them;
    the service publishes them. Run `run` in a thread of its own. `source_error` is why the
    source ended early (an AudioError it queued), `error` what failed here."""

    def __init__(self, detector: Detector, rate: int, blocks: queue.Queue,
                 on_detections: Callable[[list[Detection]], None]):
        self.detector, self.blocks, self.on_detections = detector, blocks, on_detections
        self.resampler = Resampler(rate)
        self.detections = 0
        self.compute_seconds = 0.0  # wall-clock time in the resampler and the detector
        self.compute_cpu_seconds = 0.0  # this thread's CPU time there (waits for a core excluded)
        self.error: BaseException | None = None
        self.source_error: AudioError | None = None
        # Waited on instead of a join: a join interrupted by Ctrl-C can mark a running thread
        # as finished (CPython's bpo-45274 handling), and the interpreter would then exit under
        # a thread still inside the model.
        self.finished = threading.Event()

    def run(self):
        try:
            ended = False
            while not ended:
                waiting, ended = self._take_blocks()
                if waiting:
                    self._detect(self.resampler.process(np.concatenate(waiting)))
            self._detect(self.resampler.flush())
            self._report(self.detector.flush())
        except BaseException as e:  # reported by whoever owns the thread
            self.error = e
        finally:
            self.finished.set()

    def _take_blocks(self) -> tuple[list[np.ndarray], bool]:
        """(the blocks waiting, whether the end marker came). Blocks are taken as they come; a
        worker that has fallen behind takes all that wait at once, as one chunk: the model's
        cost per call is mostly fixed, so it catches up, and chunking changes no detection."""
        waiting = []
        block = self.blocks.get()
        while block is not None:
            if isinstance(block, AudioError):
                self.source_error = block
            else:
                waiting.append(block)
            try:
                block = self.blocks.get_nowait()
            except queue.Empty:
                return waiting, False
        return waiting, True

    def _detect(self, audio: np.ndarray):
        t0, c0 = time.perf_counter(), time.thread_time()
        found = self.detector.process(audio)
        self.compute_seconds += time.perf_counter() - t0
        self.compute_cpu_seconds += time.thread_time() - c0
        self._report(found)

    def _report(self, found: list[Detection]):
        self.detections += len(found)
        self.on_detections(found)


def summary(worker: Worker, counters: Counters) -> str:
    audio_s = worker.detector.time_s
    rtf = worker.compute_seconds / audio_s if audio_s else 0.0
    return (f"kws listen: {audio_s:.1f} s of audio, {worker.detections} detection{'' if worker.detections == 1 else 's'}, "
            f"{counters.dropped_frames} dropped frames ({counters.dropped_blocks} blocks), "
            f"{counters.overflows} input overflows, real-time factor {rtf:.4f}")


def listen(args) -> int:
    if args.list_devices:
        if args.input:
            raise KwsError("--list-devices lists the input devices; it plays no file (--input)")
        print(list_devices())
        return 0
    if args.input and args.device is not None:
        raise KwsError("--input and --device exclude each other: pick a file or a device")
    if args.input and args.rate is not None:
        raise KwsError("--rate is a device's sample rate; a file plays at its own (resampled to 16 kHz)")
    if args.fast and not args.input:
        raise KwsError("--fast plays a file (--input) as fast as possible; a device runs in real time")
    from kws.cli import load_engine

    if args.input:
        rate = file_rate(args.input)
        what = f"{args.input} ({rate} Hz, {'as fast as possible' if args.fast else 'real time'})"
    else:  # device problems are reported before the model is loaded
        device, rate, name = input_settings(parse_device(args.device), args.rate)
        what = f"input device {name!r} ({rate} Hz)"
    detector = Detector(load_engine(args.model), threshold=args.threshold, words=args.words)
    block_seconds = args.chunk_ms / 1000
    blocks = queue.Queue(maxsize=max(2, math.ceil(QUEUE_SECONDS / block_seconds)))
    counters, stop = Counters(), threading.Event()
    mic = source = None
    if args.input:
        source = threading.Thread(target=play_file, daemon=True, name="kws-file",
                                  args=(args.input, block_seconds, args.fast, blocks, stop))
    else:
        mic = open_microphone(device, rate, block_seconds, blocks, counters)
    def print_detections(found: list[Detection]):
        for d in found:
            print(format_detection(d, args.json), flush=True)

    worker = Worker(detector, rate, blocks, print_detections)
    thread = threading.Thread(target=worker.run, daemon=True, name="kws-detector")
    # The engine's matmuls are small: BLAS threads would only contend with the audio threads.
    with _signals_stop(), threadpool_limits(args.threads, user_api="blas"):
        thread.start()
        if source:
            source.start()
        print(f"kws listen: listening to {what} for {', '.join(detector.thresholds)}; "
              f"Ctrl-C stops", file=sys.stderr, flush=True)
        try:
            while not worker.finished.wait(timeout=0.2):
                pass
        except KeyboardInterrupt:
            stop.set()  # the file reader ends the queue itself
        finally:
            if mic is not None:
                mic.stop()
                mic.close()
                put_end(blocks)
            worker.finished.wait()
    thread.join()
    if worker.error is not None:
        raise worker.error
    print(summary(worker, counters), file=sys.stderr, flush=True)
    if worker.source_error is not None:  # after the detections and the summary of what was heard
        raise worker.source_error
    return 0


@contextlib.contextmanager
def _signals_stop():
    """Ctrl-C and SIGTERM (`docker stop`, a service manager) end the stream with a summary,
    also where the shell started us ignoring SIGINT (a background job)."""
    def interrupt(_signum, _frame):
        raise KeyboardInterrupt
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def put_end(blocks: queue.Queue):
    """Queue the end marker even when the queue is full (the oldest block makes room)."""
    while True:
        try:
            blocks.put_nowait(None)
            return
        except queue.Full:
            try:
                blocks.get_nowait()
            except queue.Empty:
                pass


def argument(parse):
    """An argparse type from a parser that raises KwsError: its message becomes argparse's."""
    def convert(text: str):
        try:
            return parse(text)
        except KwsError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return convert


def positive(kind):
    """An argparse type: a number of `kind` greater than zero."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
        return value
    return parse


def number_where(holds, what: str):
    """An argparse type: a number for which `holds(value)` is true, else "'TEXT' is not WHAT"."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not holds(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    return parse


MAX_CHUNK_MS = 1000.0
GAIN_DB_RANGE = (-60.0, 40.0)
chunk_ms = number_where(lambda v: 0 < v <= MAX_CHUNK_MS,  # what --chunk-ms takes
                        f"a block length above 0 and at most {MAX_CHUNK_MS:g} ms")
non_negative = number_where(lambda v: 0 <= v < math.inf, "a number of seconds, 0 or more")
gain_db = number_where(lambda v: GAIN_DB_RANGE[0] <= v <= GAIN_DB_RANGE[1],  # what --gain-db takes
                       f"a gain from {GAIN_DB_RANGE[0]:g} to {GAIN_DB_RANGE[1]:g} dB")
MAX_DC_OFFSET = 0.5  # of full scale: far beyond any working microphone
dc_offset = number_where(lambda v: abs(v) <= MAX_DC_OFFSET,  # what --dc-offset takes
                         f"an offset from {-MAX_DC_OFFSET:g} to {MAX_DC_OFFSET:g} of full scale")
ROOM_RT60_RANGE = (0.05, 2.0)  # a dry booth to a large hall
room_rt60 = number_where(lambda v: ROOM_RT60_RANGE[0] <= v <= ROOM_RT60_RANGE[1],  # what --room-rt60 takes
                         f"a reverberation time from {ROOM_RT60_RANGE[0]:g} to {ROOM_RT60_RANGE[1]:g} s")


def band_hz(text: str) -> tuple[float, float]:
    """An argparse type: 'LOW,HIGH' in Hz, 0 <= LOW < HIGH <= 8000 (what --band-hz takes)."""
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        low = high = math.nan
    if not 0 <= low < high <= SAMPLE_RATE / 2:
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW,HIGH in Hz with 0 <= LOW < HIGH <= "
                                         f"{SAMPLE_RATE // 2}")
    return low, high


def register(sub):
    from kws.cli import COMMANDS

    p = sub.add_parser("listen", help=COMMANDS["listen"][1])
    p.add_argument("--model", help="model file from kws export, or a checkpoint (default: "
                   "$KWS_MODEL or the shipped model)")
    p.add_argument("--device", help="input device name (or part of it) or index")
    p.add_argument("--list-devices", action="store_true", help="list input devices and exit")
    p.add_argument("--rate", type=positive(int), help="device sample rate in Hz "
                   "(default: 16000 if the device takes it, else its default rate)")
    p.add_argument("--threshold", type=argument(parse_threshold), help="detection probability: "
                   "one for all words, per word (yes=0.98,no=0.99; words not named keep their "
                   "default), or a JSON file of per-word thresholds ({\"thresholds\": {\"yes\": 0.9}}, as "
                   "kws eval-stream --choose-thresholds writes it). Default: the model's own "
                   "per-word thresholds, chosen on validation streams for the most words heard "
                   "with at most one false alarm an hour, counted with a margin so that it holds "
                   "on other streams too, for the model's readout (`kws info` "
                   f"lists both), and {DEFAULT_THRESHOLD} for a word without one. Lower hears "
                   "more words and fires more often. A word named here is also reported "
                   "(seven=0.999 adds seven to the default words).")
    p.add_argument("--words", type=argument(parse_words),
                   help="report only these words, comma separated (default: the words the "
                   "model has thresholds for, the 17 well-covered ones for the shipped models; "
                   "the other 18 fire on running speech. Name every word you want, those 17 "
                   "included: the list replaces the default)")
    p.add_argument("--input", metavar="FILE", help="stream this audio file instead of a device")
    p.add_argument("--fast", action="store_true", help="with --input: as fast as possible, "
                   "not in real time")
    p.add_argument("--chunk-ms", type=chunk_ms, default=32.0,
                   help=f"audio block length, at most {MAX_CHUNK_MS:g} ms: a block delays every "
                        f"detection in it by its length (32 ms)")
    p.add_argument("--threads", type=positive(int), default=1,
                   help="BLAS threads for the model (1)")
    p.add_argument("--json", action="store_true", help="one JSON object per detection")
    p.set_defaults(func=listen)
