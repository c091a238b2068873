"""`kws listen` end to end through a real audio input device: a private PulseAudio server whose
null sink's monitor is the default source; spoken keywords played into the sink with paplay
must come out of `kws listen` as detections. Needs apt packages pulseaudio, pulseaudio-utils
and libportaudio2 (.ci/run installs them)."""

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import soundfile as sf

from test_listen import (END_TO_END_THRESHOLD, REPO, keyword_audio,  # noqa: F401 (a fixture)
                         shipped_model_path)

pytestmark = pytest.mark.skipif(
    not all(shutil.which(tool) for tool in ("pulseaudio", "pactl", "paplay")),
    reason="needs pulseaudio and pulseaudio-utils (apt)")

START_TIMEOUT_S = 60  # loading torch on a busy CI machine


@pytest.fixture
def pulse_env(tmp_path):
    """Environment of a private PulseAudio server with a 16-kHz mono null sink 'vspk' whose
    monitor is the default source. The server is stopped by its process id afterwards."""
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    socket = runtime / "native"
    env = {**os.environ, "HOME": str(tmp_path), "XDG_RUNTIME_DIR": str(runtime),
           "PULSE_SERVER": f"unix:{socket}"}
    server = subprocess.Popen(
        ["pulseaudio", "-n", "--daemonize=no", "--exit-idle-time=-1", "--disallow-exit=yes",
         "--use-pid-file=no", "--disable-shm=yes",
         "-L", f"module-native-protocol-unix socket={socket} auth-anonymous=1",
         "-L", "module-null-sink sink_name=vspk rate=16000 channels=1 format=s16le"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode != 0:
            assert server.poll() is None, "pulseaudio exited at start-up"
            assert time.monotonic() < deadline, "pulseaudio did not come up in 20 s"
            time.sleep(0.1)
        subprocess.run(["pactl", "set-default-source", "vspk.monitor"], env=env, check=True)
        subprocess.run(["pactl", "set-default-sink", "vspk"], env=env, check=True)
        yield env
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def start_listen(env, *argv) -> tuple[subprocess.Popen, "queue.Queue[str]"]:
    """`kws listen` as a process (PortAudio reads the device list when it is imported, so
    only after the server is up); its stderr lines arrive on the returned queue."""
    proc = subprocess.Popen([sys.executable, "-m", "kws.cli", "listen", *argv], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    return proc, lines


def wait_for_line(lines: "queue.Queue[str]", prefix: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no line starting {prefix!r} in {timeout} s; stderr was: {''.join(seen)}")


def stop(proc: subprocess.Popen) -> tuple[str, int]:
    """Ctrl-C; then (stdout, exit status). Its stderr stays with start_listen's reader."""
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return proc.stdout.read(), code


def test_listen_reports_keywords_played_into_the_default_input(pulse_env, shipped_model_path,
                                                                tmp_path):
    audio, words = keyword_audio()
    wav = tmp_path / "keywords.wav"
    sf.write(wav, np.concatenate([np.zeros(4800, np.float32), audio]), 16000)  # +0.3 s lead-in
    proc, lines = start_listen(pulse_env, "--model", str(shipped_model_path), "--json",
                               "--threshold", END_TO_END_THRESHOLD)
    try:
        started = wait_for_line(lines, "kws listen: listening", START_TIMEOUT_S)
        assert "16000 Hz" in started
        subprocess.run(["paplay", "--device=vspk", str(wav)], env=pulse_env, check=True, timeout=60)
        time.sleep(1.5)  # the last word's detection comes up to a second after it ends
        out, code = stop(proc)
    finally:
        proc.kill()
    assert code == 0
    detections = [json.loads(line) for line in out.splitlines()]
    assert [d["label"] for d in detections] == words
    assert all({"time_s", "label", "score", "wall_time"} <= set(d) for d in detections)
    summary = wait_for_line(lines, "kws listen:", 5)
    assert "0 dropped frames" in summary


def test_a_device_that_does_not_exist_is_one_clear_error(pulse_env, tmp_path):
    # Devices are checked before the model is loaded, so no model is needed here.
    out = subprocess.run([sys.executable, "-m", "kws.cli", "listen", "--device",
                          "no-such-microphone", "--model", str(tmp_path / "unused.pt")],
                         env=pulse_env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert out.stderr.startswith("kws: error:") and len(out.stderr.strip().splitlines()) == 1
    assert "no-such-microphone" in out.stderr and "--list-devices" in out.stderr


def test_list_devices_shows_the_pulseaudio_input(pulse_env):
    out = subprocess.run([sys.executable, "-m", "kws.cli", "listen", "--list-devices"],
                         env=pulse_env, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "pulse" in out.stdout
