"""The HTTP service over real HTTP (uvicorn on a loopback port, in a thread): /predict for every
format and every kind of bad input, the size limit enforced while reading, auth, /stats,
/metrics, /health, the OpenAPI schema, and a fuzz of /predict. Models are small random ones:
nothing here depends on a trained model's accuracy."""

import io
import json
import re
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from prometheus_client.parser import text_string_to_metric_families

from app.main import create_app
from app.schemas import Error, Prediction, Stats
from app.settings import Settings
from kws.audio import AudioError, decode, fit_length, load_audio
from kws.cli import main
from kws.labels import LABELS
from kws.model import (MGRADE, load_model, parameter_bytes, parameter_count, preset, save_model,
                       state_bytes)
from kws.serve import bind, server as kws_server
from kws.stream import DEFAULT_THRESHOLD, detect

SMALL = dict(n_layers=2, width=16, frontend_filters=8, delay_window=8, n_taps=3)


# ----------------------------------------------------------------------------- helpers

def small_model(favour: str | None = None) -> MGRADE:
    """A seeded random model; `favour` makes that label win everywhere (so detections fire)."""
    torch.manual_seed(0)
    model = MGRADE(preset("edge", LABELS, **SMALL)).eval()
    if favour is not None:
        with torch.no_grad():
            model.decoder.bias[LABELS.index(favour)] += 30.0
    return model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "small.pt"
    save_model(small_model(), path)
    return path


def audio_bytes(seconds=1.0, rate=16000, fmt="WAV", subtype=None, channels=1, seed=0,
                samples=None) -> bytes:
    """A seeded noise burst (or `samples`) encoded in memory."""
    if samples is None:
        rng = np.random.default_rng(seed)
        samples = (0.1 * rng.standard_normal((round(seconds * rate), channels))).astype(np.float32)
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt, subtype=subtype)
    return buffer.getvalue()


def free_socket() -> socket.socket:
    """A listening loopback socket on a free port, made as `kws serve` makes its own."""
    return bind("127.0.0.1", 0)


@contextmanager
def serving(app, read_timeout_s: float = 5.0):
    """Run `app` on a free loopback port in a thread, in the uvicorn server `kws serve` runs;
    yields the base URL."""
    sock = free_socket()
    server = kws_server(app, read_timeout_s, log_level="warning", access_log=False)
    server.config.timeout_graceful_shutdown = 1
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@contextmanager
def client_for(settings: Settings):
    with serving(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def client(model_path):
    with client_for(Settings(model=model_path)) as client:
        yield client


def upload(client, data: bytes, name="clip.wav", content_type="audio/wav", **kw):
    return client.post("/predict", files={"file": (name, data, content_type)}, **kw)


def assert_error(response, status: int, *words: str):
    """A 4xx JSON answer shaped like the schema's Error, naming the problem."""
    assert response.status_code == status, response.text
    detail = Error.model_validate(response.json()).detail
    for word in words:
        assert word.lower() in detail.lower(), detail
    assert "<_io" not in detail and "object at 0x" not in detail, detail  # no Python reprs


@torch.inference_mode()
def expected_top(model, audio: np.ndarray):
    probs = torch.softmax(model.classify(torch.from_numpy(audio)[None])[0].double(), -1)
    values, indices = probs.topk(5)
    return [(LABELS[i], float(v)) for v, i in zip(values, indices)]


# ----------------------------------------------------------------------------- /predict

@pytest.mark.parametrize("fmt,subtype,name", [("WAV", "PCM_16", "a.wav"), ("FLAC", None, "a.flac"),
                                              ("OGG", "VORBIS", "a.ogg"), ("MP3", None, "a.mp3")])
def test_predict_classifies_every_format_with_top_five(client, model_path, fmt, subtype, name):
    data = audio_bytes(1.0, fmt=fmt, subtype=subtype)
    response = upload(client, data, name=name, content_type=f"audio/{fmt.lower()}")
    assert response.status_code == 200, response.text
    result = Prediction.model_validate(response.json())
    clip = load_audio(data)
    expected = expected_top(load_model(model_path), fit_length(clip - clip.mean()))  # without its DC
    assert [s.label for s in result.top] == [label for label, _ in expected]
    assert [s.score for s in result.top] == pytest.approx([p for _, p in expected], abs=1e-5)
    assert (result.label, result.score) == (result.top[0].label, result.top[0].score)
    assert result.sample_rate == 16000 and result.duration_s == pytest.approx(1.0, abs=0.01)
    assert result.latency_ms > 0 and "detections" not in response.json()


def test_raw_body_with_audio_content_type_equals_multipart(client):
    data = audio_bytes(0.8, seed=3)
    raw = client.post("/predict", content=data, headers={"Content-Type": "audio/x-wav"})
    form = upload(client, data)
    assert raw.status_code == form.status_code == 200
    assert raw.json()["top"] == form.json()["top"]


def test_short_clip_is_padded_to_one_second_and_longer_clip_used_whole(client, model_path):
    model = load_model(model_path)
    for seconds in (0.5, 1.3):
        data = audio_bytes(seconds, seed=4)
        audio = load_audio(data)
        audio -= audio.mean()  # /predict hears a clip without its DC offset
        expected = expected_top(model, fit_length(audio, max(len(audio), 16000)))
        got = upload(client, data).json()
        assert got["label"] == expected[0][0]
        assert got["score"] == pytest.approx(expected[0][1], abs=1e-5)
        assert got["duration_s"] == pytest.approx(seconds, abs=1e-3)


def test_stereo_at_44100_hz_is_mixed_down_and_resampled(client):
    rng = np.random.default_rng(5)
    mono = (0.1 * rng.standard_normal(44100)).astype(np.float32)
    stereo = upload(client, audio_bytes(rate=44100, samples=np.stack([mono, mono], 1))).json()
    single = upload(client, audio_bytes(rate=44100, samples=mono)).json()
    assert stereo["sample_rate"] == 44100
    assert stereo["duration_s"] == pytest.approx(1.0, abs=1e-3)
    assert stereo["top"] == single["top"]


def test_long_clip_gets_the_detections_of_the_streaming_path(tmp_path):
    model = small_model(favour="yes")
    save_model(model, tmp_path / "yes.pt")
    data = audio_bytes(3.0, seed=6)
    with client_for(Settings(model=tmp_path / "yes.pt")) as client:
        result = upload(client, data).json()
    expected = detect(model, load_audio(data))
    assert expected, "the favoured model should fire"
    assert [(d["label"], d["time_s"]) for d in result["detections"]] == \
           [(d.label, pytest.approx(d.time_s)) for d in expected]
    assert result["label"] == "yes"
    with client_for(Settings(model=tmp_path / "yes.pt", words=("no", "up"))) as client:
        assert upload(client, data).json()["detections"] == []  # the service's --words apply


def test_parallel_requests_each_get_their_own_answer(client):
    clips = [audio_bytes(2.0, seed=seed) for seed in range(8)]
    sequential = [upload(client, c).json()["top"] for c in clips]
    with ThreadPoolExecutor(8) as pool:
        parallel = list(pool.map(lambda c: upload(client, c).json()["top"], clips))
    assert parallel == sequential
    assert len({str(t) for t in sequential}) > 1  # different clips, different answers


# ----------------------------------------------------------------------------- bad input

def nan_wav(value) -> bytes:
    samples = np.zeros(16000, dtype=np.float32)
    samples[100] = value
    return audio_bytes(samples=samples, subtype="FLOAT")


def corrupt_flac() -> bytes:
    data = bytearray(audio_bytes(1.0, fmt="FLAC"))
    data[200:2000] = bytes(range(256)) * 7 + bytes(52)
    return bytes(data)


BAD_UPLOADS = {
    # case: (body, content type, status, words the detail must contain)
    "not audio": (b"this is a text file, not a sound", "audio/wav", 422, ["cannot decode"]),
    "corrupt audio": (corrupt_flac(), "audio/flac", 422, ["cannot decode"]),
    "truncated wav": (audio_bytes(1.0)[:16000], "audio/wav", 422, ["truncated"]),
    "truncated flac": (audio_bytes(1.0, fmt="FLAC")[:5000], "audio/flac", 422, ["cannot decode"]),
    "truncated header": (audio_bytes(1.0)[:30], "audio/wav", 422, ["truncated"]),
    "shorter than 0.1 s": (audio_bytes(0.05), "audio/wav", 422, ["0.050 s", "at least 0.1 s"]),
    "longer than the limit": (audio_bytes(61.0, rate=8000), "audio/wav", 422,
                              ["61.0 s", "limit is 60 s"]),
    "NaN samples": (nan_wav(np.nan), "audio/wav", 422, ["NaN"]),
    "infinite samples": (nan_wav(np.inf), "audio/wav", 422, ["infinite"]),
    "sample rate above 192 kHz": (audio_bytes(0.5, rate=200_000), "audio/wav", 422,
                                  ["200000 Hz", "between 4000 and 192000 Hz"]),
}


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_bad_upload_is_a_4xx_naming_the_problem(client, case):
    body, content_type, status, words = BAD_UPLOADS[case]
    assert_error(upload(client, body, content_type=content_type), status, *words)
    assert_error(client.post("/predict", content=body, headers={"Content-Type": content_type}),
                 status, *words)


@pytest.mark.parametrize("rate", [16001, 44099, 96001])
def test_an_odd_sample_rate_is_resampled_like_any_other(client, rate):
    answer = upload(client, audio_bytes(0.5, rate=rate))
    assert answer.status_code == 200, answer.text
    assert answer.json()["sample_rate"] == rate


@pytest.mark.parametrize("placeholder", [0xFFFFFFFF, 0x7FFFFFFF, 0x7FFFF000])
def test_a_wav_recorded_to_a_pipe_with_a_placeholder_length_is_classified_like_the_file(client, placeholder):
    whole = audio_bytes(1.0)
    at = whole.index(b"data")
    streamed = whole[:4] + struct.pack("<I", placeholder) + whole[8:at + 4] + struct.pack("<I", placeholder) + whole[at + 8:]
    answers = [upload(client, body, content_type="audio/wav") for body in (whole, streamed)]
    assert [a.status_code for a in answers] == [200, 200], answers[1].text
    assert answers[1].json()["top"] == answers[0].json()["top"]


@pytest.mark.parametrize("wrap", [bytes, io.BytesIO], ids=["bytes", "file object"])
def test_decode_error_names_the_problem_not_the_buffer(wrap):
    with pytest.raises(AudioError) as error:
        decode(wrap(b"this is a text file, not a sound"))
    message = str(error.value)
    assert message.startswith("cannot decode audio: ") and "format" in message.lower(), message
    assert "<_io" not in message and "object at 0x" not in message, message


def test_decode_error_for_a_path_keeps_the_path(tmp_path):
    path = tmp_path / "broken.wav"
    path.write_bytes(b"RIFF\x00\x00\x00\x00WAVE but not really")
    with pytest.raises(AudioError, match=r"cannot decode audio: .*broken\.wav"):
        decode(path)


def test_empty_body_and_empty_file_are_400(client):
    assert_error(client.post("/predict", content=b"", headers={"Content-Type": "audio/wav"}),
                 400, "empty")
    assert_error(upload(client, b""), 400, "empty")


def test_form_without_a_file_field_is_422(client):
    assert_error(client.post("/predict", files={"audio": ("a.wav", audio_bytes(), "audio/wav")}),
                 422, "no 'file' field")
    assert_error(client.post("/predict", data={"file": "not a file"},
                             files={"other": ("x", b"x", "text/plain")}), 422, "file upload")


def test_broken_multipart_is_400(client):
    response = client.post("/predict", content=b"--x\r\nnonsense",
                           headers={"Content-Type": "multipart/form-data"})
    assert_error(response, 400, "boundary")


@pytest.mark.parametrize("content_type", ["text/plain", "application/json", None])
def test_unsupported_content_type_is_415(client, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    response = client.post("/predict", content=audio_bytes(), headers=headers)
    assert_error(response, 415, "unsupported content type")


def test_upload_over_the_size_limit_is_413(model_path):
    big = audio_bytes(1.0)  # 32 kB against a 20 kB limit
    with client_for(Settings(model=model_path, max_upload_bytes=20_000)) as client:
        assert_error(client.post("/predict", content=big, headers={"Content-Type": "audio/wav"}),
                     413, "20,000 bytes")
        assert_error(upload(client, big), 413, "limit")
        assert upload(client, audio_bytes(0.5)).status_code == 200  # 16 kB is fine


class BodyMeter:
    """ASGI wrapper counting the request-body bytes the application pulled."""

    def __init__(self, app):
        self.app, self.pulled = app, 0

    async def __call__(self, scope, receive, send):
        async def counting_receive():
            message = await receive()
            self.pulled += len(message.get("body", b""))
            return message

        await self.app(scope, counting_receive, send)


def read_reply(conn: socket.socket) -> str:
    """One HTTP response (head and Content-Length body) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < int(
            data.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0]):
        received = conn.recv(65536)
        assert received, f"the connection closed mid-response: {data!r}"
        data += received
    return data.decode()


def test_size_limit_is_enforced_while_reading_not_after(model_path):
    """A chunked upload without Content-Length gets 413 once it passes the limit, although its
    body never ends: the server neither waits for nor reads the whole of it."""
    limit, chunk = 16_000, 4096
    app = BodyMeter(create_app(Settings(model=model_path, max_upload_bytes=limit)))
    sent = 0
    with serving(app) as url, socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])),
                                                      timeout=5) as conn:
        conn.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: audio/wav\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        try:
            while sent < 512 * 1024:  # 32 times the limit, and no final chunk
                conn.sendall(b"%x\r\n" % chunk + bytes(chunk) + b"\r\n")
                sent += chunk
        except OSError:  # the server answered and closed: exactly what should happen
            pass
        reply = read_reply(conn)
    assert reply.startswith("HTTP/1.1 413"), reply
    assert "larger than the limit of 16,000 bytes" in reply
    # uvicorn hands the body over in pieces of up to 64 KiB: the app stops after the first
    # piece that crosses the limit. (How much the client got to send before the server's reset
    # stopped it depends on timing: as little as 24 KiB on a quiet machine.)
    assert limit < app.pulled <= limit + 2 * 65536


def test_server_keeps_serving_after_bad_input(client):
    for body, content_type, *_ in BAD_UPLOADS.values():
        upload(client, body, content_type=content_type)
    assert client.get("/health").json()["status"] == "ok"
    assert upload(client, audio_bytes()).status_code == 200


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=st.one_of(
    st.binary(max_size=2000),
    # a valid WAV with a run of bytes overwritten: reaches the decoder's deeper paths
    st.tuples(st.integers(0, 3000), st.binary(min_size=1, max_size=64)).map(
        lambda cut: (lambda wav: wav[:cut[0]] + cut[1] + wav[cut[0] + len(cut[1]):])(
            audio_bytes(0.2, seed=9)))),
    content_type=st.sampled_from(["audio/wav", "audio/flac", "audio/mpeg", "audio/ogg",
                                  "application/octet-stream", "multipart/form-data"]),
    as_form=st.booleans())
def test_fuzzed_uploads_get_200_or_a_4xx_json_error(client, body, content_type, as_form):
    if as_form:
        response = upload(client, body, content_type=content_type)
    else:
        response = client.post("/predict", content=body, headers={"Content-Type": content_type})
    assert response.status_code in (200, 400, 413, 415, 422), response.text
    if response.status_code == 200:
        Prediction.model_validate(response.json())
    else:
        assert Error.model_validate(response.json()).detail


# ----------------------------------------------------------------------------- auth

def test_api_token_guards_predict_and_live_endpoints_but_not_health(model_path):
    with client_for(Settings(model=model_path, api_token="s3cret")) as client:
        for method, path in [("post", "/predict"), ("get", "/detections"), ("get", "/events"),
                             ("get", "/stats"), ("get", "/metrics")]:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
                response = client.request(method, path, headers=headers)
                assert_error(response, 401, "bearer token")
                assert response.headers["www-authenticate"] == "Bearer"
        good = {"Authorization": "Bearer s3cret"}
        assert upload(client, audio_bytes(), headers=good).status_code == 200
        assert client.get("/stats", headers=good).status_code == 200
        assert client.get("/health").status_code == 200


# ----------------------------------------------------------------------------- stats, metrics, health

def test_stats_report_memory_model_sizes_and_request_counts(client, model_path):
    before = Stats.model_validate(client.get("/stats").json())
    upload(client, audio_bytes())
    upload(client, b"", content_type="audio/wav")
    after = Stats.model_validate(client.get("/stats").json())
    model = load_model(model_path)
    assert after.model_parameters == parameter_count(model)
    assert after.model_bytes == parameter_bytes(model)
    assert after.stream_state_bytes == state_bytes(model.cfg)
    assert 0 < after.rss_bytes <= after.peak_rss_bytes
    assert after.uptime_s > before.uptime_s
    history = client.get("/stats/memory").json()["samples"]
    assert history[-1]["at"] <= after.at and abs(after.at - time.time()) < 60  # one clock with the history
    assert after.audio_queue_depth == after.dropped_frames == 0
    assert after.classified_clips == before.classified_clips + 1  # the empty upload never got there
    assert before.classify_batches < after.classify_batches <= after.classified_clips
    assert after.listener.state == "off"
    count = lambda s, status: s.requests.get("/predict", {}).get(status, 0)  # noqa: E731
    assert count(after, "200") == count(before, "200") + 1
    assert count(after, "400") == count(before, "400") + 1
    assert after.requests["/stats"]["200"] >= 1


def test_a_path_with_a_trailing_slash_is_a_json_404_not_a_redirect_that_drops_the_upload(client):
    for response in (client.post("/predict/", content=audio_bytes(), headers={"Content-Type": "audio/wav"},
                                 follow_redirects=False),
                     client.get("/stats/", follow_redirects=False)):
        assert response.status_code == 404 and response.json()["detail"], response.text


def test_the_schema_and_docs_are_counted_by_their_path_and_unknown_paths_together(client):
    for path in ("/openapi.json", "/docs", "/no-such-page", "/nor-this"):
        client.get(path)
    requests = client.get("/stats").json()["requests"]
    assert requests["/openapi.json"]["200"] >= 1 and requests["/docs"]["200"] >= 1
    assert requests["(unmatched)"]["404"] >= 2 and "/no-such-page" not in requests


def test_metrics_give_the_stats_in_prometheus_format(client):
    upload(client, audio_bytes())
    stats = client.get("/stats").json()
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(response.text) for s in family.samples}
    for key in ("model_parameters", "model_bytes", "stream_state_bytes", "audio_queue_depth"):
        assert samples[(f"kws_{key}", ())] == stats[key]
    assert samples[("kws_rss_bytes", ())] > 0
    assert samples[("kws_classified_clips_total", ())] == stats["classified_clips"] >= 1
    assert samples[("kws_http_requests_total", (("route", "/predict"), ("status", "200")))] == \
           stats["requests"]["/predict"]["200"]


def test_health_is_ok_and_names_the_model_and_the_detector_settings(client, model_path):
    assert client.get("/health").json() == {
        "status": "ok", "detail": None, "model": "small.pt", "model_license": "MIT",
        "listener": {"state": "off", "detail": None},
        "detector": {"threshold": DEFAULT_THRESHOLD,
                     "words": [w for w in LABELS if w != "_background_"],
                     "long_window_s": 0.0}}
    assert str(model_path.parent) not in client.get("/health").text
    head = client.head("/health")
    assert head.status_code == 200 and head.content == b""


def test_the_dashboard_answers_head_as_uptime_checks_send_it(client):
    head = client.head("/")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-type"].startswith("text/html")


def test_health_shows_the_threshold_and_words_the_service_was_given(model_path):
    settings = Settings(model=model_path, threshold={"no": 0.6}, words=("yes", "no"))
    with client_for(settings) as client:
        assert client.get("/health").json()["detector"] == {
            "threshold": {"yes": DEFAULT_THRESHOLD, "no": 0.6}, "words": ["yes", "no"],
            "long_window_s": 0.0}


def test_the_service_uses_and_shows_the_models_own_thresholds_and_long_window(model_path, tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"thresholds": {"yes": 0.9},
                                                 "chosen_on": {"long_window_s": 1.25}}))
    assert main(["export", str(model_path), str(tmp_path / "tuned.npz"),
                 "--thresholds", str(tmp_path / "t.json")]) == 0
    with client_for(Settings(model=tmp_path / "tuned.npz", words=("yes", "no"))) as client:
        assert client.get("/health").json()["detector"] == {
            "threshold": {"yes": 0.9, "no": DEFAULT_THRESHOLD}, "words": ["yes", "no"],
            "long_window_s": 1.25}


def test_health_names_the_licence_of_the_served_weights(model_path, tmp_path):
    with client_for(Settings(model=model_path)) as client:
        assert client.get("/health").json()["model_license"] == "MIT"
    save_model(load_model(model_path), tmp_path / "d.pt", {"license": "CC-BY-NC-SA-4.0"})
    assert main(["export", str(tmp_path / "d.pt"), str(tmp_path / "d.npz")]) == 0
    with client_for(Settings(model=tmp_path / "d.npz")) as client:
        assert client.get("/health").json()["model_license"] == "CC-BY-NC-SA-4.0"


def test_dashboard_page_is_served_without_external_resources(client):
    response = client.get("/")
    assert response.status_code == 200 and "text/html" in response.headers["content-type"]
    assert "<canvas" in response.text and 'id="detections"' in response.text
    assert "http://" not in response.text and "https://" not in response.text  # no CDN


# ----------------------------------------------------------------------------- OpenAPI

def test_openapi_describes_bodies_and_every_error(client):
    schema = client.get("/openapi.json").json()
    predict = schema["paths"]["/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {"multipart/form-data", "audio/*"}
    ok = predict["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["$ref"].endswith("/Prediction")
    assert set(predict["responses"]) == {"200", "400", "408", "413", "415", "422", "500"}
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            assert {"400", "500"} <= set(operation["responses"]), path  # a refused Host, a bug
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    error = response["content"]["application/json"]["schema"]["$ref"]
                    assert error.endswith("/Error"), (path, status)
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for name in ("Prediction", "Detections", "Stats", "Health", "Error"):
        assert name in schema["components"]["schemas"]


def test_every_schema_the_events_description_names_is_defined_and_every_reference_resolves(client):
    schema = client.get("/openapi.json").json()
    defined = schema["components"]["schemas"]
    data = schema["paths"]["/events"]["get"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    named = re.findall(r"\b([A-Z][a-z]+[A-Z][A-Za-z]*)\b", data["properties"]["data"]["description"])
    assert {"LiveDetection", "LiveScores", "InputLevel"} <= set(named) and set(named) <= set(defined), named
    references = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(schema)))
    assert references and references <= set(defined), references - set(defined)


def test_bad_query_parameter_is_a_422_error_shaped_like_the_schema(client):
    assert_error(client.get("/detections", params={"since": "yesterday"}), 422, "since")


def test_a_clip_off_zero_is_scored_as_the_same_clip_at_zero(client):
    samples = (0.1 * np.random.default_rng(3).standard_normal(16000)).astype(np.float32)
    at_zero, off = (upload(client, audio_bytes(samples=samples + offset, subtype="FLOAT")).json()
                    for offset in (0.0, 0.05))
    assert [s["label"] for s in off["top"]] == [s["label"] for s in at_zero["top"]]
    assert [s["score"] for s in off["top"]] == pytest.approx([s["score"] for s in at_zero["top"]], abs=2e-4)
