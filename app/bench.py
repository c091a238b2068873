"""`kws bench http`: throughput, latency and memory growth of the HTTP service under load.

Starts `kws serve` as a child process on a free loopback port, warms it up, then drives it with
N concurrent clients (threads, each with one keep-alive connection) that POST the same WAV clip
to /predict, and reads the server's RSS from /stats before and after the timed requests.
"""

import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import soundfile as sf

from app.settings import from_env
from kws.audio import SAMPLE_RATE
from kws.bench import bench_audio, machine
from kws.errors import KwsError

START_TIMEOUT_S = 120


class Connection(http.client.HTTPConnection):
    """A keep-alive connection that sends without delay, as curl, urllib3 and httpx do.
    http.client sends a request's headers and body in two writes; under Nagle's algorithm the
    body then waits for the server's delayed ACK of the headers, about 40 ms on Linux, which
    would be measured as the server's latency."""

    def connect(self):
        super().connect()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wav_clip(seconds: float) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, bench_audio(seconds), SAMPLE_RATE, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


class Server:
    """`kws serve` in a child process, for as long as the `with` block runs."""

    def __init__(self, model: str | None, workers: int | None):
        self.port = free_port()
        self.argv = [sys.executable, "-m", "kws.cli", "serve", "--port", str(self.port),
                     "--no-access-log", "--log-level", "warning"]
        self.argv += ["--model", model] if model else []
        self.argv += ["--workers", str(workers)] if workers else []
        self.headers = {}
        if os.environ.get("KWS_API_TOKEN"):
            self.headers["Authorization"] = f"Bearer {os.environ['KWS_API_TOKEN']}"

    def __enter__(self):
        self.process = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise KwsError(f"kws serve exited: {self.process.stderr.read().decode()[-500:]}")
            try:
                self.get("/health")
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise KwsError(f"kws serve did not answer within {START_TIMEOUT_S} s") from None
                time.sleep(0.2)

    def __exit__(self, *exc):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stderr.close()

    def get(self, path: str) -> dict:
        conn = Connection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", path, headers=self.headers)
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def cpu_seconds(self) -> float:
        """CPU time the server process has used (user + system), from /proc (Linux)."""
        with open(f"/proc/{self.process.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drive(server: Server, body: bytes, requests: int, clients: int) -> tuple[list[float], int, float]:
    """(latency of each request in seconds, failed requests, wall seconds) for `requests` POSTs
    shared by `clients` threads, each on its own keep-alive connection."""
    remaining = iter(range(requests))
    take = threading.Lock()
    headers = {**server.headers, "Content-Type": "audio/wav"}

    def client() -> tuple[list[float], int]:
        conn = Connection("127.0.0.1", server.port, timeout=60)
        latencies, failed = [], 0
        while True:
            with take:
                if next(remaining, None) is None:
                    break
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/predict", body=body, headers=headers)
                response = conn.getresponse()
                response.read()
            except OSError as e:
                raise KwsError(f"the server stopped answering: {e}") from None
            latencies.append(time.perf_counter() - t0)
            failed += response.status != 200
        conn.close()
        return latencies, failed

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda _: client(), range(clients)))
    wall = time.perf_counter() - started
    return [t for lat, _ in results for t in lat], sum(f for _, f in results), wall


def percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def bench_http(args) -> int:
    if args.requests < 1 or args.clients < 1:
        raise KwsError("--requests and --clients must be positive")
    limits = from_env(workers=args.workers)
    if not limits.min_duration_s <= args.clip_seconds <= limits.max_duration_s:
        raise KwsError(f"--clip-seconds must be from {limits.min_duration_s:g} to {limits.max_duration_s:g} s, "
                       f"the clips /predict takes (got {args.clip_seconds:g})")
    body = wav_clip(args.clip_seconds)
    with Server(args.model, args.workers) as server:
        idle = server.get("/stats")  # started, no request served yet
        drive(server, body, args.warmup, args.clients)  # first requests allocate and pick kernels
        before = server.get("/stats")
        server_cpu, client_cpu = server.cpu_seconds(), time.process_time()
        latencies, failed, wall = drive(server, body, args.requests, args.clients)
        server_cpu, client_cpu = server.cpu_seconds() - server_cpu, time.process_time() - client_cpu
        after = server.get("/stats")
    rss_before, rss_after = before["rss_bytes"], after["rss_bytes"]
    batches = after["classify_batches"] - before["classify_batches"]
    result = {
        "machine": machine(), "requests": args.requests, "clients": args.clients,
        "clip_seconds": args.clip_seconds, "workers": limits.workers,
        "failed": failed,
        "requests_per_s": args.requests / wall,
        "p50_ms": percentile(latencies, 50) * 1000, "p99_ms": percentile(latencies, 99) * 1000,
        "rss_idle_bytes": idle["rss_bytes"],
        "rss_before_bytes": rss_before, "rss_after_bytes": rss_after,
        "rss_growth_bytes": rss_after - rss_before,
        # CPU per request, which other load on the machine barely changes (unlike the rate)
        "server_cpu_ms_per_request": server_cpu / args.requests * 1000,
        "client_cpu_ms_per_request": client_cpu / args.requests * 1000,
        "mean_batch": (after["classified_clips"] - before["classified_clips"]) / max(1, batches),
    }
    if args.json:
        print(json.dumps(result))
    else:
        m = result["machine"]
        print(f"kws serve on {m['cpu']} ({m['cpus']} CPUs), {result['workers']} decoding threads; "
              f"{args.clients} clients on loopback, {args.requests:,} POST /predict of a "
              f"{args.clip_seconds:g}-s WAV after {args.warmup} warm-up requests")
        print(f"throughput: {result['requests_per_s']:.1f} requests/s ({failed} failed)")
        print(f"latency:    p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms")
        print(f"RSS:        {idle['rss_bytes'] / 2**20:.1f} MiB idle, {rss_before / 2**20:.1f} MiB "
              f"after warm-up, {rss_after / 2**20:.1f} MiB after the timed requests "
              f"({result['rss_growth_bytes'] / 2**20:+.1f} MiB)")
        print(f"CPU:        {result['server_cpu_ms_per_request']:.2f} ms per request in the server, "
              f"{result['client_cpu_ms_per_request']:.2f} ms in the clients")
        print(f"batching:   {result['mean_batch']:.2f} clips per batch on average")
    return 1 if failed else 0


def register(bench_sub):
    p = bench_sub.add_parser("http", help="requests/s, latency and memory growth of kws serve "
                             "under concurrent /predict load")
    p.add_argument("--model", help="model file or checkpoint (default: $KWS_MODEL or the shipped model)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (8)")
    p.add_argument("--requests", type=int, default=2000, help="timed requests (2000)")
    p.add_argument("--warmup", type=int, default=200, help="untimed requests first (200)")
    p.add_argument("--clip-seconds", type=float, default=1.0, help="length of the WAV clip (1)")
    p.add_argument("--workers", type=int, help="the server's decoding threads (default 2)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=bench_http)
