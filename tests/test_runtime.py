"""The NumPy engine computes what `MGRADE.stream` and `MGRADE.classify` compute, for every
model shape, in any chunking, with a fixed-size state; its torch-free file (`kws export`) gives
the same numbers, and a damaged or foreign file is a clear error."""

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch

from conftest import noisy_bursts
from kws import MODELS_DIR, PROJECT_LICENSE
from kws.cli import main
from kws.model import MGRADE, load_model, preset
from kws.runtime import EngineFileError, StreamEngine, load_engine, save_engine

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


def engine_logits(model, audio: np.ndarray, sizes) -> tuple[np.ndarray, list]:
    """Every per-step logit of `audio` fed in chunks whose sizes cycle through `sizes`, by the
    engine of `model` (a torch MGRADE, or an engine already)."""
    engine = model if isinstance(model, StreamEngine) else StreamEngine.from_model(model)
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


def test_gaussian_taps_at_inference_are_read_in_full():
    model = small_model("edge")
    model.set_gaussian_at_inference(True)  # every tap of the window is non-zero
    try:
        audio = noisy_bursts(1.0, seed=3)
        got, _ = engine_logits(model, audio, (512,))
        np.testing.assert_allclose(got, reference_logits(model, audio), atol=2e-5, rtol=1e-4)
    finally:
        model.set_gaussian_at_inference(False)


def test_the_engine_reads_the_models_power_floor_and_takes_1e_6_where_a_file_has_none():
    audio = 1e-3 * noisy_bursts(1.0, seed=4)  # quiet: many bands near the floor
    torch.manual_seed(0)
    low = MGRADE(preset("edge", LABELS, frontend_filters=8, power_floor=1e-10, **SMALL)).eval()
    got, _ = engine_logits(low, audio, (512,))
    np.testing.assert_allclose(got, reference_logits(low, audio), atol=2e-5, rtol=1e-4)
    # A file exported before the floor was a setting: its description has no power_floor.
    description, arrays = low.inference_arrays()
    del description["model"]["power_floor"]
    older, _ = engine_logits(StreamEngine(description, arrays), audio, (512,))
    at_default = MGRADE(dataclasses.replace(low.cfg, power_floor=1e-6)).eval()
    at_default.load_state_dict(low.state_dict())
    np.testing.assert_allclose(older, reference_logits(at_default, audio), atol=2e-5, rtol=1e-4)
    assert np.abs(older - got).max() > 1e-3  # the two floors do differ on this audio


@pytest.mark.parametrize("bias", [80.0, 100.0], ids=["underflow", "overflow"])
def test_saturated_gates_give_the_torch_logits_without_warnings(bias):
    # A gate bias of 80 keeps exp(-80) of the state per step: the scan's running products
    # underflow to 0 within a few steps. At 100, exp overflows float32 and the keep gate is
    # exactly 0, as PyTorch's sigmoid is exactly 1. Long chunks and single steps both scan.
    model = small_model("edge", seed=4)
    with torch.no_grad():
        for layer in model.layers:
            layer.mingru.to_gate_and_candidate.bias[:SMALL["width"]] = bias
    audio = noisy_bursts(1.0, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, _ = engine_logits(model, audio, (8000, 160))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, reference_logits(model, audio), atol=2e-5, rtol=1e-4)


def test_engine_state_keeps_its_size_whatever_the_chunking():
    model = small_model("edge")
    start = StreamEngine.from_model(model).start_state()
    for sizes in [(1,), (333, 5000), (16000,)]:
        _, state = engine_logits(model, noisy_bursts(3.0, seed=6), sizes)
        assert [a.shape for a in state.arrays()[1:]] == [a.shape for a in start.arrays()[1:]]
        assert len(state.audio) < model.cfg.frontend_kernel
        assert [(s.line is None, s.hidden is None) for s in state.layers] == [(False, False)] * 2


def test_stream_leaves_the_state_it_was_given_unchanged():
    engine = StreamEngine.from_model(small_model("edge", seed=7))
    audio = noisy_bursts(1.0, seed=8)
    state = engine.start_state()
    before = [a.copy() for a in state.arrays()]
    first, _ = engine.stream(audio, state)
    again, _ = engine.stream(audio, state)
    np.testing.assert_array_equal(first, again)
    for a, b in zip(before, state.arrays()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", MODELS)
def test_batched_classify_gives_torch_classify_for_every_clip(kind):
    model = small_model(kind, seed=9)
    seconds = 0.5 if kind == "paper" else 1.0
    clips = np.stack([noisy_bursts(seconds, seed=s) for s in range(5)])
    with torch.inference_mode():
        expected = model.classify(torch.from_numpy(clips)).numpy()
    engine = StreamEngine.from_model(model)
    got = engine.classify(clips)
    assert got.shape == (5, len(LABELS))
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(engine.classify(clips[2:3])[0], got[2], atol=1e-6)


def test_the_engine_refuses_a_model_in_training_mode():
    model = small_model("edge").train()
    with pytest.raises(ValueError, match="eval"):
        StreamEngine.from_model(model)


# ----------------------------------------------------------------------------- the model file

@pytest.mark.parametrize("name, license", [("mgrade-edge", PROJECT_LICENSE),
                                           ("mgrade-edge-distilled", "CC-BY-NC-SA-4.0")])
def test_each_shipped_file_gives_its_checkpoints_stream_within_1e4_under_its_licence(name, license):
    """models/NAME.npz is what `kws export` makes of models/NAME.pt; the default is the
    project's own, the opt-in distilled model carries its teacher's licence in both files."""
    model = load_model(MODELS_DIR / f"{name}.pt")
    engine = load_engine(MODELS_DIR / f"{name}.npz")
    assert model.license == engine.license == license
    assert engine.thresholds == model.thresholds and engine.thresholds  # chosen on validation streams
    assert engine.long_window_s == model.long_window_s  # the readout they were chosen with
    audio = noisy_bursts(4.0, seed=10)
    expected = reference_logits(model, audio)
    for sizes in [(512,), (160, 7, 4000)]:
        got, _ = engine_logits(engine, audio, sizes)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < 1e-4
    assert engine.labels == model.cfg.labels and engine.stride == model.cfg.stride


@pytest.mark.parametrize("kind", MODELS)
def test_export_writes_a_file_that_streams_as_the_checkpoint(kind, tmp_path, capsys):
    from kws.model import save_model

    model = small_model(kind, seed=11)
    save_model(model, tmp_path / "m.pt")
    assert main(["export", str(tmp_path / "m.pt"), str(tmp_path / "m.npz")]) == 0
    assert "wrote" in capsys.readouterr().err
    with np.load(tmp_path / "m.npz", allow_pickle=False) as npz:  # no pickle anywhere
        config = json.loads(str(npz["config"]))
        assert all(npz[name].dtype != object for name in npz.files)
    assert config["format"] == "kws-engine" and config["model"]["n_layers"] == 2
    audio = noisy_bursts(1.0, seed=12)
    got, _ = engine_logits(load_engine(tmp_path / "m.npz"), audio, (97, 512))
    np.testing.assert_allclose(got, reference_logits(model, audio), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["m.bin", "m", "m.ONNX", "m.npz.tmp"])
def test_export_refuses_a_file_name_it_would_not_write_as_named(name, tmp_path, capsys):
    from kws.model import save_model

    save_model(small_model("edge"), tmp_path / "m.pt")
    assert main(["export", str(tmp_path / "m.pt"), str(tmp_path / name)]) == 2
    assert "must end in .npz, .onnx, .pt" in capsys.readouterr().err
    assert not (tmp_path / name).exists()


def test_export_stores_per_word_thresholds_that_travel_from_checkpoint_to_model_file(tmp_path, capsys):
    from kws.model import read_checkpoint, save_model
    from kws.stream import DEFAULT_THRESHOLD, Detector

    save_model(small_model("edge", seed=11), tmp_path / "m.pt", {"history": []})
    (tmp_path / "t.json").write_text(json.dumps({"thresholds": {"yes": 0.9}}))
    assert load_model(tmp_path / "m.pt").thresholds == {}
    # into a copy of the checkpoint (its meta kept), then on into the model file by default
    assert main(["export", str(tmp_path / "m.pt"), str(tmp_path / "tuned.pt"),
                 "--thresholds", str(tmp_path / "t.json")]) == 0
    assert load_model(tmp_path / "tuned.pt").thresholds == {"yes": 0.9}
    assert read_checkpoint(tmp_path / "tuned.pt")[2]["history"] == []
    assert main(["export", str(tmp_path / "tuned.pt"), str(tmp_path / "tuned.npz")]) == 0
    engine = load_engine(tmp_path / "tuned.npz")
    assert engine.thresholds == {"yes": 0.9}
    assert Detector(engine).thresholds == {"yes": 0.9}  # the model's words by default
    assert Detector(engine, words=["yes", "no"]).thresholds == {"yes": 0.9, "no": DEFAULT_THRESHOLD}
    # straight into a model file
    assert main(["export", str(tmp_path / "m.pt"), str(tmp_path / "m.npz"),
                 "--thresholds", str(tmp_path / "t.json")]) == 0
    assert load_engine(tmp_path / "m.npz").thresholds == {"yes": 0.9}


def test_the_long_window_travels_with_the_thresholds_it_was_chosen_with(tmp_path, capsys):
    from kws.model import save_model
    from kws.stream import Detector

    save_model(small_model("edge", seed=11), tmp_path / "m.pt")
    chosen = {"thresholds": {"yes": 0.9, "no": 0.7}, "chosen_on": {"long_window_s": 1.25}}
    (tmp_path / "long.json").write_text(json.dumps(chosen))
    (tmp_path / "plain.json").write_text(json.dumps({"thresholds": {"yes": 0.8}}))
    assert load_model(tmp_path / "m.pt").long_window_s == 0.0
    assert main(["export", str(tmp_path / "m.pt"), str(tmp_path / "tuned.pt"),
                 "--thresholds", str(tmp_path / "long.json")]) == 0
    assert load_model(tmp_path / "tuned.pt").long_window_s == 1.25
    # on into the model file with the checkpoint's own thresholds, and into the Detector
    assert main(["export", str(tmp_path / "tuned.pt"), str(tmp_path / "tuned.npz")]) == 0
    engine = load_engine(tmp_path / "tuned.npz")
    assert (engine.thresholds, engine.long_window_s) == ({"yes": 0.9, "no": 0.7}, 1.25)
    assert Detector(engine).long_window_s == 1.25
    assert Detector(engine, long_window_s=0).long_window_s == 0.0  # a caller may turn it off
    # thresholds set by hand change the words they name, and keep the rest of the choice
    assert main(["export", str(tmp_path / "tuned.pt"), str(tmp_path / "hand.npz"),
                 "--thresholds", str(tmp_path / "plain.json")]) == 0
    engine = load_engine(tmp_path / "hand.npz")
    assert (engine.thresholds, engine.long_window_s) == ({"yes": 0.8, "no": 0.7}, 1.25)
    # a choice made without a long window (before it existed) replaces both: none
    (tmp_path / "old.json").write_text(json.dumps({"thresholds": {"yes": 0.8}, "chosen_on": {"minutes": 90}}))
    assert main(["export", str(tmp_path / "tuned.pt"), str(tmp_path / "old.npz"),
                 "--thresholds", str(tmp_path / "old.json")]) == 0
    engine = load_engine(tmp_path / "old.npz")
    assert (engine.thresholds, engine.long_window_s) == ({"yes": 0.8}, 0.0)
    assert "long_window_s" not in engine.description


def test_export_refuses_a_thresholds_file_with_a_bad_long_window(tmp_path, capsys):
    from kws.model import save_model

    save_model(small_model("edge", seed=11), tmp_path / "m.pt")
    (tmp_path / "t.json").write_text(json.dumps({"thresholds": {"yes": 0.9},
                                                 "chosen_on": {"long_window_s": -2}}))
    assert main(["export", str(tmp_path / "m.pt"), str(tmp_path / "m.npz"),
                 "--thresholds", str(tmp_path / "t.json")]) == 2
    assert "long window is -2" in capsys.readouterr().err
    assert not (tmp_path / "m.npz").exists()


def test_the_weights_licence_travels_from_checkpoint_to_every_exported_file(tmp_path, capsys):
    from kws.export import OnnxStream
    from kws.model import save_model

    save_model(small_model("edge"), tmp_path / "plain.pt")
    assert load_model(tmp_path / "plain.pt").license == PROJECT_LICENSE
    save_model(small_model("edge"), tmp_path / "m.pt", {"license": "CC-BY-NC-SA-4.0"})
    assert load_model(tmp_path / "m.pt").license == "CC-BY-NC-SA-4.0"
    for suffix in (".pt", ".npz", ".onnx"):
        assert main(["export", str(tmp_path / "m.pt"), str(tmp_path / f"out{suffix}")]) == 0
    assert load_model(tmp_path / "out.pt").license == "CC-BY-NC-SA-4.0"
    assert load_engine(tmp_path / "out.npz").license == "CC-BY-NC-SA-4.0"
    meta = OnnxStream(tmp_path / "out.onnx").session.get_modelmeta().custom_metadata_map
    assert meta["kws.license"] == "CC-BY-NC-SA-4.0"


def test_a_checkpoint_whose_licence_is_not_a_name_is_refused(tmp_path):
    from kws.model import CheckpointError, save_model

    save_model(small_model("edge"), tmp_path / "m.pt", {"license": 3})
    with pytest.raises(CheckpointError, match="licence"):
        load_model(tmp_path / "m.pt")


@pytest.mark.parametrize("thresholds, words", [
    ({"banana": 0.9}, "not one of the model's words"), ({"yes": 1.5}, "probabilities in"),
    ({"_background_": 0.5}, "not one of the model's words")])
def test_export_refuses_thresholds_that_do_not_fit_the_model(tmp_path, capsys, thresholds, words):
    from kws.model import save_model

    save_model(small_model("edge"), tmp_path / "m.pt")
    (tmp_path / "t.json").write_text(json.dumps({"thresholds": thresholds}))
    assert main(["export", str(tmp_path / "m.pt"), str(tmp_path / "m.npz"),
                 "--thresholds", str(tmp_path / "t.json")]) == 2
    assert words in capsys.readouterr().err and not (tmp_path / "m.npz").exists()


@pytest.fixture
def engine_file(tmp_path):
    description, arrays = small_model("edge").inference_arrays()
    path = tmp_path / "m.npz"
    save_engine(path, description, arrays)
    return path, description, arrays


def test_a_missing_damaged_or_foreign_file_is_one_clear_error(engine_file, tmp_path):
    path, _, _ = engine_file
    cases = {
        tmp_path / "absent.npz": "no model file",
        tmp_path / "cut.npz": "damaged or not a kws model file",
        tmp_path / "foreign.npz": "not a kws model file",
        tmp_path / "m.onnx": "an ONNX graph for other runtimes; kws reads the .npz",
    }
    (tmp_path / "cut.npz").write_bytes(path.read_bytes()[:5000])
    (tmp_path / "m.onnx").write_bytes(b"\x08\x08")  # any ONNX file: refused by its name
    np.savez(tmp_path / "foreign.npz", weights=np.ones(3))
    for bad, words in cases.items():
        with pytest.raises(EngineFileError, match=words):
            load_engine(bad)


@pytest.mark.parametrize("change, words", [
    (lambda d, a: a.pop("layers.1.norm.bias"), "layers.1.norm.bias is missing"),
    (lambda d, a: a.update({"decoder.bias": np.zeros(7, np.float32)}), "decoder.bias is (7,)"),
    (lambda d, a: a.update({"extra": np.zeros(1)}), "unexpected array"),
    (lambda d, a: a["decoder.weight"].__setitem__((0, 0), np.nan), "not finite"),
    (lambda d, a: d["model"].update(width=32), "the config needs"),
    (lambda d, a: d.update(thresholds={"yes": 2.0}), "probabilities in"),
    (lambda d, a: d.update(thresholds=[0.9]), "must map words"),
    (lambda d, a: d.update(long_window_s=-1.0), "long window is -1.0"),
    (lambda d, a: d.update(long_window_s="1.25"), "long window is '1.25'"),
], ids=["missing", "shape", "unexpected", "nan", "config", "threshold", "thresholds",
        "long-window", "long-window-text"])
def test_a_file_whose_arrays_do_not_fit_its_config_is_refused(engine_file, tmp_path, change, words):
    _, description, arrays = engine_file
    description, arrays = json.loads(json.dumps(description)), {k: v.copy() for k, v in arrays.items()}
    change(description, arrays)
    with open(tmp_path / "bad.npz", "wb") as f:
        np.savez(f, config=np.array(json.dumps({"format": "kws-engine", "version": 1, **description})),
                 **arrays)
    with pytest.raises(EngineFileError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_engine(tmp_path / "bad.npz")


def test_a_newer_file_version_names_both_versions(engine_file, tmp_path):
    _, description, arrays = engine_file
    with open(tmp_path / "v2.npz", "wb") as f:
        np.savez(f, config=np.array(json.dumps({"format": "kws-engine", "version": 2, **description})),
                 **arrays)
    with pytest.raises(EngineFileError, match="version 2, this kws reads version 1"):
        load_engine(tmp_path / "v2.npz")


def test_the_engines_erf_is_within_5e7_of_erf_everywhere():
    import math

    from kws.runtime import ERF_RANGE, ERF_STEPS_PER_UNIT, _one_plus_erf

    u = np.concatenate([np.linspace(-9, 9, 100_001), [-6, 6, np.float32(5.9999), -1e4, 1e4]])
    expected = np.array([1 + math.erf(x) for x in u])
    # the table position as fc1 emits it, in float32
    position = (u * ERF_STEPS_PER_UNIT + ERF_RANGE * ERF_STEPS_PER_UNIT).astype(np.float32)
    assert np.abs(_one_plus_erf(position) - expected).max() < 5e-7



class Float64Stream:
    """`model.stream` in float64, chunk by chunk, behind the engine's start_state/stream."""

    def __init__(self, model: MGRADE):
        import copy

        self.model = copy.deepcopy(model).double()

    def start_state(self):
        return self.model.primed_state(1)

    def stream(self, samples, state):
        with torch.no_grad():
            logits, state = self.model.stream(torch.from_numpy(samples).double()[None], state)
        return logits[0].numpy(), state


def test_exports_are_checked_against_the_models_float64_arithmetic():
    from kws.export import check_audio, stream_difference

    model = small_model("edge", seed=3)
    exact = stream_difference(model, Float64Stream(model), check_audio())
    float32 = stream_difference(model, StreamEngine.from_model(model), check_audio())
    assert exact < 1e-9 < float32 < 1e-4  # float32's rounding is measured, not the reference's


def test_an_export_that_fails_its_check_leaves_the_output_as_it_was(tmp_path, capsys, monkeypatch):
    import kws.runtime
    from kws.model import save_model

    class Drifting:
        """An engine whose logits are 0.001 off."""

        def __init__(self, engine):
            self.engine = engine

        def start_state(self):
            return self.engine.start_state()

        def stream(self, samples, state):
            logits, state = self.engine.stream(samples, state)
            return logits + 1e-3, state

    save_model(small_model("edge"), tmp_path / "m.pt")
    (tmp_path / "m.npz").write_bytes(b"an earlier export")
    loaded = kws.runtime.load_engine
    monkeypatch.setattr(kws.runtime, "load_engine", lambda path: Drifting(loaded(path)))
    assert main(["export", str(tmp_path / "m.pt"), str(tmp_path / "m.npz")]) == 2
    assert "differ from the checkpoint's by 0.001" in capsys.readouterr().err
    assert (tmp_path / "m.npz").read_bytes() == b"an earlier export"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["m.npz", "m.pt"]


def test_export_to_a_folder_names_out_and_writes_nothing(tmp_path, capsys):
    from kws.model import save_model

    save_model(small_model("edge"), tmp_path / "m.pt")
    (tmp_path / "out.npz").mkdir()
    assert main(["export", str(tmp_path / "m.pt"), str(tmp_path / "out.npz")]) == 2
    assert capsys.readouterr().err.strip() == f"kws: error: OUT {tmp_path / 'out.npz'} is a folder; give a file name in it"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["m.pt", "out.npz"]
