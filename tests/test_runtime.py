"""The NumPy stream engine computes what `MGRADE.stream` computes, for every model shape, in
any chunking, with a fixed-size state, and is rebuilt when the weights change."""

import warnings

import numpy as np
import pytest
import torch

from conftest import noisy_bursts
from kws import default_model_path
from kws.model import MGRADE, load_model, preset
from kws.runtime import SCAN_BLOCK

LABELS = ("yes", "no", "_background_")
SMALL = dict(n_layers=2, width=16, delay_window=8, n_taps=3, clip_context_s=0.05)
MODELS = {
    "edge": dict(name="edge", frontend_filters=8, **SMALL),
    "paper": dict(name="paper", **SMALL),
    "no-delay": dict(name="edge", frontend_filters=8, use_delay=False, **SMALL),
    "no-mingru": dict(name="edge", frontend_filters=8, use_mingru=False, **SMALL),
}


def small_model(kind: str, seed: int = 0) -> MGRADE:
    settings = dict(MODELS[kind])
    name = settings.pop("name")
    torch.manual_seed(seed)
    return MGRADE(preset(name, LABELS, **settings)).eval()


def reference_logits(model: MGRADE, audio: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        logits, _ = model.stream(torch.from_numpy(audio)[None], model.primed_state(1))
    return logits[0].numpy()


def engine_logits(model: MGRADE, audio: np.ndarray, sizes) -> tuple[np.ndarray, list]:
    """Every per-step logit of `audio` fed in chunks whose sizes cycle through `sizes`."""
    engine = model.stream_engine()
    state, outputs, start, i = engine.start_state(), [], 0, 0
    while start < len(audio):
        logits, state = engine.stream(audio[start:start + sizes[i % len(sizes)]], state)
        outputs.append(logits)
        start, i = start + sizes[i % len(sizes)], i + 1
    return np.concatenate(outputs), state


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("sizes", [(1,), (97, 512, 3), (16000,)], ids=["1", "mixed", "long"])
def test_engine_gives_the_torch_stream_logits_in_any_chunking(kind, sizes):
    model = small_model(kind)
    audio = noisy_bursts(1.0 if kind == "paper" else 2.0, seed=1)
    expected = reference_logits(model, audio)
    got, _ = engine_logits(model, audio, sizes)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)


def test_engine_gives_the_shipped_models_logits():
    model = load_model(default_model_path())
    audio = noisy_bursts(3.0, seed=2)
    expected = reference_logits(model, audio)
    got, _ = engine_logits(model, audio, (512,))
    assert np.abs(got - expected).max() < 1e-5 * np.abs(expected).max() + 1e-4


def test_gaussian_taps_at_inference_are_read_in_full():
    model = small_model("edge")
    model.set_gaussian_at_inference(True)  # every tap of the window is non-zero
    try:
        audio = noisy_bursts(1.0, seed=3)
        got, _ = engine_logits(model, audio, (512,))
        np.testing.assert_allclose(got, reference_logits(model, audio), atol=2e-5, rtol=1e-4)
    finally:
        model.set_gaussian_at_inference(False)


@pytest.mark.parametrize("bias", [80.0, 100.0], ids=["underflow", "overflow"])
def test_saturated_gates_take_the_step_by_step_form_without_warnings(bias):
    # A gate bias of 80 keeps exp(-80) of the state per step: the running product underflows
    # within one block, so the closed form would divide by zero. At 100, exp overflows float32
    # and the keep gate is exactly 0, as PyTorch's sigmoid is exactly 1.
    model = small_model("edge", seed=4)
    with torch.no_grad():
        for layer in model.layers:
            layer.mingru.to_gate_and_candidate.bias[:SMALL["width"]] = bias
    audio = noisy_bursts(1.0, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, _ = engine_logits(model, audio, (SCAN_BLOCK * 160 + 160,))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, reference_logits(model, audio), atol=2e-5, rtol=1e-4)


def test_engine_state_keeps_its_size_whatever_the_chunking():
    model = small_model("edge")
    start = model.stream_engine().start_state()
    for sizes in [(1,), (333, 5000), (16000,)]:
        _, state = engine_logits(model, noisy_bursts(3.0, seed=6), sizes)
        assert [None if s is None else s.shape for s in state[1:]] == \
               [None if s is None else s.shape for s in start[1:]]
        assert len(state[0]) < model.cfg.frontend_kernel


def test_engine_is_shared_until_the_weights_change():
    model = small_model("edge", seed=7)
    engine = model.stream_engine()
    assert model.stream_engine() is engine
    audio = noisy_bursts(1.0, seed=8)
    before, _ = engine_logits(model, audio, (512,))
    with torch.no_grad():
        model.decoder.bias += 1.0
    assert model.stream_engine() is not engine
    after, _ = engine_logits(model, audio, (512,))
    np.testing.assert_allclose(after, before + 1.0, atol=1e-4)
    np.testing.assert_allclose(after, reference_logits(model, audio), atol=2e-5, rtol=1e-4)


def test_engine_refuses_a_model_in_training_mode():
    model = small_model("edge").train()
    try:
        with pytest.raises(ValueError, match="eval"):
            model.stream_engine()
    finally:
        model.eval()
