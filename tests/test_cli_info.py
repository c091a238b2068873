"""`kws info`: a model's size and footprint, as text or one JSON object; a missing or damaged
model is one clear error line and exit status 2, never a traceback."""

import json
import subprocess
import sys

import pytest
import torch

import kws.cli
from kws.cli import main
from kws.model import MGRADE, footprint_bytes, parameter_bytes, parameter_count, preset, save_model, state_bytes

LABELS = ("yes", "no", "_background_")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    model = MGRADE(preset("edge", LABELS, n_layers=2, width=16, frontend_filters=8))
    path = tmp_path_factory.mktemp("models") / "small.pt"
    save_model(model, path)
    return path, model


def run_kws(*args: str) -> subprocess.CompletedProcess:
    """The real command in a fresh interpreter: exit status and streams as a user sees them."""
    return subprocess.run([sys.executable, "-m", "kws.cli", *args], capture_output=True, text=True, timeout=120)


def test_json_is_one_object_consistent_with_the_model(model_file, capsys):
    path, model = model_file
    assert main(["info", "--model", str(path), "--json"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1
    info = json.loads(out)
    assert info["parameters"] == parameter_count(model)
    assert info["state_bytes"] == state_bytes(model.cfg)
    assert info["footprint_bytes"] == footprint_bytes(model) == parameter_bytes(model) + info["state_bytes"]
    assert info["config"]["labels"] == list(LABELS) and info["config"]["n_layers"] == 2


def test_text_names_the_config_and_sizes(model_file, capsys):
    path, model = model_file
    assert main(["info", "--model", str(path)]) == 0
    out = capsys.readouterr().out
    assert "3 (yes, no, _background_)" in out
    assert f"{parameter_count(model):,}" in out and f"{footprint_bytes(model):,}" in out
    for key in ("stride", "n_layers", "width", "parameters", "state_bytes", "footprint_bytes"):
        assert key in out


def test_info_lists_the_models_own_thresholds_and_long_window(model_file, capsys, tmp_path):
    path, model = model_file
    assert main(["info", "--model", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["thresholds"], info["long_window_s"]) == ({}, 0.0)
    (tmp_path / "t.json").write_text(json.dumps({"thresholds": {"no": 0.97},
                                                 "chosen_on": {"long_window_s": 1.25}}))
    assert main(["export", str(path), str(tmp_path / "tuned.npz"), "--thresholds", str(tmp_path / "t.json")]) == 0
    assert main(["info", "--model", str(tmp_path / "tuned.npz"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (info["thresholds"], info["long_window_s"]) == ({"no": 0.97}, 1.25)
    assert main(["info", "--model", str(tmp_path / "tuned.npz")]) == 0
    out = capsys.readouterr().out
    assert "thresholds: no 0.97" in out and "long window: 1.25 s" in out


def test_info_names_the_licence_of_the_weights(model_file, capsys, tmp_path):
    path, model = model_file
    assert main(["info", "--model", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["license"] == "MIT"
    save_model(model, tmp_path / "distilled.pt", {"license": "CC-BY-NC-SA-4.0"})
    assert main(["info", "--model", str(tmp_path / "distilled.pt")]) == 0
    assert "license: CC-BY-NC-SA-4.0" in capsys.readouterr().out


def test_model_from_environment_variable(model_file, capsys, monkeypatch):
    path, model = model_file
    monkeypatch.setenv("KWS_MODEL", str(path))
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == parameter_count(model)


def assert_one_error_line(result: subprocess.CompletedProcess, *words: str):
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kws: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0]


def test_missing_model_is_one_error_line(tmp_path):
    assert_one_error_line(run_kws("info", "--model", str(tmp_path / "absent.pt"), "--json"), "no model file")


def test_missing_default_model_is_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KWS_MODEL", str(tmp_path / "nowhere.pt"))
    assert main(["info"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        f"kws: error: no model file at {tmp_path / 'nowhere.pt'} (the model named by $KWS_MODEL)\n")


def test_corrupt_model_is_one_error_line(model_file, tmp_path):
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(model_file[0].read_bytes()[:2000])
    assert_one_error_line(run_kws("info", "--model", str(damaged)), "damaged or not a kws checkpoint")


def test_a_model_file_where_a_checkpoint_is_needed_names_the_checkpoint(model_file, tmp_path):
    engine_file = tmp_path / "small.npz"
    assert main(["export", str(model_file[0]), str(engine_file)]) == 0
    assert_one_error_line(run_kws("export", str(engine_file), str(tmp_path / "again.npz")),
                          str(engine_file), "PyTorch checkpoint (.pt)")


def test_foreign_file_is_one_error_line(tmp_path, capsys):
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.ones(2)}, foreign)
    assert main(["info", "--model", str(foreign), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip() == f"kws: error: {foreign} is not a kws checkpoint"


def test_a_file_the_system_refuses_is_one_line_naming_it_not_a_traceback(monkeypatch, capsys):
    def refused(args):
        raise PermissionError(13, "Permission denied", "/srv/kws/out.json")
    monkeypatch.setattr(kws.cli, "info", refused)
    assert main(["info"]) == 2
    assert capsys.readouterr().err == "kws: error: /srv/kws/out.json: Permission denied\n"
