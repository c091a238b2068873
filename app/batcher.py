"""Dynamic batching for /predict: one inference thread classifies the clips of concurrent
requests together.

Why: the model is small, so a clip's classification is mostly the fixed cost of each NumPy
call, paid once per batch however many clips it holds. And one thread running the model never waits on
another for Python's GIL, as two inference threads did. Clips of equal length share a batch;
clips of other lengths go in their own, so nothing is padded and every answer is exactly what
the clip alone would get.
"""

import ctypes
import queue
import threading
from concurrent.futures import Future

import numpy as np

_STOP = object()
# glibc's malloc gives a freed block of 128 KB or more back to the system at once (munmap, or a
# trim of the heap's top), so the arrays of every batch (hundreds of KB each) were page-faulted
# in afresh, which is slow in a VM: on the development machine, the table lookups of a batch
# were several times slower than the same lookups repeated. Blocks under MMAP_ABOVE_BYTES now
# come from the heap, and up to KEEP_FREED_BYTES of free heap is kept for the next batch.
MMAP_ABOVE_BYTES = 16 << 20
KEEP_FREED_BYTES = 64 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def reuse_freed_memory() -> bool:
    """Ask the C library's malloc to keep freed memory for reuse (process-wide; there is no
    undoing it). False where it cannot: no mallopt (macOS), or one that refuses (musl's does
    nothing and says so)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return (mallopt(_M_MMAP_THRESHOLD, MMAP_ABOVE_BYTES) == 1
            and mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES) == 1)


class ClipBatcher:
    """submit(clip) -> Future of the clip's logits (n_classes,), from the engine's `classify`
    (kws.runtime.StreamEngine)."""

    def __init__(self, engine, max_batch: int = 16):
        self.engine = engine
        self.max_batch = max_batch
        self.batches = 0  # batches run, and the clips in them, for /stats
        self.clips = 0
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="kws-batcher", daemon=True)
        self._thread.start()

    def submit(self, clip: np.ndarray) -> Future:
        """Queue a float32 mono 16-kHz clip for classification."""
        future: Future = Future()
        self._queue.put((np.ascontiguousarray(clip, dtype=np.float32), future))
        return future

    def stop(self):
        """Finish the queued clips, then end the thread."""
        self._queue.put(_STOP)
        self._thread.join()

    def _run(self):
        while True:
            waiting = [self._queue.get()]
            # Whatever else is already queued joins this round: batching adds no waiting.
            while len(waiting) < self.max_batch:
                try:
                    waiting.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = _STOP in waiting
            by_length: dict[int, list] = {}
            for item in waiting:
                if item is not _STOP:
                    by_length.setdefault(len(item[0]), []).append(item)
            for items in by_length.values():
                self._classify(items)
            if stop:
                return

    def _classify(self, items: list):
        items = [(clip, f) for clip, f in items if f.set_running_or_notify_cancel()]  # not cancelled
        if not items:
            return
        clips = np.stack([clip for clip, _ in items])
        futures = [f for _, f in items]
        try:
            logits = self.engine.classify(clips)
        except Exception as e:  # a failure answers its requests; the thread goes on serving
            for f in futures:
                f.set_exception(e)
            return
        self.batches += 1
        self.clips += len(futures)
        for f, row in zip(futures, logits):
            f.set_result(row)
