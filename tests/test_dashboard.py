"""The dashboard in a real browser: headless Chromium (Debian's `chromium` package) loads the
page from a running server, a detection is pushed through the server's detection bus, and it
must appear on the page; a screenshot is kept in tests/artifacts/.

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages
ending in a NUL byte on file descriptors 3 and 4), so no extra packages are needed."""

import base64
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from test_app import model_path, serving  # noqa: F401

from app.main import create_app
from app.schemas import Score
from app.settings import Settings

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,900", "--remote-debugging-pipe"]
ARTIFACTS = Path(__file__).parent / "artifacts"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium: apt-get install chromium")


class Chromium:
    """A headless Chromium and one page in it, driven over the DevTools pipe."""

    def __init__(self, user_data_dir: Path):
        commands_in, self._commands = os.pipe()
        self._replies, replies_out = os.pipe()
        # bash puts the pipe ends on descriptors 3 and 4, where Chromium expects them (dash
        # cannot: it only redirects single-digit descriptors).
        script = f'exec "$0" "$@" 3<&{commands_in} 4>&{replies_out}'
        self.process = subprocess.Popen(
            ["bash", "-c", script, CHROMIUM, *FLAGS, f"--user-data-dir={user_data_dir}",
             "about:blank"], pass_fds=(commands_in, replies_out),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(commands_in)
        os.close(replies_out)
        self._buffer, self._last_id, self.session = b"", 0, None

    def send(self, method: str, **params) -> dict:
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while (reply := self._read()).get("id") != self._last_id:
            pass  # an event: not what we wait for
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def _read(self, timeout_s: float = 30) -> dict:
        while b"\0" not in self._buffer:
            if not select.select([self._replies], [], [], timeout_s)[0]:
                raise TimeoutError("Chromium did not answer")
            data = os.read(self._replies, 1 << 20)
            if not data:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buffer += data
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str):
        target = self.send("Target.createTarget", url=url)["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def wait_for(self, expression: str, limit_s: float = 20.0):
        deadline = time.monotonic() + limit_s
        while not (value := self.evaluate(expression)):
            assert time.monotonic() < deadline, f"the page never satisfied: {expression}"
            time.sleep(0.1)
        return value

    def screenshot(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self):
        self.process.kill()
        self.process.wait(10)
        os.close(self._commands)
        os.close(self._replies)


def test_dashboard_shows_a_detection_pushed_by_the_server(model_path, tmp_path):  # noqa: F811
    app = create_app(Settings(model=model_path))
    with serving(app) as url:
        browser = Chromium(tmp_path / "chromium-profile")
        try:
            browser.open(url + "/")
            browser.wait_for("document.body.dataset.events === 'open'")  # /events connected
            browser.wait_for("memory.length >= 2")  # two /stats polls: a line on the chart
            bus = app.state.service.bus
            bus.publish(1.25, "marvin", 0.97)
            bus.publish_scores([Score(label="marvin", score=0.97), Score(label="sheila", score=0.02)])
            shown = browser.wait_for(
                "document.querySelector('.detection[data-label=\"marvin\"]')?.innerText")
            bars = browser.wait_for(
                "[...document.querySelectorAll('#scores .bar')].map(b => b.dataset.label).join()")
            memory = browser.evaluate("document.getElementById('memory-facts').innerText")
            browser.screenshot(ARTIFACTS / "dashboard.png")
        finally:
            browser.close()
    assert "marvin" in shown and "0.97" in shown
    assert bars == "marvin,sheila"
    assert "RSS" in memory and "MB" in memory
    assert (ARTIFACTS / "dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
