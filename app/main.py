"""The HTTP service: `create_app(settings)` builds the FastAPI application that `kws serve` runs.

The lifespan loads the model once and builds the shared `Service`; endpoints reach it through
the `get_service` dependency. Nothing heavy runs on the event loop: uploads are decoded in a
small thread pool, and one batching thread classifies them (app.batcher).
"""

import asyncio
import json
import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Query, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from pydantic.json_schema import models_json_schema
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from threadpoolctl import threadpool_limits

from kws import __version__
from kws.audio import SAMPLE_RATE, AudioError
from kws.cli import load_engine
from kws.errors import KwsError
from kws.runtime import StreamEngine
from kws.stream import Detector

from app.bus import DetectionBus
from app.live import LiveListener, start_listener
from app.batcher import ClipBatcher, reuse_freed_memory
from app.predict import (DETECT_ABOVE_S, clip_for_classifier, decode_upload, prediction,
                         streaming_detections)
from app.schemas import (Detections, DetectorSettings, Error, Health, InputLevel, Listener, LiveScores,
                         MemoryHistory, MemorySample, Prediction, Stats)
from app.settings import Settings, from_env, host_name
from app.stats import (CountRequests, RequestCounts, RssHistory, memory_bytes,
                       prometheus_registry)
from app.upload import REQUEST_BODY, BodyBudget, upload_body

log = logging.getLogger("kws.serve")

CLIENT_CLOSED_REQUEST = 499
DASHBOARD = Path(__file__).parent / "static" / "dashboard.html"
KEEPALIVE_S = 15.0  # an SSE comment this often keeps idle connections open through proxies


class WorkSlots:
    """At most `size` uploads decoded and analysed at once; `waiting` counts those queued."""

    def __init__(self, size: int):
        self.size, self.waiting = size, 0
        self._free = asyncio.Semaphore(size)

    async def __aenter__(self):
        self.waiting += 1
        try:
            await self._free.acquire()
        finally:
            self.waiting -= 1

    async def __aexit__(self, *exc):
        self._free.release()


class Service:
    """What the endpoints share: settings, the inference engine (read-only), the inference pool,
    the live detections and the listener."""

    def __init__(self, settings: Settings, engine: StreamEngine, bus: DetectionBus,
                 requests: RequestCounts):
        self.settings, self.engine, self.bus, self.requests = settings, engine, bus, requests
        # Decoding and long clips' detections run in the pool; clips are classified in batches.
        self.executor = ThreadPoolExecutor(settings.workers, thread_name_prefix="kws-work")
        self.batcher = ClipBatcher(engine, settings.max_batch)
        # Bodies are read outside any slot, within a shared memory budget; decoding and
        # analysis take one of a few slots, so a burst of uploads queues instead of piling up.
        self.bodies = BodyBudget(4 * settings.max_upload_bytes)
        self.slots = WorkSlots(4 * settings.workers)
        self.started = time.monotonic()
        self.listener: LiveListener | None = None
        self.listener_problem: str | None = None
        self.metrics = prometheus_registry(self.stats)
        self.memory = RssHistory()
        self.detector_options = {"threshold": settings.threshold, "words": settings.words}
        detector = Detector(engine, **self.detector_options)
        thresholds = detector.thresholds
        values = set(thresholds.values())
        self.detector_settings = DetectorSettings(
            threshold=values.pop() if len(values) == 1 else thresholds, words=list(thresholds),
            long_window_s=detector.long_window_s)

    def listener_state(self) -> Listener:
        if self.listener is not None:
            if self.listener.running:
                return Listener(state="running")
            return Listener(state="stopped", detail=self.listener.problem)
        if self.listener_problem is not None:
            return Listener(state="unavailable", detail=self.listener_problem)
        return Listener(state="off")

    def problem(self) -> str | None:
        """Why the service cannot take work now, or None when it can."""
        if self.slots.waiting:
            return (f"all {self.slots.size} work slots are busy and {self.slots.waiting} "
                    "uploads wait for one")
        if self.bodies.waiting:
            return f"the {self.bodies.limit:,}-byte budget for request bodies is spent"
        return None

    def stats(self) -> Stats:
        rss, peak = memory_bytes()
        return Stats(
            rss_bytes=rss, peak_rss_bytes=peak,
            model_parameters=self.engine.parameters, model_bytes=self.engine.parameter_bytes,
            stream_state_bytes=self.engine.state_bytes,
            audio_queue_depth=self.listener.queue_depth if self.listener else 0,
            dropped_frames=self.listener.counters.dropped_frames if self.listener else 0,
            at=time.time(), uptime_s=time.monotonic() - self.started,
            requests=self.requests.by_route(), in_flight=self.requests.in_flight,
            detections=self.bus.total, classify_batches=self.batcher.batches,
            classified_clips=self.batcher.clips, listener=self.listener_state())


# Dependencies and endpoints that never block are `async def`: FastAPI would run plain `def`
# ones in a thread each time, which costs more than they do.
async def get_service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]
bearer = HTTPBearer(auto_error=False, description="KWS_API_TOKEN")


async def require_token(
        service: ServiceDep,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]):
    expected = service.settings.api_token
    given = credentials.credentials if credentials else ""
    if not secrets.compare_digest(given.encode(), expected.encode()):
        raise HTTPException(status.HTTP_401_UNAUTHORIZED,
                            "a valid bearer token is required (Authorization: Bearer <token>)",
                            headers={"WWW-Authenticate": "Bearer"})


def error_responses(*codes: int) -> dict:
    """OpenAPI entries for the 4xx answers an endpoint gives, all shaped like `Error`."""
    return {code: {"model": Error} for code in codes}


def json_error(description: str) -> dict:
    """An OpenAPI answer shaped like `Error` in JSON, whatever the route's own media type (the
    dashboard's HTML, /metrics' text): what the host check and the 500 handler send."""
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


class AllowedHosts:
    """ASGI middleware: a request whose Host header names another host gets a JSON 400. A web
    page whose own name was made to point at this machine (DNS rebinding) is refused so."""

    def __init__(self, app, hosts: tuple[str, ...]):
        self.app, self.hosts = app, None if "*" in hosts else set(hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.hosts is not None:
            header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = host_name(header)
            if name not in self.hosts:
                refused = (f"host {name!r} is not allowed" if name
                           else "a request without a Host header is refused")
                refusal = JSONResponse(
                    {"detail": f"{refused}: add the name to KWS_ALLOWED_HOSTS (or set KWS_API_TOKEN)"},
                    status_code=status.HTTP_400_BAD_REQUEST)
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)


async def client_gone(request: Request, _exc: ClientDisconnect) -> Response:
    """A client that hung up mid-upload: no traceback, counted apart as 499 (nginx's "client
    closed request"); nobody receives the answer."""
    log.info("kws serve: the client of %s %s disconnected before its upload ended",
             request.method, request.url.path)
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def server_error(_request: Request, _exc: Exception) -> JSONResponse:
    """A bug: JSON like every other error (the traceback still goes to the log)."""
    return JSONResponse({"detail": "internal server error"},
                        status_code=status.HTTP_500_INTERNAL_SERVER_ERROR)


async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """Query-parameter errors as one readable `detail` string, like every other 4xx here."""
    problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or e['loc'][0]}: {e['msg']}"
                         for e in exc.errors())
    return JSONResponse({"detail": problems}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


# One Server-Sent Event, as OpenAPI 3.1 describes a stream: the schema of each event.
SSE_EVENT = {
    "type": "object", "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["ready", "detection", "scores", "level"]},
        "data": {"type": "string", "description": "JSON: ready {listener}, detection a "
                                                  "LiveDetection, scores a LiveScores, level an "
                                                  "InputLevel"},
    },
}


def with_event_schemas(app: FastAPI) -> FastAPI:
    """The schema also defines what /events' data holds (LiveScores, InputLevel), which no route
    returns, so that the names its description gives resolve in `components`."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()  # cached on the app: completed in place, once
            _, definitions = models_json_schema([(m, "serialization") for m in (LiveScores, InputLevel)],
                                                ref_template="#/components/schemas/{model}")
            known = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in definitions["$defs"].items():
                known.setdefault(name, definition)
        return app.openapi_schema
    app.openapi = openapi
    return app


def sse(event: str, data) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


async def event_stream(service: Service):
    queue = service.bus.subscribe()
    try:
        yield sse("ready", {"listener": service.listener_state().model_dump()})
        while True:
            try:
                kind, payload = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
            except TimeoutError:
                yield ": keep-alive\n\n"
                continue
            if kind == "close":
                return
            yield sse(kind, jsonable_encoder(payload))
    finally:
        service.bus.unsubscribe(queue)


def create_app(settings: Settings | None = None, engine: StreamEngine | None = None) -> FastAPI:
    """The application. `engine`: an already loaded model (`kws serve` loads it first, so a bad
    path is a one-line error); otherwise the lifespan loads `settings.model`."""
    settings = settings or from_env()
    if settings.open_to_network and not settings.allow_anonymous:
        raise KwsError(f"serving {settings.host} without a token would let anyone on the network "
                       "follow what the microphone hears: set KWS_API_TOKEN (kws serve makes "
                       "one for the run) or KWS_ALLOW_ANONYMOUS=1")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        blas_threads = threadpool_limits(settings.threads, user_api="blas")
        reuse_freed_memory()
        bus = DetectionBus(asyncio.get_running_loop(), settings.detections_kept)
        service = Service(settings, engine or load_engine(settings.model), bus, requests)
        if settings.listen:
            service.listener, service.listener_problem = start_listener(
                service.engine, bus, settings.device, settings.listen_input,
                **service.detector_options)
        app.state.service = service
        sampling = asyncio.create_task(service.memory.run())
        try:
            yield
        finally:
            sampling.cancel()
            if service.listener is not None:
                service.listener.stop()
            service.executor.shutdown(cancel_futures=True)
            service.batcher.stop()
            blas_threads.restore_original_limits()

    # /docs and /redoc load Swagger UI and ReDoc from the fastapi-offline package, not a CDN: a
    # board may be offline, and no third-party script runs on the dashboard's origin.
    hosts = settings.hosts_allowed()  # '*': any (a token guards the service)
    app = FastAPIOffline(
        title="kws", version=__version__, lifespan=lifespan,
        description="Keyword spotting with mGRADE: classify uploaded clips, follow live "
                    "detections from the microphone, watch memory use.",
        exception_handlers={RequestValidationError: validation_error, ClientDisconnect: client_gone,
                            Exception: server_error},
        # Answers every route can give: a bug's JSON 500, and the refused Host's 400 where hosts
        # are checked (the schema says what the service does).
        responses={**({400: json_error("the Host header names a host not allowed")}
                      if "*" not in hosts else {}),
                   500: json_error("a bug (its traceback is in the log)")},
        # /predict/ is not /predict: a JSON 404, not an empty 307 that drops the upload
        redirect_slashes=False)
    requests = RequestCounts()
    app.add_middleware(AllowedHosts, hosts=hosts)
    app.add_middleware(CountRequests, counts=requests)
    # The bearer token, and its 401, only when one is set: the schema says what the service does.
    guarded = [Depends(require_token)] if settings.api_token else []
    auth = (401,) if settings.api_token else ()

    @app.post("/predict", response_model=Prediction, response_model_exclude_none=True,
              dependencies=guarded, responses=error_responses(400, *auth, 408, 413, 415, 422),
              openapi_extra={"requestBody": REQUEST_BODY})
    async def predict_clip(request: Request, service: ServiceDep):
        """Classify an audio file (WAV, FLAC, OGG or MP3; any rate, mono or stereo), sent as the
        multipart form field `file` or as the raw body with an audio/* content type."""
        settings = service.settings
        loop = asyncio.get_running_loop()
        async with (upload_body(request, settings.max_upload_bytes, service.bodies,
                                settings.read_timeout_s) as data,
                    service.slots):
            started = time.perf_counter()
            decoding = partial(decode_upload, data, settings.min_duration_s, settings.max_duration_s)
            try:
                audio, sample_rate = await loop.run_in_executor(service.executor, decoding)
                work = [asyncio.wrap_future(service.batcher.submit(clip_for_classifier(audio)))]
                if len(audio) > DETECT_ABOVE_S * SAMPLE_RATE:
                    work.append(loop.run_in_executor(
                        service.executor,
                        partial(streaming_detections, service.engine, audio,
                                **service.detector_options)))
                logits, *detections = await asyncio.gather(*work)
                return prediction(service.engine.labels, logits, audio, sample_rate,
                                  detections[0] if detections else None, started)
            except AudioError as e:
                raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(e)) from None

    @app.get("/detections", response_model=Detections, dependencies=guarded,
             responses=error_responses(*auth, 422))
    async def recent_detections(
            service: ServiceDep,
            since: Annotated[float, Query(description="Unix time: only detections after it")] = 0.0):
        """Recent live detections from the listener (a bounded buffer), oldest first."""
        return Detections(detections=service.bus.since(since), now=time.time())

    @app.get("/events", response_class=StreamingResponse, dependencies=guarded,
             responses={200: {"description": "Server-Sent Events: `ready` once, then `detection` "
                                             "(a LiveDetection) as each happens, and `scores` "
                                             "(the top five) and `level` (the input level) "
                                             "four times a second",
                              "content": {"text/event-stream": {"schema": SSE_EVENT}}},
                        **error_responses(*auth)})
    async def events(service: ServiceDep):
        """Live detections as Server-Sent Events, as they happen."""
        return StreamingResponse(event_stream(service), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/stats", response_model=Stats, dependencies=guarded,
             responses=error_responses(*auth))
    async def stats(service: ServiceDep):
        """Memory use and health of the running process."""
        return service.stats()

    @app.get("/stats/memory", response_model=MemoryHistory, dependencies=guarded,
             responses=error_responses(*auth))
    async def memory_history(service: ServiceDep):
        """Resident memory over the last ten minutes, for the dashboard's chart."""
        return MemoryHistory(interval_s=service.memory.interval_s, samples=[
            MemorySample(at=at, rss_bytes=rss) for at, rss in service.memory.samples])

    @app.get("/metrics", response_class=Response, dependencies=guarded,
             responses={200: {"description": "The /stats numbers in Prometheus text format",
                              "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}},
                        **error_responses(*auth)})
    async def metrics(service: ServiceDep):
        return Response(generate_latest(service.metrics), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health", response_model=Health)
    @app.head("/health", response_model=Health, operation_id="health_head")
    async def health(service: ServiceDep):
        """Liveness and load: open even when an API token is set. `degraded` says why the
        service cannot take work now."""
        problem = service.problem()
        return Health(status="degraded" if problem else "ok", detail=problem,
                      model=service.settings.model.name, model_license=service.engine.license,
                      listener=service.listener_state(),
                      detector=service.detector_settings)

    dashboard_html = DASHBOARD.read_text()

    @app.get("/", response_class=HTMLResponse)
    @app.head("/", response_class=HTMLResponse, operation_id="dashboard_head")  # curl -I, uptime checks
    async def dashboard():
        """The live dashboard: detections, top scores and memory over time."""
        return dashboard_html

    return with_event_schemas(app)
