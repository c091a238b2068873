"""The dashboard in a real browser: headless Chromium (Debian's `chromium` package) loads the
page from a running server, a detection is pushed through the server's detection bus, and it
must appear on the page; a screenshot is kept in tests/artifacts/.

Chromium is driven over the DevTools protocol on a pipe (--remote-debugging-pipe: JSON messages
ending in a NUL byte on file descriptors 3 and 4), so no extra packages are needed."""

import base64
import json
import math
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from test_app import model_path, serving  # noqa: F401

from app.main import create_app
from app.schemas import InputLevel, LiveScores, Score
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
        """Polls until the expression is truthy. While the page reloads (the token form does)
        it has no context to evaluate in, for a moment: that counts as not yet."""
        deadline = time.monotonic() + limit_s
        while True:
            try:
                value = self.evaluate(expression)
            except RuntimeError as error:
                if "navigated" not in str(error) and "context" not in str(error):
                    raise
                value = None
            if value:
                return value
            assert time.monotonic() < deadline, f"the page never satisfied: {expression}"
            time.sleep(0.1)

    def screenshot(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        shot = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self):
        self.process.kill()
        self.process.wait(10)
        os.close(self._commands)
        os.close(self._replies)


def test_dashboard_shows_level_timeline_peak_scores_detector_and_memory(model_path, tmp_path):  # noqa: F811
    from kws.model import load_model, save_model

    # a model with a long readout window, as the shipped one has
    save_model(load_model(model_path), tmp_path / "long.pt", {"long_window_s": 1.25})
    app = create_app(Settings(model=tmp_path / "long.pt", threshold=0.9))
    with serving(app) as url:
        service = app.state.service
        for _ in range(5):  # the server's memory history, from before the page was opened
            service.memory.record()
        browser = Chromium(tmp_path / "chromium-profile")
        try:
            browser.open(url + "/")
            browser.wait_for("document.body.dataset.events === 'open'")  # /events connected
            history = browser.wait_for("memory.length")  # from /stats/memory, before any poll
            no_listener = browser.wait_for("document.getElementById('level').dataset.state === 'off' && "
                                           "document.getElementById('level-hint').innerText")
            detector = browser.wait_for("document.getElementById('detector').innerText")
            bus = service.bus
            for step in range(13):  # three seconds of scores, "marvin" rising and falling
                t = 0.25 * step
                marvin = 0.99 * math.exp(-((t - 2.0) / 0.6) ** 2)
                scores = {"marvin": marvin, "sheila": 0.2 * (1 - marvin),
                          "_background_": 0.8 * (1 - marvin)}
                bus.publish_scores(LiveScores(time_s=t, top=[
                    Score(label=k, score=v) for k, v in sorted(scores.items(), key=lambda kv: -kv[1])]))
                if step == 8:
                    bus.publish(2.0, "marvin", 0.99)  # the detection reports the peak
            bus.publish_level(InputLevel(time_s=3.0, rms_dbfs=-23.4, peak_dbfs=-7.9,
                                         state="listening"))
            shown = browser.wait_for(
                "document.querySelector('.detection[data-label=\"marvin\"]')?.innerText")
            lines = browser.wait_for("document.getElementById('timeline').dataset.marks && "
                                     "document.getElementById('timeline').dataset.lines")
            level = browser.wait_for("document.getElementById('level').dataset.state === "
                                     "'listening' && document.getElementById('level').innerText")
            bars = browser.wait_for(
                "[...document.querySelectorAll('#scores .bar')].map(b => b.dataset.label).join()")
            memory = browser.wait_for("document.getElementById('memory-facts').innerText")  # filled by a poll
            browser.screenshot(ARTIFACTS / "dashboard.png")
            time.sleep(2.5)  # no level for two seconds: the input is gone
            gone = browser.evaluate("document.getElementById('level').dataset.state")
        finally:
            browser.close()
    assert history >= 5 and "start the service with --listen" in no_listener  # not a red alarm
    assert "threshold 0.900 ·" in detector and "all 35" in detector  # three decimals: defaults near 1
    assert "the lower of its 1-s and 1.25-s scores" in detector
    assert "marvin" in shown and "0.99" in shown
    assert sorted(lines.split(",")) == ["_background_", "marvin", "sheila"]
    assert "-23 dBFS" in level and "listening" in level.lower()
    assert bars == "_background_,sheila,marvin"  # the last scores, best first
    assert "RSS" in memory and "MiB" in memory  # the benches' unit
    assert gone == "off"  # levels stopped, and no listener runs: nothing is wrong with an input
    assert (ARTIFACTS / "dashboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_typed_token_replaces_a_stale_one_from_the_link(model_path, tmp_path):  # noqa: F811
    app = create_app(Settings(model=model_path, api_token="s3cret"))
    with serving(app) as url:
        browser = Chromium(tmp_path / "chromium-profile")
        try:
            browser.open(url + "/#token=stale")  # a bookmark from an earlier run
            browser.wait_for("document.getElementById('token-form').classList.contains('shown')")
            address = browser.evaluate("location.href")
            browser.evaluate("document.getElementById('token').value = 's3cret'; "
                             "document.getElementById('token-form').requestSubmit()")
            browser.wait_for("document.body.dataset.events === 'open'")
            after = browser.evaluate("[location.href, document.getElementById('token-form').classList.contains('shown')]")
        finally:
            browser.close()
    assert address == url + "/"  # the link's token is taken out of the address bar
    assert after == [url + "/", False]


def test_a_classified_clip_stays_shown_while_live_scores_arrive(model_path, tmp_path):  # noqa: F811
    import io

    import numpy as np
    import soundfile as sf

    wav = io.BytesIO()
    t = np.arange(32000) / 16000
    sf.write(wav, (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000, format="WAV")
    app = create_app(Settings(model=model_path))
    with serving(app) as url:
        browser = Chromium(tmp_path / "chromium-profile")
        try:
            browser.open(url + "/")
            browser.wait_for("document.body.dataset.events === 'open'")
            browser.evaluate(f"""
                const bytes = Uint8Array.from(atob("{base64.b64encode(wav.getvalue()).decode()}"), (c) => c.charCodeAt(0));
                const files = new DataTransfer();
                files.items.add(new File([bytes], "tone.wav", {{ type: "audio/wav" }}));
                document.getElementById("clip").files = files.files;
                document.getElementById("clip-form").requestSubmit();""")
            clip = browser.wait_for("document.getElementById('clip-result').innerText")
            app.state.service.bus.publish_scores(LiveScores(time_s=1.0, top=[Score(label="yes", score=0.9)]))
            live = browser.wait_for("document.getElementById('scores-title').textContent.includes('live') && "
                                    "document.getElementById('scores').innerText")
            still = browser.evaluate("document.getElementById('clip-result').innerText")
            # A listener that runs but hears nothing is the red alarm (checked in one synchronous step).
            alarm = browser.evaluate("listenerState = 'running'; lastLevelAt = 0; watchInput(); "
                                     "document.getElementById('level').dataset.state")
        finally:
            browser.close()
    assert "tone.wav (2.00 s)" in clip and "heard:" in clip
    assert "yes" in live and still == clip
    assert alarm == "no input"
