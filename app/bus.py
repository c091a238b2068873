"""Live detections: a bounded buffer for /detections, and fan-out to /events subscribers.

`publish` may be called from any thread (the listener runs in its own); subscribers are
asyncio queues read on the event loop. A slow subscriber loses its oldest undelivered events
rather than growing without bound."""

import asyncio
import itertools
import threading
import time
from collections import deque

from app.schemas import InputLevel, LiveDetection, LiveScores

SUBSCRIBER_QUEUE = 256  # events one /events client may fall behind by


class DetectionBus:
    def __init__(self, loop: asyncio.AbstractEventLoop, kept: int):
        self._loop = loop
        self._recent: deque[LiveDetection] = deque(maxlen=kept)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._subscribers: set[asyncio.Queue] = set()
        self.total = 0

    def publish(self, time_s: float, label: str, score: float) -> LiveDetection:
        with self._lock:
            detection = LiveDetection(id=next(self._ids), at=time.time(), time_s=time_s,
                                      label=label, score=score)
            self._recent.append(detection)
            self.total += 1
        self._loop.call_soon_threadsafe(self._fan_out, ("detection", detection))
        return detection

    def publish_scores(self, scores: LiveScores):
        """The listener's current best scores, for the dashboard."""
        self._loop.call_soon_threadsafe(self._fan_out, ("scores", scores))

    def publish_level(self, level: InputLevel):
        """The live input's level, for the dashboard's meter."""
        self._loop.call_soon_threadsafe(self._fan_out, ("level", level))

    def close(self):
        """End every /events stream (the server is stopping); any thread may call it."""
        self._loop.call_soon_threadsafe(self._fan_out, ("close", None))

    def since(self, unix_time: float) -> list[LiveDetection]:
        with self._lock:
            return [d for d in self._recent if d.at > unix_time]

    def _fan_out(self, event):
        for queue in self._subscribers:
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(event)

    def subscribe(self) -> asyncio.Queue:
        """Call on the event loop; pair with `unsubscribe`."""
        queue = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue):
        self._subscribers.discard(queue)

    @property
    def subscribers(self) -> int:
        """How many /events clients are connected."""
        return len(self._subscribers)
