"""`kws serve`: the HTTP service in app/ (FastAPI) under uvicorn."""

import json
import logging
import signal
import socket
from contextlib import contextmanager

from kws.errors import KwsError

GRACEFUL_SHUTDOWN_S = 3  # then requests still open are cancelled


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a taken port is a one-line error."""
    try:
        family, kind, proto, _, _ = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        # proto must say TCP: asyncio turns Nagle's algorithm off only on sockets that do, and
        # with it on every response's body waits ~40 ms for the client's delayed ACK.
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen()  # now, so a second server on the same port fails here, not later
    except OSError as e:
        raise KwsError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def server(app, read_timeout_s: float, log_level: str = "info", access_log: bool = True):
    """The uvicorn server `kws serve` runs: h11 with a deadline for every request's head (a
    client that never finishes its headers is disconnected; uvicorn has no such deadline) and
    JSON for the 400 it answers to malformed HTTP itself; idle keep-alive connections close after
    the same time. Stopping also ends open /events streams."""
    import h11
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _head_deadline = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._expect_head()

        def on_response_complete(self):
            super().on_response_complete()
            self._expect_head()

        def connection_lost(self, exc):
            self._head_deadline.cancel()
            super().connection_lost(exc)

        def _expect_head(self):
            if self._head_deadline is not None:
                self._head_deadline.cancel()
            self._head_deadline = self.loop.call_later(read_timeout_s, self._close_if_no_head)

        def _close_if_no_head(self):
            if self.conn.their_state is h11.IDLE:  # no complete request head since the deadline was set
                self.transport.close()

        def send_400_response(self, msg: str):
            body = json.dumps({"detail": f"malformed HTTP request: {msg}"}).encode()
            for event in (h11.Response(status_code=400, headers=[
                              (b"content-type", b"application/json"),
                              (b"content-length", str(len(body)).encode()),
                              (b"connection", b"close")]),
                          h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
            self.transport.close()

    class Server(uvicorn.Server):
        stopped_by: int | None = None  # the signal that stopped the server

        def handle_exit(self, sig, frame):
            if self.stopped_by is None:
                self.stopped_by = sig
            service = getattr(self.config.app.state, "service", None)  # None before start-up
            if service is not None:
                service.bus.close()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, http=Protocol, log_level=log_level, access_log=access_log,
                            timeout_keep_alive=read_timeout_s,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    return Server(config)


def serve(args):
    from app.main import create_app
    from app.settings import from_env, url_host, with_network_token
    from kws.cli import load_engine
    from kws.listen import file_rate
    from kws.stream import Detector

    settings = from_env(model=args.model, host=args.host, port=args.port, listen=args.listen,
                        device=args.device, listen_input=args.input, workers=args.workers,
                        threshold=args.threshold, words=args.words, threads=args.threads)
    if settings.listen_input and not settings.listen:
        raise KwsError("--input plays a file to the live listener: add --listen")
    if settings.listen_input:  # a named file that is missing is a mistake: say so now
        file_rate(settings.listen_input)
    engine = load_engine(args.model)  # before binding: a bad model file is a one-line error
    Detector(engine, threshold=settings.threshold, words=settings.words)  # likewise unknown words
    sock = bind(settings.host, settings.port)
    logging.basicConfig(format="%(levelname)s:     %(message)s", level=args.log_level.upper())
    log = logging.getLogger("kws.serve")
    log.info("kws serve: http://%s:%d (dashboard at /, API docs at /docs)",
             url_host(settings.host), settings.port)
    settings, token_made = with_network_token(settings)
    if token_made:
        log.warning("kws serve: %s is reachable from the network and KWS_API_TOKEN is not set; "
                    "the token for this run is %s: open http://HOST:%d/#token=%s (set "
                    "KWS_API_TOKEN to keep one, or KWS_ALLOW_ANONYMOUS=1 to serve without)",
                    url_host(settings.host), settings.api_token, settings.port, settings.api_token)
    elif settings.open_to_network:
        log.warning("kws serve: KWS_ALLOW_ANONYMOUS=1: anyone who can reach %s:%d can follow "
                    "what the microphone hears", url_host(settings.host), settings.port)
    # uvicorn re-raises the signal it caught once it has shut down. For SIGTERM that would exit
    # 143; for SIGINT it lands in asyncio's own handler, which raises KeyboardInterrupt only if
    # the server's task still has an await ahead of it: a race. Both are ignored here, and the
    # exit status comes from the signal the server recorded: 0 after SIGTERM (a clean stop),
    # 130 after Ctrl-C, as for every kws command.
    running = server(create_app(settings, engine), settings.read_timeout_s, args.log_level,
                     not args.no_access_log)
    with ignored_signals(signal.SIGINT, signal.SIGTERM):
        running.run(sockets=[sock])
    return 130 if running.stopped_by == signal.SIGINT else 0


@contextmanager
def ignored_signals(*signals):
    """Ignore these signals around the block (uvicorn installs its own handlers inside it and
    restores these at its end, before re-raising what it caught)."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def register(sub):
    from kws.cli import COMMANDS
    from kws.listen import argument
    from kws.stream import DEFAULT_THRESHOLD, parse_threshold, parse_words

    p = sub.add_parser("serve", help=COMMANDS["serve"][1],
                       description="Serve the model over HTTP (settings also from KWS_* "
                       "environment variables; flags win). Dashboard at http://HOST:PORT/, "
                       "API docs at /docs.")
    p.add_argument("--model", help="model file from kws export, or a checkpoint (default: $KWS_MODEL or the shipped model)")
    p.add_argument("--host", help="address to bind ($KWS_HOST, default 127.0.0.1: this machine "
                   "only; 0.0.0.0 for every interface, where a token is required: "
                   "$KWS_API_TOKEN, or one made for the run and printed, unless "
                   "$KWS_ALLOW_ANONYMOUS=1)")
    p.add_argument("--port", type=int, help="TCP port ($KWS_PORT, default 8000)")
    p.add_argument("--listen", action="store_true", default=None,
                   help="also run the microphone listener in the background ($KWS_LISTEN=1)")
    p.add_argument("--device", help="input device for --listen, name or index ($KWS_DEVICE)")
    p.add_argument("--input", metavar="FILE", help="with --listen: play this audio file to the "
                   "listener in real time instead of a device ($KWS_LISTEN_INPUT)")
    p.add_argument("--threshold", type=argument(parse_threshold),
                   help="detection probability for the listener and long /predict clips, as in "
                   "`kws listen` ($KWS_THRESHOLD; default: the model's own per-word "
                   f"thresholds, {DEFAULT_THRESHOLD} for a word without one; per word: "
                   "yes=0.98,no=0.99; or a JSON file of them, {\"thresholds\": {\"yes\": 0.9}})")
    p.add_argument("--words", type=argument(parse_words), help="report only these words, comma "
                   "separated ($KWS_WORDS, default: the words the model has thresholds for, as in `kws listen`)")
    p.add_argument("--workers", type=int, help="threads that decode uploads ($KWS_WORKERS, default 2)")
    p.add_argument("--threads", type=int, help="BLAS threads per inference ($KWS_THREADS, default 1: "
                   "parallel requests beat parallel operations)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"], help="(info)")
    p.add_argument("--no-access-log", action="store_true", help="do not log every request")
    p.set_defaults(func=serve)
