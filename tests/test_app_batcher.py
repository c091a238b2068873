"""The /predict batcher: clips queued together are classified together, grouped by length, each
answer exactly what the clip alone gets; a failure answers only its own batch."""

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from app.batcher import ClipBatcher
from kws.model import MGRADE, preset
from kws.runtime import StreamEngine

LABELS = ("yes", "no", "_background_")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MGRADE(preset("edge", LABELS, n_layers=2, width=16, delay_window=8, n_taps=3,
                         frontend_filters=8)).eval()


class HeldModel:
    """The model's engine, but its first classify waits until `release` is set: the clips
    submitted meanwhile queue up, as under concurrent load."""

    def __init__(self, model, fail_on_batch_of: int | None = None):
        self.engine = StreamEngine.from_model(model)
        self.release, self.entered = threading.Event(), threading.Event()
        self.batch_sizes = []
        self.fail_on_batch_of = fail_on_batch_of

    def classify(self, audio):
        self.entered.set()
        self.release.wait(10)
        self.batch_sizes.append(audio.shape[0])
        if audio.shape[0] == self.fail_on_batch_of:
            raise RuntimeError("model failed")
        return self.engine.classify(audio)


def clip(seed: int, seconds: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(16000 * seconds))).astype(np.float32)


def alone(model, audio: np.ndarray) -> np.ndarray:
    """The clip's logits from the PyTorch model's classify, the reference."""
    with torch.inference_mode():
        return model.classify(torch.from_numpy(audio)[None])[0].numpy()


def test_queued_clips_are_batched_by_length_and_answered_as_if_alone(model):
    held = HeldModel(model)
    batcher = ClipBatcher(held, max_batch=16)
    try:
        first = batcher.submit(clip(0))
        assert held.entered.wait(10)
        clips = [clip(1), clip(2), clip(3, seconds=1.5), clip(4), clip(5, seconds=1.5)]
        futures = [batcher.submit(c) for c in clips]
        held.release.set()
        results = [f.result(10) for f in futures]
    finally:
        batcher.stop()
    assert sorted(held.batch_sizes) == [1, 2, 3]  # the first alone, then one batch per length
    np.testing.assert_allclose(first.result(), alone(model, clip(0)), rtol=1e-4, atol=2e-5)
    for c, got in zip(clips, results):
        np.testing.assert_allclose(got, alone(model, c), rtol=1e-4, atol=2e-5)
    assert batcher.batches == 3 and batcher.clips == 6


def test_max_batch_caps_a_batch(model):
    held = HeldModel(model)
    batcher = ClipBatcher(held, max_batch=2)
    try:
        batcher.submit(clip(0))
        assert held.entered.wait(10)
        futures = [batcher.submit(clip(i)) for i in range(1, 6)]
        held.release.set()
        for f in futures:
            f.result(10)
    finally:
        batcher.stop()
    assert held.batch_sizes == [1, 2, 2, 1]


def test_a_failing_batch_answers_its_requests_and_the_batcher_goes_on(model):
    held = HeldModel(model, fail_on_batch_of=2)
    batcher = ClipBatcher(held)
    try:
        batcher.submit(clip(0))
        assert held.entered.wait(10)
        failing = [batcher.submit(clip(1)), batcher.submit(clip(2))]
        held.release.set()
        for f in failing:
            with pytest.raises(RuntimeError, match="model failed"):
                f.result(10)
        later = batcher.submit(clip(3))
        np.testing.assert_allclose(later.result(10), alone(model, clip(3)), rtol=1e-4, atol=2e-5)
    finally:
        batcher.stop()


def test_a_cancelled_request_is_skipped(model):
    held = HeldModel(model)
    batcher = ClipBatcher(held)
    try:
        batcher.submit(clip(0))
        assert held.entered.wait(10)
        cancelled, kept = batcher.submit(clip(1)), batcher.submit(clip(2))
        assert cancelled.cancel()
        held.release.set()
        kept.result(10)
    finally:
        batcher.stop()
    assert held.batch_sizes == [1, 1] and batcher.clips == 2


# A batch's working arrays, a few hundred KB each, allocated and freed together 50 times, in a
# fresh process (malloc's thresholds adapt to what a process did before); prints page faults.
_BATCHES = """import resource, sys
import numpy as np
from app.batcher import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory()
rng = np.random.default_rng(0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    arrays = [np.ones(n, np.float32) for n in rng.integers(50_000, 250_000, 12)]
    del arrays
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_batch_memory_is_reused_instead_of_page_faulted_in_again():
    def faults(mode: str) -> int:
        return int(subprocess.run([sys.executable, "-c", _BATCHES, mode], check=True,
                                  capture_output=True, text=True).stdout)
    assert faults("reuse") * 5 < faults("default")
