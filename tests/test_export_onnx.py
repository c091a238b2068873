"""`kws export CHECKPOINT OUT.onnx`: one streaming step as an ONNX graph with explicit state,
which onnxruntime runs chunk by chunk to the checkpoint's `model.stream` logits."""

import numpy as np
import pytest

from conftest import noisy_bursts
from kws.cli import main
from kws.model import save_model
from test_runtime import MODELS, reference_logits, small_model

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from kws.export import OnnxStream  # noqa: E402


CASES = [(kind, steps) for kind in MODELS if kind != "paper" for steps in (1, 3)] + [("paper", 40)]


@pytest.mark.parametrize("kind, steps", CASES)
def test_onnx_runs_chunk_by_chunk_to_the_torch_stream(kind, steps, tmp_path, capsys):
    model = small_model(kind, seed=13)
    save_model(model, tmp_path / "m.pt")
    assert main(["export", str(tmp_path / "m.pt"), str(tmp_path / "m.onnx"), "--steps", str(steps)]) == 0
    assert "wrote" in capsys.readouterr().err
    stream = OnnxStream(tmp_path / "m.onnx")
    assert stream.labels == model.cfg.labels and stream.samples_per_call == steps * model.cfg.stride
    audio = noisy_bursts(2.0, seed=14)
    audio = audio[: min(120, len(audio) // stream.samples_per_call) * stream.samples_per_call]
    state, got = stream.start_state(), []
    for start in range(0, len(audio), stream.samples_per_call):
        logits, state = stream.stream(audio[start:start + stream.samples_per_call], state)
        got.append(logits)
    np.testing.assert_allclose(np.concatenate(got), reference_logits(model, audio), atol=2e-5, rtol=1e-4)


def test_the_start_state_in_the_metadata_is_the_models(tmp_path):
    model = small_model("edge", seed=15)
    save_model(model, tmp_path / "m.pt")
    assert main(["export", str(tmp_path / "m.pt"), str(tmp_path / "m.onnx")]) == 0
    start = OnnxStream(tmp_path / "m.onnx").start_state()
    expected = [t for t in model.primed_state(1) if t is not None]
    assert list(start) == ["audio_state", "line_0", "hidden_0", "line_1", "hidden_1"]
    for got, want in zip(start.values(), expected):
        np.testing.assert_allclose(got, want.numpy(), atol=1e-7)


def test_the_models_thresholds_and_long_window_are_in_the_metadata(tmp_path):
    import json

    import onnxruntime

    save_model(small_model("edge", seed=15), tmp_path / "m.pt",
               {"thresholds": {"yes": 0.9}, "long_window_s": 1.25})
    assert main(["export", str(tmp_path / "m.pt"), str(tmp_path / "m.onnx")]) == 0
    meta = onnxruntime.InferenceSession(str(tmp_path / "m.onnx")).get_modelmeta().custom_metadata_map
    assert json.loads(meta["kws.thresholds"]) == {"yes": 0.9}
    assert float(meta["kws.long_window_s"]) == 1.25


def test_onnx_without_the_onnx_package_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    import sys

    save_model(small_model("edge"), tmp_path / "m.pt")
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(["export", str(tmp_path / "m.pt"), str(tmp_path / "m.onnx")]) == 2
    assert "pip install 'kws[onnx]'" in capsys.readouterr().err
