"""Checkpoints: a saved model loads back identical, and anything else is refused with a
CheckpointError that says what is wrong, without ever running code from the file."""

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import torch

from kws.cli import main as kws_main
from kws.model import (MGRADE, CheckpointError, average_models, load_model, preset, read_checkpoint,
                       save_model)

LABELS = ("yes", "no", "_background_")


def small_model(seed: int = 0, **overrides) -> MGRADE:
    torch.manual_seed(seed)
    settings = dict(n_layers=2, width=16, frontend_filters=8, delay_window=8, n_taps=3)
    return MGRADE(preset("edge", LABELS, **{**settings, **overrides}))


@pytest.fixture
def saved(tmp_path) -> Path:
    path = tmp_path / "model.pt"
    save_model(small_model(), path, meta={"epoch": 3})
    return path


def rewrite(path: Path, **changes):
    """Re-save a checkpoint's payload with some entries replaced (None removes one)."""
    payload = torch.load(path, weights_only=True)
    for key, value in changes.items():
        if value is None:
            payload.pop(key)
        else:
            payload[key] = value
    torch.save(payload, path)


def test_round_trip_gives_identical_outputs_config_and_meta(saved):
    model = small_model().eval()
    loaded = load_model(saved)
    assert not loaded.training
    assert loaded.cfg == model.cfg
    audio = torch.randn(2, 3000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(audio), model(audio))
        state_a, state_b = model.initial_state(2), loaded.initial_state(2)
        for start in range(0, 3000, 700):
            out_a, state_a = model.stream(audio[:, start:start + 700], state_a)
            out_b, state_b = loaded.stream(audio[:, start:start + 700], state_b)
            assert torch.equal(out_a, out_b)
    assert read_checkpoint(saved)[2] == {"epoch": 3}


def test_round_trip_keeps_trained_positions_and_sigma(tmp_path):
    model = small_model()
    model.set_sigma(0.7)
    with torch.no_grad():
        model.layers[0].delay.positions.add_(0.3).clamp_(0, 7)
    save_model(model, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt")
    assert torch.equal(loaded.layers[0].delay.positions, model.layers[0].delay.positions)
    assert torch.equal(loaded.layers[1].delay.sigma, model.layers[1].delay.sigma)


def test_saving_leaves_no_temporary_file(saved):
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


def refused(path, *words: str) -> str:
    with pytest.raises(CheckpointError) as error:
        load_model(path)
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message
    return message


def test_missing_file_is_refused(tmp_path):
    refused(tmp_path / "absent.pt", "no model file")
    refused(tmp_path, "no model file")  # a folder is not a model file either


@pytest.mark.parametrize("keep", [0, 100, 0.5, -10], ids=["empty", "100-bytes", "half", "last-bytes-lost"])
def test_truncated_file_is_refused(saved, keep):
    data = saved.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    saved.write_bytes(data[:cut])
    refused(saved, "damaged or not a kws checkpoint")


def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    refused(path, "damaged or not a kws checkpoint")


@pytest.mark.parametrize("data", [{"weights": torch.ones(3)}, [torch.ones(2)], torch.zeros(4),
                                  {"format": "other", "version": 1}],
                         ids=["dict", "list", "tensor", "other-format"])
def test_foreign_torch_file_is_refused(tmp_path, data):
    path = tmp_path / "foreign.pt"
    torch.save(data, path)
    refused(path, "not a kws checkpoint")


class Payload:
    """Unpickling this would create a marker file: proof that the file's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickled_code_is_refused_without_running(tmp_path, writer):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pt"
    payload = {"format": "kws-mgrade", "version": 1, "config": "{}", "state_dict": Payload(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match="damaged or not a kws checkpoint"):
        load_model(path)
    assert not marker.exists()


def test_other_checkpoint_version_is_refused(saved):
    rewrite(saved, version=99)
    refused(saved, "version 99")


@pytest.mark.parametrize("config, words", [
    (None, ["no config"]),
    ("{not json", ["invalid config"]),
    ("[1, 2]", ["invalid config", "not a JSON object"]),
    ('{"width": "16"}', ["invalid config", "'width'"]),
    ('{"stride": 1.5}', ["invalid config", "'stride'"]),
    ('{"labels": ["only-one"]}', ["invalid config", "two labels"]),
    ('{"frontend": "fft"}', ["invalid config", "frontend"]),
])
def test_invalid_config_is_refused(saved, config, words):
    rewrite(saved, config=config)
    refused(saved, *words)


def test_weights_of_another_shape_are_refused(saved, tmp_path):
    other = tmp_path / "wide.pt"
    save_model(small_model(width=24), other)
    rewrite(saved, state_dict=torch.load(other, weights_only=True)["state_dict"])
    refused(saved, "weights do not match its config", "(24,")


def test_missing_and_unexpected_weights_are_named(saved):
    weights = torch.load(saved, weights_only=True)["state_dict"]
    weights["extra.weight"] = weights.pop("decoder.weight")
    rewrite(saved, state_dict=weights)
    refused(saved, "missing decoder.weight", "unexpected extra.weight")


def test_config_and_weights_of_different_models_are_refused(saved):
    payload = torch.load(saved, weights_only=True)
    config = json.loads(payload["config"])
    rewrite(saved, config=json.dumps({**config, "n_layers": 3}))
    refused(saved, "missing layers.2.")


@pytest.mark.parametrize("state_dict", [None, [1, 2], {"decoder.weight": 1.0}], ids=["none", "list", "numbers"])
def test_checkpoint_without_weights_is_refused(saved, state_dict):
    rewrite(saved, state_dict=state_dict)
    refused(saved, "holds no weights")


def test_non_finite_weights_are_refused(saved):
    weights = torch.load(saved, weights_only=True)["state_dict"]
    weights["decoder.bias"][0] = float("nan")
    rewrite(saved, state_dict=weights)
    refused(saved, "decoder.bias is not finite")


def test_invalid_meta_is_refused(saved):
    rewrite(saved, meta="[]")
    refused(saved, "invalid metadata")


# ----------------------------------------------------------------------------- averaging

def fine_tune_of(model: MGRADE, seed: int, shift: float) -> MGRADE:
    """A stand-in for a fine-tune: the same model, every weight moved a little, its taps by `shift`."""
    tuned = MGRADE(model.cfg)
    tuned.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in tuned.named_parameters():
            if name.endswith(".positions"):
                value.add_(shift).clamp_(0, model.cfg.delay_window - 1)
            else:
                value.add_(0.1 * torch.randn(value.shape, generator=generator))
    return tuned


def test_average_is_the_mean_of_the_weights_with_taps_at_the_rounded_mean_position(tmp_path):
    base = small_model()
    with torch.no_grad():
        for layer in base.layers:
            layer.delay.positions.round_().clamp_(1, 6)
    paths = []
    for seed, shift in enumerate([0.0, 1.0, 1.0]):
        paths.append(tmp_path / f"tuned{seed}.pt")
        save_model(fine_tune_of(base, seed, shift), paths[-1], meta={"thresholds": {"yes": 0.9}, "long_window_s": 1.25, "seed": seed})
    tuned = [load_model(p).state_dict() for p in paths]
    model, meta = average_models(paths)
    for name, value in model.state_dict().items():
        mean = sum(t[name] for t in tuned) / 3
        if name.endswith(".positions"):
            assert torch.equal(value, mean.round())  # two of three taps moved by 1: the mean moves by 2/3
            assert torch.equal(value, tuned[1][name])
        else:
            assert torch.allclose(value, mean, atol=1e-6), name
    assert [source["seed"] for source in meta["averaged"]] == [0, 1, 2]
    assert all("thresholds" not in source and "long_window_s" not in source
               for source in meta["averaged"])
    save_model(model, tmp_path / "soup.pt", meta)
    soup = load_model(tmp_path / "soup.pt")
    assert (soup.thresholds, soup.long_window_s) == ({}, 0.0)


def test_averaging_one_model_with_itself_changes_no_output(saved):
    model, _ = average_models([saved, saved])
    audio = torch.randn(1, 4000, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(model(audio), load_model(saved)(audio), atol=1e-6)


def test_the_average_runs_with_the_first_checkpoints_settings(tmp_path):
    base = small_model()
    lower = MGRADE(dataclasses.replace(base.cfg, power_floor=1e-8)).eval()
    lower.load_state_dict(base.state_dict())
    save_model(base, tmp_path / "base.pt")
    save_model(lower, tmp_path / "lower.pt")
    assert average_models([tmp_path / "lower.pt", tmp_path / "base.pt"])[0].cfg.power_floor == 1e-8
    assert average_models([tmp_path / "base.pt", tmp_path / "lower.pt"])[0].cfg.power_floor == 1e-6


def test_averaging_refuses_different_models_and_different_licences(saved, tmp_path):
    save_model(small_model(width=24), tmp_path / "wide.pt")
    save_model(small_model(), tmp_path / "nc.pt", meta={"license": "CC-BY-NC-SA-4.0"})
    for others, words in [([], "at least two"), ([tmp_path / "wide.pt"], "not the same model"),
                          ([tmp_path / "nc.pt"], "different licences")]:
        with pytest.raises(CheckpointError, match=words):
            average_models([saved, *others])


def test_average_command_writes_a_checkpoint_and_refuses_bad_input_in_one_line(saved, tmp_path, capsys):
    assert kws_main(["average", str(saved), str(saved), "--out", str(tmp_path / "soup.pt")]) == 0
    assert read_checkpoint(tmp_path / "soup.pt")[2]["averaged"][0]["epoch"] == 3
    assert kws_main(["average", str(saved), str(tmp_path / "missing.pt"), "--out", str(tmp_path / "x.pt")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "missing.pt" in error
    assert not (tmp_path / "x.pt").exists()
    assert kws_main(["average", str(saved), str(saved), "--out", str(tmp_path / "soup.npz")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "name it .pt" in error and not (tmp_path / "soup.npz").exists()
    assert kws_main(["average", str(saved), str(tmp_path / "model.npz"), "--out", str(tmp_path / "x.pt")]) == 2
    assert "model file for listen and serve" in capsys.readouterr().err
