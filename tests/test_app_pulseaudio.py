"""`kws serve --listen` through a real audio input device: a private PulseAudio server (the
fixture of test_listen_pulseaudio.py) whose null sink's monitor is the default source. A model
that hears "yes" in everything must report it through /detections as soon as audio flows
from the device. Needs apt packages pulseaudio, pulseaudio-utils and libportaudio2."""

import signal
import subprocess
import sys
import time

import httpx
from test_app import free_socket, small_model
from test_listen_pulseaudio import pulse_env  # noqa: F401 (a fixture)

from kws.model import save_model

START_TIMEOUT_S = 60  # loading torch on a busy CI machine


def test_serve_listen_reports_detections_from_the_default_input_device(
        pulse_env, tmp_path):  # noqa: F811
    model = tmp_path / "yes.pt"
    save_model(small_model(favour="yes"), model)
    with free_socket() as sock:
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "kws.cli", "serve", "--listen", "--model", str(model),
         "--port", str(port), "--no-access-log"],
        env=pulse_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                health = httpx.get(f"{url}/health", timeout=2).json()
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stdout.read()
                assert time.monotonic() < deadline, "kws serve did not come up"
                time.sleep(0.2)
        assert health["listener"] == {"state": "running", "detail": None}
        deadline = time.monotonic() + 20
        while not (found := httpx.get(f"{url}/detections", timeout=5).json()["detections"]):
            assert time.monotonic() < deadline, "no detection from the input device"
            time.sleep(0.2)
        stats = httpx.get(f"{url}/stats", timeout=5).json()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130
    finally:
        process.kill()
        output = process.stdout.read()
    assert found[0]["label"] == "yes" and found[0]["time_s"] > 0
    assert stats["dropped_frames"] == 0 and stats["listener"]["state"] == "running"
    assert "listening to input device" in output and "Traceback" not in output
