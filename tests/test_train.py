"""Training: the lr schedule, the optimizer's groups, a tiny run's outputs, --resume, the CLI's
errors, and DistributedDataParallel under torchrun on the CPU (gloo)."""

import collections
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL, tiny_model
from kws.cli import main
from kws.data import BACKGROUND, LABELS
from kws.errors import KwsError
from kws.model import load_model, read_checkpoint
import kws.train
from kws.train import TrainConfig, epoch_batches, load_training_data, lr_factor, make_optimizer, train

# Three epochs of two steps: enough for a schedule, a best model and a resume point.
TINY_TRAIN = TrainConfig(epochs=3, examples_per_epoch=16, batch_size=8, warmup_steps=2, seed=1)
TINY_SET = [f"--set={k}={v}" for k, v in TINY_MODEL.items()]


def quiet(*args, **kwargs):
    pass


def run_state(run_dir):
    return torch.load(run_dir / "last.pt", weights_only=True)


# ----------------------------------------------------------------------------- schedule, optimizer

def test_lr_rises_linearly_in_warmup_then_decays_by_cosine_to_zero():
    total, warmup = 1000, 100
    lr = [lr_factor(step, total, warmup) for step in range(total + 1)]
    assert lr[0] == pytest.approx(1 / warmup)
    assert np.allclose(np.diff(lr[:warmup]), 1 / warmup)  # linear warmup
    assert lr[warmup - 1] == lr[warmup] == 1.0  # the peak
    assert all(a > b for a, b in zip(lr[warmup:total], lr[warmup + 1:total + 1]))
    mid = warmup + (total - warmup) // 2
    assert lr[mid] == pytest.approx(0.5)  # cosine: half way down at half way
    assert lr[total - 1] < 1e-4 and lr[total] == pytest.approx(0.0, abs=1e-12)


def test_optimizer_decays_weight_matrices_only_and_scales_the_tap_position_lr():
    model = tiny_model()
    cfg = TrainConfig(lr=0.1, weight_decay=0.5, position_lr_scale=7.0)
    optimizer = make_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [{names[id(p)] for p in g["params"]} for g in optimizer.param_groups]
    decayed = {n for g, names_ in zip(optimizer.param_groups, groups) if g["weight_decay"] > 0 for n in names_}
    positions = {n for n in names.values() if n.endswith("positions")}
    assert positions and sum(len(g) for g in groups) == len(names)  # each parameter once
    assert decayed == {n for n, p in model.named_parameters() if p.ndim >= 2} - positions
    (scaled,) = [g for g in optimizer.param_groups if g["lr_scale"] != 1.0]
    assert scaled["lr_scale"] == 7.0 and scaled["weight_decay"] == 0.0
    assert {names[id(p)] for p in scaled["params"]} == positions

    # With zero gradients an AdamW step is pure weight decay: only matrices shrink.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for n, p in model.named_parameters():
        expected = before[n] * (1 - 0.1 * 0.5) if n in decayed else before[n]
        torch.testing.assert_close(p.detach(), expected)


# ----------------------------------------------------------------------------- background share

def background_share(d, weight, n=600):
    labels = epoch_batches(d, TrainConfig(background_weight=weight, seed=2), epoch=0).batch(n)[1]
    return collections.Counter(labels.tolist())[LABELS.index(BACKGROUND)] / n


def test_background_weight_sets_the_background_share_of_batches(speech_commands):
    d = load_training_data(speech_commands.root, None, quiet)
    words = len({label for label in d["real_labels"]})  # each word is weight 1
    assert TrainConfig().background_weight == 2.0  # the shipped model's training
    shares = {w: background_share(d, w) for w in (2.0, 10.0)}
    for w, share in shares.items():  # tolerance: about 3.5 standard deviations at n = 600
        assert share == pytest.approx(w / (words + w), abs=0.07), shares
    assert shares[10.0] > shares[2.0] + 0.2


def batches_option(monkeypatch, name: str) -> list:
    """The value of TrainingBatches' keyword `name` at every construction kws.train makes."""
    seen = []

    class Recording(kws.train.TrainingBatches):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get(name))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(kws.train, "TrainingBatches", Recording)
    return seen


def test_kws_train_passes_background_weight_to_the_batches(speech_commands, tmp_path, monkeypatch):
    seen = batches_option(monkeypatch, "background_weight")
    code = main(["train", "--data", str(speech_commands.root), "--out", str(tmp_path / "m.pt"),
                 "--epochs", "2", "--examples-per-epoch", "8", "--batch-size", "8",
                 "--warmup-steps", "1", "--background-weight", "9", *TINY_SET])
    assert code == 0 and seen == [9.0, 9.0]  # one TrainingBatches per epoch


def test_speech_negatives_are_off_unless_asked_for_and_kws_train_passes_them(speech_commands, tmp_path,
                                                                              monkeypatch):
    assert TrainConfig().speech_negatives == 0.0  # the shipped model's first training had none
    seen = batches_option(monkeypatch, "speech_negatives")
    common = ["train", "--data", str(speech_commands.root), "--epochs", "1", "--examples-per-epoch", "8",
              "--batch-size", "8", "--warmup-steps", "1", *TINY_SET]
    assert main([*common, "--out", str(tmp_path / "a.pt")]) == 0
    assert main([*common, "--out", str(tmp_path / "b.pt"), "--speech-negatives", "0.6"]) == 0
    assert seen == [0.0, 0.6]
    assert read_checkpoint(tmp_path / "b.pt")[2]["train"]["speech_negatives"] == 0.6


# ----------------------------------------------------------------------------- a tiny run

@pytest.fixture(scope="module")
def unbroken_run(speech_commands, tmp_path_factory):
    out = tmp_path_factory.mktemp("unbroken") / "model.pt"
    result = train(TINY_TRAIN, speech_commands.root, out, overrides=TINY_MODEL, log=quiet)
    return out, out.with_suffix(".run"), result


def test_a_tiny_run_writes_a_loadable_best_model(unbroken_run):
    out, _, result = unbroken_run
    model = load_model(out)
    assert model.cfg.labels == LABELS and model.cfg.width == TINY_MODEL["width"]
    assert model.classify(torch.zeros(1, 16000)).shape == (1, len(LABELS))
    _, _, meta = read_checkpoint(out)
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert result["best_validation_accuracy"] == max(h["validation_accuracy"] for h in history)
    # The saved model is the first epoch that reached the best validation accuracy.
    best_epoch = next(h["epoch"] for h in history if h["validation_accuracy"] == result["best_validation_accuracy"])
    assert len(meta["history"]) == best_epoch and meta["train"]["epochs"] == 3


def test_the_run_state_holds_the_last_epoch_after_the_full_schedule(unbroken_run):
    _, run_dir, result = unbroken_run
    state = run_state(run_dir)
    assert state["epoch"] == TINY_TRAIN.epochs - 1
    assert json.loads(state["history"]) == result["history"]
    total = TINY_TRAIN.epochs * TINY_TRAIN.examples_per_epoch // TINY_TRAIN.batch_size
    final = lr_factor(total - 1, total, TINY_TRAIN.warmup_steps)
    for group in state["optimizer"]["param_groups"]:  # the loop applied the schedule and scales
        assert group["lr"] == pytest.approx(TINY_TRAIN.lr * group["lr_scale"] * final)
    sigmas = [v for k, v in state["model"].items() if k.endswith("delay.sigma")]
    assert sigmas and all(float(s) == pytest.approx(tiny_model().cfg.sigma_end) for s in sigmas)


class Interrupted(Exception):
    pass


def interrupt_at(message_start: str):
    """A log function that stops training when it sees a message, like a crash would."""

    def log(message, *args, **kwargs):
        if str(message).startswith(message_start):
            raise Interrupted
    return log


def test_resume_continues_from_the_saved_epoch_and_ends_like_an_unbroken_run(speech_commands, tmp_path, unbroken_run):
    out = tmp_path / "model.pt"
    # Crash at the end of epoch 2, before its checkpoint: the run state says epoch 1 is done.
    with pytest.raises(Interrupted):
        train(TINY_TRAIN, speech_commands.root, out, overrides=TINY_MODEL, log=interrupt_at("epoch 2:"))
    assert run_state(out.with_suffix(".run"))["epoch"] == 0

    messages = []
    result = train(TINY_TRAIN, speech_commands.root, out, overrides=TINY_MODEL, resume=True, log=messages.append)
    assert any(m.startswith("resuming after epoch 1") for m in messages)
    assert [m.split(":")[0] for m in messages if m.startswith("epoch ")] == ["epoch 2", "epoch 3"]

    # Dropout is on (0.1): equality needs the batches and torch's generator carried over.
    unbroken, resumed = run_state(unbroken_run[1])["model"], run_state(out.with_suffix(".run"))["model"]
    assert unbroken.keys() == resumed.keys()
    for name in unbroken:
        assert torch.equal(unbroken[name], resumed[name]), name
    strip = lambda history: [{k: v for k, v in h.items() if k != "seconds"} for h in history]
    assert strip(result["history"]) == strip(unbroken_run[2]["history"])


def test_resume_reads_run_states_whose_best_accuracy_is_a_numpy_float(speech_commands, tmp_path):
    """Runs saved before accuracy() returned a plain float stored numpy scalars."""
    cfg = TrainConfig(epochs=2, examples_per_epoch=8, batch_size=8, warmup_steps=1)
    out = tmp_path / "model.pt"
    with pytest.raises(Interrupted):
        train(cfg, speech_commands.root, out, overrides=TINY_MODEL, log=interrupt_at("epoch 2:"))
    last = out.with_suffix(".run") / "last.pt"
    state = torch.load(last, weights_only=True)
    state["best"] = np.float64(state["best"])
    torch.save(state, last)
    result = train(cfg, speech_commands.root, out, overrides=TINY_MODEL, resume=True, log=quiet)
    assert [h["epoch"] for h in result["history"]] == [1, 2]


def test_resume_without_a_run_state_is_a_clear_error(speech_commands, tmp_path):
    with pytest.raises(KwsError, match="nothing to resume: no .*last.pt"):
        train(TINY_TRAIN, speech_commands.root, tmp_path / "m.pt", overrides=TINY_MODEL, resume=True, log=quiet)


def test_resume_from_a_damaged_run_state_is_a_clear_error(speech_commands, tmp_path):
    (tmp_path / "m.run").mkdir()
    (tmp_path / "m.run" / "last.pt").write_bytes(b"garbage")
    with pytest.raises(KwsError, match="cannot resume from .*last.pt"):
        train(TINY_TRAIN, speech_commands.root, tmp_path / "m.pt", overrides=TINY_MODEL, resume=True, log=quiet)


def test_resume_with_other_model_settings_is_a_clear_error(speech_commands, tmp_path, unbroken_run):
    shutil.copytree(unbroken_run[1], tmp_path / "m.run")
    other = dict(TINY_MODEL, width=12)
    with pytest.raises(KwsError, match="does not match these settings"):
        train(TINY_TRAIN, speech_commands.root, tmp_path / "m.pt", overrides=other, resume=True, log=quiet)


# ----------------------------------------------------------------------------- the CLI

@pytest.mark.parametrize("bad", [
    ["--set", "n_layers=abc"],
    ["--set", "nonsense=1"],
    ["--set", "width"],
    ["--set", "use_delay=perhaps"],
    ["--set", "frontend=fft"],
    ["--set", "frontend_kernel=100"],  # shorter than two strides of the gabor front end
    ["--preset", "huge"],
    ["--epochs", "0"],
    ["--examples-per-epoch", "4", "--batch-size", "8"],
    ["--speech-negatives", "1.5"],
    ["--speech-negatives", "-0.1"],
])
def test_kws_train_with_bad_settings_exits_2_with_one_line(speech_commands, tmp_path, capsys, bad):
    out = tmp_path / "m.pt"
    # Tiny settings first, so that a setting wrongly accepted costs a second, not a full run.
    tiny = ["--epochs", "1", "--examples-per-epoch", "8", "--batch-size", "8", *TINY_SET]
    code = main(["train", "--data", str(speech_commands.root), "--out", str(out), *tiny, *bad])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("kws: error: ") and captured.err.count("\n") == 1, captured.err
    assert not out.exists()


def test_kws_train_on_a_missing_folder_exits_2_naming_it(tmp_path, capsys):
    code = main(["train", "--data", str(tmp_path / "absent"), "--out", str(tmp_path / "m.pt"), *TINY_SET])
    err = capsys.readouterr().err
    assert code == 2 and "absent" in err and err.count("\n") == 1


def test_kws_train_cli_trains_and_prints_one_json_line(speech_commands, tmp_path, capsys):
    out = tmp_path / "m.pt"
    code = main(["train", "--data", str(speech_commands.root), "--out", str(out), "--epochs", "1",
                 "--examples-per-epoch", "8", "--batch-size", "8", "--warmup-steps", "1", *TINY_SET])
    stdout = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    answer = json.loads(stdout[-1])
    assert answer["out"] == str(out) and 0.0 <= answer["best_validation_accuracy"] <= 1.0
    assert load_model(out).cfg.n_layers == TINY_MODEL["n_layers"]


# ----------------------------------------------------------------------------- torchrun

def test_torchrun_with_two_cpu_processes_trains_and_rank_0_writes_the_model(speech_commands, tmp_path):
    out = tmp_path / "ddp.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "kws.cli", "train", "--data", str(speech_commands.root), "--out", str(out),
               "--threads", "1", "--epochs", "2", "--examples-per-epoch", "16", "--batch-size", "4",
               "--warmup-steps", "1", *TINY_SET]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    answers = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(answers) == 1 and answers[0]["out"] == str(out)  # rank 0 alone answers
    _, _, meta = read_checkpoint(out)
    assert meta["world_size"] == 2
    state = run_state(out.with_suffix(".run"))
    assert state["epoch"] == 1
    # Two processes share each step: 16 examples / (4 x 2) = 2 steps per epoch, 4 in all.
    (group, *_) = state["optimizer"]["param_groups"]
    assert group["lr"] == pytest.approx(TrainConfig().lr * group["lr_scale"] * lr_factor(3, 4, 1))
    assert load_model(out).classify(torch.zeros(1, 16000)).isfinite().all()
