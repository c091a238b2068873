"""Live detections through the HTTP service: Server-Sent Events, /detections, the background
listener (fed from a file, or without any usable device), and `kws serve` as a process."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import soundfile as sf
from test_app import audio_bytes, free_socket, model_path, serving, small_model  # noqa: F401

from app.live import MeteredBlocks
from app.main import create_app
from app.settings import Settings
from kws.model import save_model


@pytest.fixture(scope="module")
def yes_model_path(tmp_path_factory):
    """A model that hears "yes" in everything, so the listener detects it at once."""
    path = tmp_path_factory.mktemp("model") / "yes.pt"
    save_model(small_model(favour="yes"), path)
    return path


def read_events(lines, wanted: str, limit_s: float = 10.0):
    """The data of the next SSE event named `wanted` from `lines`, a response's iter_lines().
    Keep `lines` referenced while the connection should stay open: a dropped iterator is
    closed, and httpx closes the connection with it."""
    event, deadline = None, time.monotonic() + limit_s
    for line in lines:
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: ") and event == wanted:
            return json.loads(line[len("data: "):])
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"no {wanted!r} event within {limit_s} s")


def test_events_push_each_detection_as_it_happens(model_path):
    app = create_app(Settings(model=model_path))
    with serving(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        with client.stream("GET", "/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.iter_lines()
            assert read_events(lines, "ready") == {"listener": {"state": "off", "detail": None}}
            app.state.service.bus.publish(2.5, "yes", 0.93)  # as the listener thread would
            detection = read_events(lines, "detection")
    assert detection["label"] == "yes" and detection["score"] == 0.93
    assert detection["time_s"] == 2.5 and detection["id"] == 1
    assert abs(detection["at"] - time.time()) < 60


def test_a_closed_events_connection_unsubscribes(model_path):
    app = create_app(Settings(model=model_path))
    with serving(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        bus = app.state.service.bus
        for _ in range(3):
            with client.stream("GET", "/events") as response:
                lines = response.iter_lines()
                read_events(lines, "ready")
                time.sleep(0.3)
                assert bus.subscribers == 1  # still connected
            deadline = time.monotonic() + 10
            while bus.subscribers:
                assert time.monotonic() < deadline, "a closed /events connection stayed subscribed"
                time.sleep(0.05)


def test_detections_since_returns_newer_ones_from_a_bounded_buffer(model_path):
    app = create_app(Settings(model=model_path, detections_kept=3))
    with serving(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        published = [app.state.service.bus.publish(float(i), "go", 0.9) for i in range(5)]
        everything = client.get("/detections", params={"since": 0}).json()
        newer = client.get("/detections", params={"since": published[3].at}).json()
        stats = client.get("/stats").json()
    assert [d["id"] for d in everything["detections"]] == [3, 4, 5]  # the oldest two dropped
    assert [d["id"] for d in newer["detections"]] == [5]
    assert everything["now"] >= published[-1].at
    assert stats["detections"] == 5


def test_listener_fed_from_a_file_reaches_detections_events_and_stats(yes_model_path, tmp_path):
    clip = tmp_path / "speech.wav"
    clip.write_bytes(audio_bytes(3.0, rate=8000))  # resampled by the listener
    settings = Settings(model=yes_model_path, listen=True, listen_input=str(clip))
    with serving(create_app(settings)) as url, httpx.Client(base_url=url, timeout=10) as client:
        with client.stream("GET", "/events") as response:
            scores = read_events(response.iter_lines(), "scores")
        deadline = time.monotonic() + 10
        while not (found := client.get("/detections").json()["detections"]):
            assert time.monotonic() < deadline, "the listener reported nothing"
            time.sleep(0.1)
        health = client.get("/health").json()
        stats = client.get("/stats").json()
    assert scores["top"][0]["label"] == "yes" and len(scores["top"]) == 5
    assert [d["label"] for d in found] == ["yes"]  # once: it re-arms only below threshold
    assert health["listener"]["state"] in ("running", "stopped")  # stopped once the file ends
    assert stats["detections"] == 1 and stats["dropped_frames"] == 0


def test_a_listener_whose_file_holds_a_nan_stops_and_health_says_why(model_path, tmp_path, caplog):
    clip = tmp_path / "nan.wav"
    audio = np.zeros(4000, np.float32)  # a quarter second, played in real time
    audio[2000] = np.nan
    sf.write(clip, audio, 16000, subtype="FLOAT")
    settings = Settings(model=model_path, listen=True, listen_input=str(clip))
    with caplog.at_level(logging.INFO, logger="kws.serve"):
        with serving(create_app(settings)) as url, httpx.Client(base_url=url, timeout=10) as client:
            deadline = time.monotonic() + 10
            while (listener := client.get("/health").json()["listener"])["state"] == "running":
                assert time.monotonic() < deadline, "the listener never stopped"
                time.sleep(0.05)
    assert listener["state"] == "stopped" and "NaN or infinite" in listener["detail"], listener
    assert any("ended early" in r.getMessage() for r in caplog.records if r.name == "kws.serve")


def test_listener_without_a_usable_device_logs_one_line_and_predict_still_works(model_path, caplog):
    settings = Settings(model=model_path, listen=True, device="no-such-microphone-anywhere")
    with caplog.at_level(logging.INFO, logger="kws.serve"):
        with serving(create_app(settings)) as url, httpx.Client(base_url=url, timeout=10) as client:
            health = client.get("/health").json()
            predicted = client.post("/predict", content=audio_bytes(),
                                    headers={"Content-Type": "audio/wav"})
    assert health["listener"]["state"] == "unavailable" and health["listener"]["detail"]
    assert predicted.status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "kws.serve"]
    assert len(lines) == 1 and "listener unavailable" in lines[0], lines


def test_kws_serve_reads_env_serves_and_stops_cleanly_with_a_client_attached(model_path):
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "KWS_API_TOKEN": "t0ken", "KWS_PORT": str(port)}
    process = subprocess.Popen(
        [sys.executable, "-m", "kws.cli", "serve", "--model", str(model_path), "--no-access-log"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:
            try:
                health = httpx.get(f"{url}/health", timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read()
                assert time.monotonic() < deadline, "kws serve did not come up"
                time.sleep(0.2)
        assert health.json()["status"] == "ok"
        assert httpx.get(f"{url}/stats").status_code == 401  # KWS_API_TOKEN was read
        with httpx.stream("GET", f"{url}/events", headers={"Authorization": "Bearer t0ken"},
                          timeout=10) as events:
            lines = events.iter_lines()
            read_events(lines, "ready")
            process.send_signal(signal.SIGINT)
            assert process.wait(timeout=20) == 130  # the CLI's exit status for Ctrl-C
    finally:
        process.kill()
        output = process.stdout.read()
    assert f"http://127.0.0.1:{port}" in output and "Traceback" not in output


@pytest.mark.parametrize("amplitude,state", [(0.0, "silent"), (1e-4, "silent"), (0.1, "listening"),
                                             (1.0, "clipping")])
def test_input_level_says_whether_the_microphone_hears_anything(amplitude, state):
    blocks = MeteredBlocks(maxsize=4)
    tone = (amplitude * np.sin(np.linspace(0, 200 * np.pi, 512))).astype(np.float32)
    for _ in range(3):
        blocks.put(tone)
        blocks.get()
    level = blocks.level(time_s=1.5)
    assert level.state == state and level.time_s == 1.5
    assert level.rms_dbfs == pytest.approx(20 * np.log10(max(amplitude / np.sqrt(2), 1e-6)), abs=0.1)
    assert level.peak_dbfs >= level.rms_dbfs
    assert blocks.level(time_s=2.0) is None  # nothing came since: no level, the page says no input


def test_listener_publishes_the_input_level(yes_model_path, tmp_path):
    clip = tmp_path / "speech.wav"
    clip.write_bytes(audio_bytes(3.0))
    settings = Settings(model=yes_model_path, listen=True, listen_input=str(clip))
    with serving(create_app(settings)) as url, httpx.Client(base_url=url, timeout=10) as client:
        with client.stream("GET", "/events") as response:
            level = read_events(response.iter_lines(), "level")
    assert level["state"] == "listening"  # noise at 0.1 RMS: -20 dBFS
    assert level["rms_dbfs"] == pytest.approx(-20, abs=1.5) and level["time_s"] > 0
