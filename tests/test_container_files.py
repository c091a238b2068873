"""Checks of the container files that need no container engine: what an edge board relies on
when it runs the image. Building and running the image is ../shared/tools/container-smoke's job."""

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import tomllib
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per Dockerfile instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", text)
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


@pytest.fixture(scope="module")
def stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions, split per FROM."""
    result = []
    for keyword, rest in instructions((ROOT / "Dockerfile").read_text()):
        if keyword == "FROM":
            result.append([])
        result[-1].append((keyword, rest))
    return result


@pytest.fixture(scope="module")
def final(stages) -> dict[str, list[str]]:
    """The last stage's arguments, by keyword."""
    by_keyword: dict[str, list[str]] = {}
    for keyword, rest in stages[-1]:
        by_keyword.setdefault(keyword, []).append(rest)
    return by_keyword


def env_vars(values: list[str]) -> dict[str, str]:
    pairs = [pair.split("=", 1) for value in values for pair in shlex.split(value)]
    return dict(pairs)


def test_every_stage_builds_on_python_311_slim(stages):
    assert len(stages) >= 2, "multi-stage: a builder stage and a runtime stage"
    for stage in stages:
        assert stage[0][1].split()[0] == "python:3.11-slim"


def test_runtime_stage_runs_as_a_numeric_non_root_user_in_the_audio_group(final):
    user = final["USER"][-1]
    assert user.split(":")[0].isdigit() and user.split(":")[0] != "0"
    created = " ".join(final["RUN"])
    assert re.search(rf"useradd\b[^&]*--uid {user.split(':')[0]}\b[^&]*--groups audio\b", created)


def test_runtime_stage_installs_the_system_library_sounddevice_loads(final):
    installs = " ".join(run for run in final["RUN"] if "apt-get install" in run)
    assert "libportaudio2" in installs.split()  # PortAudio, for the microphone


def test_the_image_carries_the_runtime_only(stages):
    """A plain `pip install` of the project from PyPI: no torch, no other wheel index."""
    runs = " ".join(rest for stage in stages for keyword, rest in stage if keyword == "RUN")
    assert "torch" not in runs and "INDEX_URL" not in runs and "[train]" not in runs
    assert "install --no-cache-dir /src" in runs


def test_the_shipped_model_is_installed_with_the_package_and_is_the_one_kws_loads(stages, final):
    """The builder copies the model file where pyproject's data-files take it from, and
    KWS_MODEL names where pip installs it in the venv that the final stage copies."""
    builder = [shlex.split(rest) for keyword, rest in stages[0] if keyword == "COPY"]
    assert ["models/mgrade-edge.npz", "./models/"] in builder
    data_files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    folder = next(k for k, files in data_files.items() if "models/mgrade-edge.npz" in files)
    assert env_vars(final["ENV"])["KWS_MODEL"] == f"/opt/venv/{folder}/mgrade-edge.npz"
    assert "--from=builder /opt/venv /opt/venv" in final["COPY"]


def test_it_exposes_the_port_the_service_and_its_healthcheck_use(final):
    assert final["EXPOSE"] == ["8000"]
    cmd = json.loads(final["CMD"][-1])
    assert cmd[:2] == ["kws", "serve"] and "--listen" in cmd
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert "--port" not in cmd or cmd[cmd.index("--port") + 1] == "8000"


def test_healthcheck_gives_a_slow_board_time_to_start(final):
    options = final["HEALTHCHECK"][-1].partition("CMD ")[0]
    assert re.search(r"--start-period=\d+s", options)


@contextmanager
def health_server(status: int):
    """A local HTTP server answering GET /health with `status`; yields its port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def run_healthcheck(final, port: int) -> int:
    """The HEALTHCHECK command's exit code, run here with KWS_PORT=port."""
    argv = json.loads(final["HEALTHCHECK"][-1].partition("CMD ")[2])
    env = {**os.environ, "KWS_PORT": str(port)}
    return subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True,
                          timeout=30).returncode


def test_healthcheck_passes_only_when_health_answers_2xx(final):
    with health_server(200) as port:
        assert run_healthcheck(final, port) == 0
    with health_server(503) as port:
        assert run_healthcheck(final, port) != 0


def test_healthcheck_fails_when_nothing_listens(final):
    with health_server(200) as port:
        pass  # closed again: connections to the port are refused
    assert run_healthcheck(final, port) != 0


def allowed_by_dockerignore(path: str, patterns: list[str]) -> bool:
    """Docker's rule, for the patterns used here: the last matching pattern wins."""
    allowed = True
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*", "[^/]*")
        if re.fullmatch(rf"{regex}(/.*)?", path):
            allowed = negated
    return allowed


def test_dockerignore_sends_what_the_dockerfile_copies_and_keeps_bulk_out(stages):
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    sources = [shlex.split(rest)[:-1] for stage in stages for keyword, rest in stage
               if keyword == "COPY" and not rest.startswith("--from")]
    for source in (path for group in sources for path in group):
        assert allowed_by_dockerignore(source, patterns), source
    for bulk in [".venv/bin/python", ".git/HEAD", "runs/x/model.pt", "data/speech_commands/a.flac",
                 "tests/test_cli.py", "kws/__pycache__/cli.cpython-311.pyc", "models/other.pt"]:
        assert not allowed_by_dockerignore(bulk, patterns), bulk


@pytest.fixture(scope="module")
def compose() -> str:
    return (ROOT / "compose.yaml").read_text()


def list_under(text: str, key: str) -> list[str]:
    """The `- item` lines right under `key:` (comments dropped); compose.yaml uses block lists."""
    match = re.search(rf"^(\s*){key}:\s*\n((?:\1\s+- .*\n)+)", text, re.M)
    assert match, f"no {key} list in compose.yaml"
    return [line.split("- ", 1)[1].split(" #")[0].strip().strip("\"'")
            for line in match.group(2).splitlines()]


def test_compose_passes_the_sound_devices_with_the_audio_group_and_publishes_8000(compose):
    assert "/dev/snd:/dev/snd" in list_under(compose, "devices")
    assert list_under(compose, "group_add") == ["audio"]
    assert "8000:8000" in list_under(compose, "ports")
    assert re.search(r"^\s+restart: (always|unless-stopped)\s*$", compose, re.M)


def test_compose_environment_names_only_settings_the_service_reads(compose):
    from app.settings import ENVIRONMENT

    names = [item.split("=")[0] for item in list_under(compose, "environment")]
    assert "KWS_DEVICE" in names
    assert set(names) <= set(ENVIRONMENT) | {"KWS_MODEL"}
