"""Process health: memory, request counts, and the same numbers in Prometheus format."""

import asyncio
import resource
import sys
import time
from collections import Counter, deque

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from app.schemas import Stats


def memory_bytes() -> tuple[int, int]:
    """(resident now, peak resident) of this process. Linux reads /proc; elsewhere the peak
    stands in for both."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
    except (OSError, KeyError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
        return peak, peak


class RssHistory:
    """Resident memory sampled every `interval_s` (the last ten minutes by default), so that the
    dashboard's chart is full from the moment it loads."""

    def __init__(self, interval_s: float = 2.0, kept: int = 300):
        self.interval_s = interval_s
        self.samples: deque[tuple[float, int]] = deque(maxlen=kept)

    def record(self):
        self.samples.append((time.time(), memory_bytes()[0]))

    async def run(self):
        while True:
            self.record()
            await asyncio.sleep(self.interval_s)


class RequestCounts:
    """Answered HTTP requests by route template and status code, and those in progress."""

    def __init__(self):
        self.counts: Counter[tuple[str, int]] = Counter()
        self.in_flight = 0

    def by_route(self) -> dict[str, dict[str, int]]:
        table: dict[str, dict[str, int]] = {}
        for (route, status), n in sorted(self.counts.items()):
            table.setdefault(route, {})[str(status)] = n
        return table


class CountRequests:
    """ASGI middleware filling a RequestCounts (it runs on the event loop: no locks needed)."""

    def __init__(self, app, counts: RequestCounts):
        self.app, self.counts = app, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # what the server answers when the app fails before responding

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.counts.in_flight += 1
        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.counts.in_flight -= 1
            route = scope.get("route")  # set by the router once it matched an API route
            # The docs and schema are plain routes (no "route" in scope): named by their path
            # when answered; a refused or unknown path is not a name worth a counter of its own.
            name = route.path if route else scope["path"] if status < 400 else "(unmatched)"
            self.counts.counts[(name, status)] += 1


def prometheus_registry(snapshot) -> CollectorRegistry:
    """A registry whose every scrape renders `snapshot()` (a Stats), so /metrics and /stats
    always agree."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(snapshot))
    return registry


GAUGES = {
    "rss_bytes": "Resident memory of the process",
    "peak_rss_bytes": "Largest resident memory since start-up",
    "model_parameters": "Parameters of the served model",
    "model_bytes": "Memory of the model parameters",
    "stream_state_bytes": "Memory of one stream's state",
    "audio_queue_depth": "Audio blocks waiting for the live listener",
    "uptime_s": "Seconds since start-up",
    "in_flight": "Requests being answered now",
}
COUNTERS = {
    "dropped_frames": "Audio frames the live listener could not keep up with",
    "detections": "Live detections since start-up",
    "classify_batches": "Batches /predict's clips were classified in",
    "classified_clips": "Clips /predict classified",
}


class _StatsCollector:
    def __init__(self, snapshot):
        self.snapshot = snapshot

    def collect(self):
        stats: Stats = self.snapshot()
        for name, help_text in GAUGES.items():
            yield GaugeMetricFamily(f"kws_{name}", help_text, value=getattr(stats, name))
        for name, help_text in COUNTERS.items():
            yield CounterMetricFamily(f"kws_{name}", help_text, value=getattr(stats, name))
        requests = CounterMetricFamily("kws_http_requests", "HTTP requests answered",
                                       labels=["route", "status"])
        for route, by_status in stats.requests.items():
            for status, n in by_status.items():
                requests.add_metric([route, status], n)
        yield requests
        listener = GaugeMetricFamily("kws_listener_running", "1 while the live listener runs")
        listener.add_metric([], stats.listener.state == "running")
        yield listener
