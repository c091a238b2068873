"""`kws bench hardening`: the service under hostile clients, measured on a running `kws serve`.

- slow clients: N connections that send an upload at 1 byte per second (reconnecting when the
  server hangs up), while a normal client sends a clip every half second: the normal client's
  worst latency, and what the slow ones got;
- crafted files: a 335-KB FLAC declaring 60 s of 8-channel audio at 640 kHz, and a 60-s
  8-channel FLAC at 192 kHz (the largest accepted), sent 4 at once: peak RSS growth, beside a
  plain 60-s 16-kHz mono FLAC (the model's own cost for a clip that long);
- a seeded mutation fuzz of /predict (`mutated_uploads`, also run by the tests): status codes.
"""

import io
import json
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import soundfile as sf

from app.bench import Connection, Server, wav_clip
from kws.audio import SAMPLE_RATE
from kws.bench import bench_audio, machine
from kws.errors import KwsError

CONTENT_TYPES = ("audio/wav", "audio/flac", "audio/ogg", "audio/mpeg", "audio/x-anything",
                 "multipart/form-data")


def encoded(samples: np.ndarray, rate: int, fmt: str, subtype: str | None = None) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def silence_flac(rate: int, channels: int, seconds: float) -> bytes:
    """Silence written a tenth of a second at a time: tiny however long it declares to be."""
    buffer, block = io.BytesIO(), np.zeros((rate // 10, channels), np.float32)
    with sf.SoundFile(buffer, "w", rate, channels, format="FLAC") as f:
        for _ in range(round(seconds * 10)):
            f.write(block)
    return buffer.getvalue()


def seed_files() -> list[bytes]:
    """Valid uploads of every format the service takes, to be mutated."""
    mono = bench_audio(0.5)
    stereo = np.stack([mono, mono[::-1]], axis=1)
    return [encoded(mono, SAMPLE_RATE, "WAV", "PCM_16"), encoded(mono, SAMPLE_RATE, "WAV", "FLOAT"),
            encoded(stereo, 44100, "WAV", "PCM_24"), encoded(mono, SAMPLE_RATE, "FLAC"),
            encoded(stereo, 48000, "FLAC"), encoded(mono, SAMPLE_RATE, "OGG", "VORBIS"),
            encoded(mono, SAMPLE_RATE, "MP3")]


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One to three random edits: flipped bits, a run of random bytes, a header field set to an
    extreme value, a cut, a repeated or removed stretch."""
    data = bytearray(data)
    for _ in range(rng.integers(1, 4)):
        at = int(rng.integers(0, max(1, len(data))))
        kind = rng.integers(0, 6)
        if kind == 0:
            for i in rng.integers(0, len(data), size=rng.integers(1, 9)):
                data[i] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:
            run = rng.integers(0, 256, size=rng.integers(1, 65), dtype=np.uint8).tobytes()
            data[at:at + len(run)] = run
        elif kind == 2:  # a header field (rate, channels, sizes: the first 64 bytes) at an extreme
            field = int(rng.integers(4, 60))
            data[field:field + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00",
                                                b"\xff\xff\xff\x7f", b"\x01\x00\x00\x00"])
        elif kind == 3:
            del data[at:]
        elif kind == 4:
            data[at:at] = data[at:at + int(rng.integers(1, 4096))]
        else:
            del data[at:at + int(rng.integers(1, 4096))]
    return bytes(data)


def mutated_uploads(count: int, seed: int = 0):
    """`count` (body, content type) pairs: seeded mutations of valid files of every format."""
    rng = np.random.default_rng(seed)
    seeds = seed_files()
    for _ in range(count):
        yield mutate(seeds[rng.integers(len(seeds))], rng), str(rng.choice(CONTENT_TYPES))


def multipart(data: bytes) -> tuple[bytes, str]:
    boundary = "kwsbenchboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"clip\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    return body + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(server: Server, body: bytes, content_type: str, timeout: float = 120) -> tuple[int, float]:
    """(status, seconds) of one POST /predict on a new connection."""
    if content_type == "multipart/form-data":
        body, content_type = multipart(body)
    conn = Connection("127.0.0.1", server.port, timeout=timeout)
    started = time.perf_counter()
    try:
        conn.request("POST", "/predict", body=body,
                     headers={**server.headers, "Content-Type": content_type})
        response = conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - started
    finally:
        conn.close()


def fuzz(server: Server, count: int, seed: int) -> Counter:
    with ThreadPoolExecutor(4) as pool:
        statuses = pool.map(lambda upload: post(server, *upload)[0], mutated_uploads(count, seed))
        return Counter(statuses)


def slow_clients(server: Server, clients: int, seconds: float, clip: bytes) -> dict:
    """`clients` connections trickling an upload at 1 byte/s, reconnecting when cut off, while
    one normal client sends `clip` every half second."""
    head = (b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: audio/wav\r\n"
            b"Content-Length: %d\r\n\r\n" % len(clip))
    stop, replies, lock = threading.Event(), Counter(), threading.Lock()

    def trickle():
        while not stop.is_set():
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
                try:
                    conn.sendall(head)
                    for byte in clip:
                        if stop.wait(1.0):
                            return
                        conn.sendall(bytes([byte]))
                except OSError:
                    pass  # the server hung up: read what it said, then come back
                conn.settimeout(1.0)
                try:
                    reply = conn.recv(64).split(b" ")[1].decode() or "closed"
                except (OSError, IndexError):
                    reply = "closed"
                with lock:
                    replies[reply] += 1

    threads = [threading.Thread(target=trickle, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # every slow client has sent its headers
    latencies, statuses = [], Counter()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status, took = post(server, clip, "audio/wav", timeout=60)
        statuses[status] += 1
        latencies.append(took)
        time.sleep(0.5)
    health = server.get("/health")["status"]
    stop.set()
    for thread in threads:
        thread.join(5)
    return {"slow_clients": clients, "seconds": seconds, "normal_requests": len(latencies),
            "normal_statuses": dict(statuses), "normal_max_s": max(latencies),
            "normal_median_s": float(np.median(latencies)), "health_during": health,
            "slow_client_replies": dict(replies)}


def crafted(server: Server, data: bytes, at_once: int) -> dict:
    before = server.get("/stats")["peak_rss_bytes"]
    with ThreadPoolExecutor(at_once) as pool:
        results = list(pool.map(lambda _: post(server, data, "audio/flac"), range(at_once)))
    after = server.get("/stats")["peak_rss_bytes"]
    return {"bytes": len(data), "at_once": at_once,
            "statuses": dict(Counter(status for status, _ in results)),
            "max_s": max(took for _, took in results), "peak_rss_growth_bytes": after - before}


def counts_text(counts: dict) -> str:
    """{422: 4, '408': 2} -> '408: 2, 422: 4' (HTTP statuses, whichever type their keys have)."""
    return ", ".join(f"{key}: {n}" for key, n in sorted(counts.items(), key=lambda kv: str(kv[0])))


def bench_hardening(args) -> int:
    if args.slow_clients < 1 or args.fuzz < 1 or min(args.seconds, args.crafted_seconds) <= 0:
        raise KwsError("--slow-clients, --fuzz, --seconds and --crafted-seconds must be positive")
    clip = wav_clip(1.0)
    seconds = args.crafted_seconds
    # the plain 16-kHz mono clip of the same length is the reference: what any clip that long
    # costs the model, whatever its file format
    # costs the model, whatever its file format. Peak RSS only grows: the crafted 640-kHz file
    # goes first, the 192-kHz one after the reference, so it shows what it adds to it.
    files = {f"640 kHz x 8 ch, {seconds:g} s": silence_flac(640_000, 8, seconds),
             f"16 kHz mono, {seconds:g} s (reference)": silence_flac(SAMPLE_RATE, 1, seconds),
             f"192 kHz x 8 ch, {seconds:g} s": silence_flac(192_000, 8, seconds)}
    with Server(args.model, None) as server:
        for _ in range(20):
            post(server, clip, "audio/wav")  # warm-up: first requests allocate
        result = {"machine": machine(),
                  "crafted": {name: crafted(server, data, 4) for name, data in files.items()},
                  "slow": slow_clients(server, args.slow_clients, args.seconds, clip),
                  "fuzz": {"uploads": args.fuzz, "seed": args.seed,
                           "statuses": dict(sorted(fuzz(server, args.fuzz, args.seed).items()))}}
        result["health_after"] = server.get("/health")["status"]
    server_errors = sum(n for status, n in result["fuzz"]["statuses"].items() if status >= 500)
    server_errors += sum(n for c in result["crafted"].values()
                         for status, n in c["statuses"].items() if status >= 500)
    if args.json:
        print(json.dumps(result))
    else:
        m, slow = result["machine"], result["slow"]
        print(f"kws serve on {m['cpu']} ({m['cpus']} CPUs)")
        for name, c in result["crafted"].items():
            print(f"FLAC {name} ({c['bytes']:,} bytes), {c['at_once']} at once: "
                  f"statuses {counts_text(c['statuses'])}, slowest {c['max_s']:.2f} s, peak RSS "
                  f"{c['peak_rss_growth_bytes'] / 2**20:+.1f} MiB")
        print(f"{slow['slow_clients']} clients at 1 byte/s for {slow['seconds']:g} s: a normal "
              f"/predict took {slow['normal_median_s'] * 1000:.0f} ms median, "
              f"{slow['normal_max_s'] * 1000:.0f} ms at most ({counts_text(slow['normal_statuses'])}); "
              f"/health said {slow['health_during']}; the slow clients got "
              f"{counts_text(slow['slow_client_replies']) or 'no answer while the run lasted'}")
        print(f"mutation fuzz, {args.fuzz:,} uploads (seed {args.seed}): statuses "
              f"{counts_text(result['fuzz']['statuses'])}")
        print(f"server errors (5xx): {server_errors}; /health after: {result['health_after']}")
    return 1 if server_errors else 0


def register(bench_sub):
    p = bench_sub.add_parser("hardening", help="kws serve under slow clients, crafted files "
                             "and a mutation fuzz")
    p.add_argument("--model", help="model file or checkpoint to serve (default: the shipped "
                   "model or $KWS_MODEL)")
    p.add_argument("--slow-clients", type=int, default=12, help="clients sending 1 byte/s (12)")
    p.add_argument("--seconds", type=float, default=15.0,
                   help="how long the slow clients run (15; the read deadline is 5)")
    p.add_argument("--crafted-seconds", type=float, default=60.0,
                   help="length the crafted FLACs declare (60: the longest accepted)")
    p.add_argument("--fuzz", type=int, default=2000, help="mutated uploads (2000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the fuzz (0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=bench_hardening)
