"""The live listener of `kws serve --listen`: `kws listen`'s audio pipeline (microphone or a file
played in real time -> bounded block queue -> resampler -> streaming Detector), run in the
background with its detections going to the DetectionBus instead of stdout."""

import logging
import math
import queue
import threading

import numpy as np

from kws.errors import KwsError
from kws.listen import (QUEUE_SECONDS, Counters, Worker, file_rate, input_settings,
                        open_microphone, parse_device, play_file, put_end)
from kws.stream import Detection, Detector

from app.bus import DetectionBus
from app.predict import TOP_K
from app.schemas import InputLevel, LiveScores, Score

log = logging.getLogger("kws.serve")

BLOCK_SECONDS = 0.032  # kws listen's default block
SCORES_EVERY_S = 0.25  # how often the dashboard's top scores and level meter update
SILENT_DBFS = -60.0  # RMS below this: a muted or unplugged microphone, not a quiet room
CLIPPING = 0.999  # a sample this close to full scale (16-bit PCM peaks at 1 - 2**-15)


def dbfs(amplitude: float) -> float:
    return 20 * math.log10(max(amplitude, 1e-6))  # -120 dBFS for digital silence


class MeteredBlocks(queue.Queue):
    """The listener's block queue, measuring the level of each block the worker takes (in the
    worker's thread, which also reads the level: no lock needed). The end marker (None) and a
    source's AudioError pass unmeasured."""

    def __init__(self, maxsize: int):
        super().__init__(maxsize)
        self.squares, self.samples, self.peak = 0.0, 0, 0.0

    def get(self, block=True, timeout=None):
        audio = super().get(block, timeout)
        if isinstance(audio, np.ndarray) and len(audio):
            self.squares += float(np.dot(audio, audio))
            self.samples += len(audio)
            self.peak = max(self.peak, float(np.abs(audio).max()))
        return audio

    def level(self, time_s: float) -> InputLevel | None:
        """The level since the last call, or None when no audio came."""
        if not self.samples:
            return None
        rms = math.sqrt(self.squares / self.samples)
        state = ("clipping" if self.peak >= CLIPPING else
                 "silent" if dbfs(rms) < SILENT_DBFS else "listening")
        level = InputLevel(time_s=time_s, rms_dbfs=dbfs(rms), peak_dbfs=dbfs(self.peak),
                           state=state)
        self.squares, self.samples, self.peak = 0.0, 0, 0.0
        return level


class LiveListener:
    """Start with `start()` (raises KwsError when there is no usable source), end with `stop()`."""

    def __init__(self, engine, bus: DetectionBus, device: str | None = None,
                 input_file: str | None = None, threshold=None, words=None):
        # Its own stream state; the engine is shared read-only.
        self.detector = Detector(engine, threshold=threshold, words=words)
        self.bus = bus
        self.device, self.input_file = device, input_file
        self.counters = Counters()
        self.blocks = MeteredBlocks(maxsize=math.ceil(QUEUE_SECONDS / BLOCK_SECONDS))
        self._stop = threading.Event()  # tells the file player to end the queue
        self._mic = None
        self._worker: Worker | None = None
        self._threads: list[threading.Thread] = []
        self._scores_at = 0.0  # stream time of the last scores published

    @property
    def queue_depth(self) -> int:
        return self.blocks.qsize()

    @property
    def running(self) -> bool:
        return bool(self._threads) and self._threads[0].is_alive()

    @property
    def problem(self) -> str | None:
        """Why the input file ended early (damaged, truncated, not numbers), or None."""
        error = self._worker.source_error if self._worker is not None else None
        return None if error is None else str(error)

    def start(self) -> str:
        """Open the input and start; returns what it listens to."""
        if self.input_file:
            rate = file_rate(self.input_file)
            self._threads.append(threading.Thread(
                target=play_file, name="kws-file", daemon=True,
                args=(self.input_file, BLOCK_SECONDS, False, self.blocks, self._stop)))
            source = f"{self.input_file} (played in real time)"
        else:
            index, rate, name = input_settings(parse_device(self.device), None)
            self._mic = open_microphone(index, rate, BLOCK_SECONDS, self.blocks, self.counters)
            source = f"input device {name!r} at {rate} Hz"
        self._worker = Worker(self.detector, rate, self.blocks, self._publish)
        self._threads.insert(0, threading.Thread(target=self._detect_blocks, name="kws-detector",
                                                 daemon=True))
        for thread in self._threads:
            thread.start()
        return source

    def stop(self):
        self._stop.set()
        if self._mic is not None:
            self._mic.stop()
            self._mic.close()
            put_end(self.blocks)
        for thread in self._threads:
            thread.join(timeout=2)

    def _detect_blocks(self):
        self._worker.run()
        if self._worker.error is not None:  # the service goes on without its listener, and says why
            e = self._worker.error
            log.error("kws serve: the live listener failed: %s: %s", type(e).__name__, e)
            return
        if self.problem is not None:
            log.error("kws serve: the live listener's input ended early, after %.1f s of audio: %s",
                      self.detector.time_s, self.problem)
            return
        log.info("kws serve: the live listener stopped after %.1f s of audio", self.detector.time_s)

    def _publish(self, found: list[Detection]):
        for d in found:
            self.bus.publish(d.time_s, d.label, d.score)
        if self.detector.time_s - self._scores_at >= SCORES_EVERY_S:
            self._scores_at = self.detector.time_s
            best = sorted(self.detector.scores.items(), key=lambda kv: kv[1], reverse=True)
            self.bus.publish_scores(LiveScores(
                time_s=self.detector.time_s,
                top=[Score(label=k, score=v) for k, v in best[:TOP_K]]))
            if (level := self.blocks.level(self.detector.time_s)) is not None:
                self.bus.publish_level(level)


def start_listener(engine, bus: DetectionBus, device, input_file, threshold=None,
                   words=None) -> tuple[LiveListener | None, str | None]:
    """(a running listener, None), or (None, why not): without a usable input the service logs
    one line and goes on serving /predict."""
    listener = LiveListener(engine, bus, device, input_file, threshold, words)
    try:
        source = listener.start()
    except KwsError as e:
        log.warning("kws serve: live listener unavailable (%s); serving /predict only", e)
        return None, str(e)
    log.info("kws serve: listening to %s", source)
    return listener, None
