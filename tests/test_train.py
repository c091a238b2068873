"""Training: the loss, the lr schedule, the optimizer's groups, a tiny run that learns, a tiny
run's outputs, the rounded-delay phase, --resume (from an epoch, a mid-epoch save, Ctrl-C and
SIGTERM), the CLI's option checks, and DistributedDataParallel under torchrun on the CPU (gloo)."""

import collections
import dataclasses
import gc
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL, tiny_model, write_speech_commands
from kws.cli import main
from kws.labels import BACKGROUND, LABELS
from kws.errors import KwsError
from kws.model import MGRADE, load_model, preset, read_checkpoint, save_model
from kws.speech import NEAR_MISS_VOCABULARY, TRAINING_SENTENCES, TRAINING_VOCABULARY
import kws.train
from kws import PROJECT_LICENSE
from kws.audio import CLIP_SAMPLES, fit_length, load_audio
from kws.teacher import TEACHER_LICENSE
from kws.train import (TrainConfig, anchor_loss, epoch_batches, load_training_data, lr_factor, make_optimizer,
                       soft_target_loss, target_loss, train, window_negative_loss, worker_batches)

# Three epochs of two steps: enough for a schedule, a best model and a resume point.
TINY_TRAIN = TrainConfig(epochs=3, examples_per_epoch=16, batch_size=8, warmup_steps=2, seed=1)
TINY_SET = [f"--set={k}={v}" for k, v in TINY_MODEL.items()]


def quiet(*args, **kwargs):
    pass


def run_state(run_dir):
    return torch.load(run_dir / "last.pt", weights_only=True)


# ----------------------------------------------------------------------------- the loss

def test_the_loss_is_label_smoothed_cross_entropy_of_the_clips_mean_logits():
    torch.manual_seed(0)
    logits, labels, context, eps = torch.randn(3, 10, 5), torch.tensor([0, 2, 4]), 4, 0.1
    loss, acc, clip = target_loss(logits, labels, context, eps)
    mean = logits[:, context:].mean(dim=1)
    log_p = mean.log_softmax(-1)
    expected = (-(1 - eps) * log_p[torch.arange(3), labels] - eps / 5 * log_p.sum(-1)).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert float(acc) == pytest.approx(float((mean.argmax(-1) == labels).float().mean()))
    torch.testing.assert_close(clip, mean)
    assert float(target_loss(logits, labels, context, 0.0)[0]) != pytest.approx(float(loss))


def test_the_loss_reads_only_the_steps_after_the_context():
    torch.manual_seed(1)
    logits, labels, context = torch.randn(2, 12, 4), torch.tensor([1, 3]), 5
    loss = target_loss(logits, labels, context, 0.05)[0]
    context_changed = logits.clone()
    context_changed[:, :context] = 50 * torch.randn(2, context, 4)
    assert torch.equal(target_loss(context_changed, labels, context, 0.05)[0], loss)
    clip_changed = logits.clone()
    clip_changed[:, -1] += 5 * torch.randn(2, 4)
    assert not torch.equal(target_loss(clip_changed, labels, context, 0.05)[0], loss)


def test_the_window_negative_loss_is_the_cross_entropy_of_each_word_free_examples_worst_window():
    torch.manual_seed(2)
    steps, window, background = 30, 10, 3
    logits = torch.randn(3, steps, 4)
    logits[:, :, background] += 2.0
    logits[0, 5:12, 1] += 6.0  # a keyword-like burst that only early windows hold whole
    word_free = torch.tensor([True, False, True])
    expected = []
    for i in (0, 2):
        windows = torch.stack([logits[i, t:t + window].mean(0) for t in range(steps - window + 1)])
        expected.append(-windows.log_softmax(-1)[:, background].min())
    loss = window_negative_loss(logits, word_free, window, background)
    assert float(loss) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-5)
    # The burst drives it, though the last (aligned) window of example 0 barely holds any of it.
    last_window_only = target_loss(logits[[0, 2]], torch.tensor([background] * 2), steps - window)[0]
    assert float(loss) > float(last_window_only) + 0.5
    # Examples that are not word-free are never read.
    changed = logits.clone()
    changed[1] = 50 * torch.randn(steps, 4)
    assert torch.equal(window_negative_loss(changed, word_free, window, background), loss)
    assert float(window_negative_loss(logits, torch.zeros(3, dtype=torch.bool), window, background)) == 0.0


def test_training_adds_the_window_negative_loss_only_when_asked(speech_commands, tmp_path, monkeypatch):
    seen = []

    def recording_loss(logits, word_free, window_steps, background):
        seen.append((logits.shape[1], window_steps, background, int(word_free.sum())))
        return window_negative_loss(logits, word_free, window_steps, background)

    monkeypatch.setattr(kws.train, "window_negative_loss", recording_loss)
    tiny = ["--data", str(speech_commands.root), "--epochs", "1", "--examples-per-epoch", "16",
            "--batch-size", "16", "--warmup-steps", "1", "--background-weight", "20", *TINY_SET]
    assert main(["train", *tiny, "--out", str(tmp_path / "a.pt")]) == 0
    assert seen == []
    assert main(["train", *tiny, "--out", str(tmp_path / "b.pt"), "--window-negatives", "1"]) == 0
    assert len(seen) == 1 and seen[0][:3] == (150, 100, LABELS.index(BACKGROUND)) and seen[0][3] > 0


def test_a_tiny_run_on_generated_words_lowers_its_loss_and_beats_chance(tmp_path):
    # Four "words" (tones of different pitch, see conftest) with 12 training clips each.
    fx = write_speech_commands(tmp_path / "sc", counts={w: (12, 4, 0) for w in ("yes", "no", "up", "bed")},
                               seed=3)
    cfg = TrainConfig(epochs=6, examples_per_epoch=128, batch_size=16, warmup_steps=4, lr=1e-2, seed=0)
    history = train(cfg, fx.root, tmp_path / "m.pt", overrides=dict(TINY_MODEL, width=16), log=quiet)["history"]
    losses = [h["train_loss"] for h in history]
    assert losses[0] > 2.5  # near log(36) at the start: the classes are not yet told apart
    assert losses[-1] < 0.4 * losses[0], losses
    # 16 validation clips of 4 words: chance is 0.25.
    assert max(h["validation_accuracy"] for h in history) >= 0.75, history


def test_training_reads_the_loss_after_the_models_context_with_the_label_smoothing(
        speech_commands, tmp_path, monkeypatch):
    seen = []

    def recording_loss(logits, labels, context_steps, label_smoothing):
        seen.append((logits.shape[1], context_steps, label_smoothing))
        return target_loss(logits, labels, context_steps, label_smoothing)

    monkeypatch.setattr(kws.train, "target_loss", recording_loss)
    contexts = batches_option(monkeypatch, "context_s")
    code = main(["train", "--data", str(speech_commands.root), "--out", str(tmp_path / "m.pt"),
                 "--epochs", "1", "--examples-per-epoch", "8", "--batch-size", "8", "--warmup-steps", "1",
                 "--context-s", "0.25", "--label-smoothing", "0.2", *TINY_SET])
    assert code == 0 and contexts == [0.25]
    assert seen == [(125, 25, 0.2)]  # 0.25 s of context + 1 s = 125 steps of 10 ms
    # Inference primes with the same setting: it is kept in the model.
    assert load_model(tmp_path / "m.pt").cfg.clip_context_s == 0.25


# ----------------------------------------------------------------------------- the anchor

def test_the_anchor_loss_reads_the_word_examples_against_the_frozen_models_clip_readout():
    torch.manual_seed(0)
    anchor, background = tiny_model(seed=1), LABELS.index(BACKGROUND)
    audio = 0.1 * torch.randn(4, anchor.cfg.context_samples + CLIP_SAMPLES)
    labels = torch.tensor([LABELS.index("yes"), background, LABELS.index("no"), background])
    with torch.no_grad():
        anchors_clip = anchor(audio)[:, anchor.cfg.context_samples // anchor.cfg.stride:].mean(1)
    assert float(anchor_loss(anchors_clip, audio, labels, [anchor], background, 2.0)) == pytest.approx(0, abs=1e-6)
    clip = torch.randn(4, len(LABELS))
    loss = anchor_loss(clip, audio, labels, [anchor], background, 2.0)
    words = labels != background
    assert float(loss) > 0.01
    assert float(loss) == pytest.approx(float(soft_target_loss(clip[words], anchors_clip[words], 2.0)), rel=1e-5)
    # Background examples are the fine-tune's to change: neither their audio nor their outputs count.
    changed_audio, changed_clip = audio.clone(), clip.clone()
    changed_audio[~words], changed_clip[~words] = torch.randn_like(audio[~words]), 50 * torch.randn(2, len(LABELS))
    assert float(anchor_loss(changed_clip, changed_audio, labels, [anchor], background, 2.0)) == pytest.approx(
        float(loss), rel=1e-5)
    all_background = torch.full((4,), background)
    assert float(anchor_loss(clip, audio, all_background, [anchor], background, 2.0)) == 0.0


def test_several_anchors_are_one_target_their_average_logits():
    torch.manual_seed(0)
    anchors, background = [tiny_model(seed=1), tiny_model(seed=2)], LABELS.index(BACKGROUND)
    audio = 0.1 * torch.randn(3, anchors[0].cfg.context_samples + CLIP_SAMPLES)
    labels = torch.tensor([LABELS.index("yes"), LABELS.index("no"), LABELS.index("up")])
    with torch.no_grad():
        clips = [a(audio)[:, a.cfg.context_samples // a.cfg.stride:].mean(1) for a in anchors]
    average = (clips[0] + clips[1]) / 2
    assert float(anchor_loss(average, audio, labels, anchors, background, 2.0)) == pytest.approx(0, abs=1e-6)
    for one in clips:  # each alone is a different target: the loss reads both
        assert float(anchor_loss(one, audio, labels, anchors, background, 2.0)) > 1e-4


def test_an_anchored_fine_tune_keeps_its_word_outputs_near_the_anchors(speech_commands, tmp_path):
    """Same start, seed and budget: with a heavy anchor weight, the fine-tune's outputs on word
    clips stay much closer to the anchor's than a plain fine-tune's do."""
    save_model(tiny_model(seed=0), tmp_path / "start.pt")
    save_model(tiny_model(seed=1), tmp_path / "anchor.pt")
    cfg = TrainConfig(epochs=3, examples_per_epoch=128, batch_size=16, warmup_steps=1, seed=2, lr=1e-2,
                      rounded_fraction=0.0)
    words = torch.from_numpy(np.stack([fit_length(load_audio(speech_commands.root / p), CLIP_SAMPLES)
                                       for p in speech_commands.splits["training"]]))
    anchor = load_model(tmp_path / "anchor.pt")
    with torch.no_grad():
        target = anchor.classify(words)
    distance = {}
    for name, weight in (("plain", 0.0), ("anchored", 20.0)):
        out = tmp_path / f"{name}.pt"
        train(dataclasses.replace(cfg, anchor_weight=weight), speech_commands.root, out, init=tmp_path / "start.pt",
              anchors=[tmp_path / "anchor.pt"] if weight else [], log=quiet)
        with torch.no_grad():
            distance[name] = float(soft_target_loss(load_model(out).classify(words), target, 1.0))
    assert distance["anchored"] < 0.5 * distance["plain"], distance


def test_an_anchored_fine_tune_carries_the_anchors_licence(speech_commands, tmp_path):
    save_model(tiny_model(seed=1), tmp_path / "anchor.pt", {"license": TEACHER_LICENSE})
    plain = TrainConfig(epochs=1, examples_per_epoch=16, batch_size=8, warmup_steps=1, seed=1)
    train(dataclasses.replace(plain, anchor_weight=1.0), speech_commands.root, tmp_path / "m.pt",
          overrides=TINY_MODEL, anchors=[tmp_path / "anchor.pt"], log=quiet)
    assert TEACHER_LICENSE != PROJECT_LICENSE
    assert read_checkpoint(tmp_path / "m.pt")[2]["license"] == TEACHER_LICENSE


@pytest.mark.parametrize("bad, words", [
    (["--anchor-weight", "1"], ["--anchor MODEL"]),
    (["--anchor", "ANCHOR"], ["--anchor-weight"]),
    (["--anchor", "ABSENT", "--anchor-weight", "1"], ["no model file"]),
    (["--anchor", "ANCHOR", "ABSENT", "--anchor-weight", "1"], ["no model file", "ABSENT"]),
    (["--anchor", "OTHER-LABELS", "--anchor-weight", "1"], ["other labels"]),
    (["--anchor", "OTHER-CONTEXT", "--anchor-weight", "1"], ["another context"]),
])
def test_kws_train_with_an_anchor_it_cannot_use_exits_2_before_loading_data(tmp_path, capsys, bad, words):
    save_model(tiny_model(), tmp_path / "ANCHOR")
    save_model(MGRADE(preset("edge", LABELS[:5], **TINY_MODEL)), tmp_path / "OTHER-LABELS")
    save_model(tiny_model(clip_context_s=0.2), tmp_path / "OTHER-CONTEXT")
    bad = [str(tmp_path / b) if b.isupper() else b for b in bad]
    out = tmp_path / "m.pt"
    code = main(["train", "--data", str(tmp_path / "no-data"), "--out", str(out), *TINY_SET, *bad])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kws: error: ") and err.count("\n") == 1, err
    assert all(word in err for word in words) and "no-data" not in err, err
    assert not out.exists()


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


def test_sentence_negatives_are_off_unless_asked_for_and_kws_train_passes_the_sentences(
        speech_commands, tmp_path, monkeypatch):
    assert TrainConfig().sentence_negatives == 0.0
    rendered, counts = [np.full(8000, 0.1, np.float32)], []
    monkeypatch.setattr(kws.train, "training_sentences",  # no TTS in this test
                        lambda cache, count: counts.append(count) or rendered)
    shares, sentences = batches_option(monkeypatch, "sentence_negatives"), []
    monkeypatch.setattr(kws.train.TrainingBatches, "_sentence_window",
                        lambda self, n, end=False: sentences.append(self.sentences) or np.zeros(n, np.float32))
    common = ["train", "--data", str(speech_commands.root), "--epochs", "1", "--examples-per-epoch", "32",
              "--batch-size", "32", "--warmup-steps", "1", *TINY_SET]
    assert main([*common, "--out", str(tmp_path / "a.pt")]) == 0
    assert not sentences
    assert main([*common, "--out", str(tmp_path / "b.pt"), "--sentence-negatives", "0.9"]) == 0
    assert shares == [0.0, 0.9] and sentences and all(s == rendered for s in sentences)
    assert counts == [TRAINING_SENTENCES] and TrainConfig().sentences == TRAINING_SENTENCES == 1000
    assert read_checkpoint(tmp_path / "b.pt")[2]["train"]["sentence_negatives"] == 0.9
    assert main([*common, "--out", str(tmp_path / "c.pt"), "--sentence-negatives", "0.9",
                 "--sentences", "4000"]) == 0
    assert counts[1:] == [4000] and read_checkpoint(tmp_path / "c.pt")[2]["train"]["sentences"] == 4000


def test_near_misses_are_off_unless_asked_for_and_kws_train_passes_the_near_miss_sentences(
        speech_commands, tmp_path, monkeypatch):
    assert TrainConfig().near_misses == 0.0
    rendered = {TRAINING_VOCABULARY: [np.full(8000, 0.1, np.float32)],
                NEAR_MISS_VOCABULARY: [np.full(8000, 0.2, np.float32)]}
    asked = []
    monkeypatch.setattr(kws.train, "training_sentences",  # no TTS in this test
                        lambda cache, count=1000, vocabulary=TRAINING_VOCABULARY:
                        asked.append(vocabulary) or rendered[vocabulary])
    shares, pools = batches_option(monkeypatch, "near_misses"), batches_option(monkeypatch, "near_miss_sentences")
    common = ["train", "--data", str(speech_commands.root), "--epochs", "1", "--examples-per-epoch", "8",
              "--batch-size", "8", "--warmup-steps", "1", "--sentence-negatives", "0.5", *TINY_SET]
    assert main([*common, "--out", str(tmp_path / "a.pt")]) == 0
    assert asked == [TRAINING_VOCABULARY] and shares == [0.0] and pools == [[]]
    assert main([*common, "--out", str(tmp_path / "b.pt"), "--near-misses", "0.4"]) == 0
    assert asked[1:] == [TRAINING_VOCABULARY, NEAR_MISS_VOCABULARY]
    assert shares[1] == 0.4 and pools[1] == rendered[NEAR_MISS_VOCABULARY]
    assert read_checkpoint(tmp_path / "b.pt")[2]["train"]["near_misses"] == 0.4


def test_augmentations_are_off_by_default_and_kws_train_passes_them(speech_commands, tmp_path, monkeypatch):
    names = ("vtlp", "reverb", "masks", "noise_onsets", "noise_switches", "mic_response")
    assert all(getattr(TrainConfig(), name) == 0.0 for name in names)
    seen = {name: batches_option(monkeypatch, name) for name in names}
    code = main(["train", "--data", str(speech_commands.root), "--out", str(tmp_path / "m.pt"), "--epochs", "1",
                 "--examples-per-epoch", "8", "--batch-size", "8", "--warmup-steps", "1",
                 "--vtlp", "0.3", "--reverb", "0.4", "--masks", "0.5", "--noise-onsets", "0.6",
                 "--noise-switches", "0.7", "--mic-response", "0.8", *TINY_SET])
    assert code == 0 and seen == {"vtlp": [0.3], "reverb": [0.4], "masks": [0.5], "noise_onsets": [0.6],
                                  "noise_switches": [0.7], "mic_response": [0.8]}


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
    # The saved model is the first epoch of the rounded-delay phase that reached its best
    # validation accuracy (TINY_TRAIN: only the last epoch is in the phase).
    kept = [h for h in history if h["rounded_delays"]]
    assert result["best_validation_accuracy"] == max(h["validation_accuracy"] for h in kept)
    best_epoch = next(h["epoch"] for h in kept if h["validation_accuracy"] == result["best_validation_accuracy"])
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


def test_batch_workers_make_an_epochs_steps_the_same_each_time_each_from_its_own_stream(speech_commands):
    d = load_training_data(speech_commands.root, None, quiet)
    draw = lambda: [tuple(t.clone() for t in b) for b in worker_batches(d, TINY_TRAIN, 1, 0, 0.5, 5, 2)]
    first, again = draw(), draw()
    assert len(first) == 5
    for a, b in zip(first, again):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    # Steps 0 and 1 come from workers 0 and 1, each drawing its own stream, not the in-process one.
    assert not torch.equal(first[0][0], first[1][0])
    in_process = epoch_batches(d, TINY_TRAIN, 1, 0, 0.5).batch(TINY_TRAIN.batch_size)[0]
    assert not any(torch.equal(in_process, b[0]) for b in first)


def test_a_run_with_batch_workers_saves_epochs_and_resumes_like_an_unbroken_one(speech_commands, tmp_path):
    # A save after every step is asked for: with workers, only epochs' ends are saved.
    often = dataclasses.replace(TINY_TRAIN, checkpoint_minutes=1e-9)
    unbroken = tmp_path / "unbroken.pt"
    unbroken_result = train(often, speech_commands.root, unbroken, overrides=TINY_MODEL, workers=2, log=quiet)
    assert read_checkpoint(unbroken)[2]["batch_workers"] == 2
    out = tmp_path / "model.pt"
    with pytest.raises(Interrupted):
        train(often, speech_commands.root, out, overrides=TINY_MODEL, workers=2, log=interrupt_at("epoch 2:"))
    state = run_state(out.with_suffix(".run"))
    assert state["epoch"] == 0 and "step" not in state
    result = train(often, speech_commands.root, out, overrides=TINY_MODEL, workers=2, resume=True, log=quiet)
    assert_same_run(out.with_suffix(".run"), result, (unbroken, unbroken.with_suffix(".run"), unbroken_result))


def test_a_mid_epoch_save_resumes_like_an_unbroken_run(speech_commands, tmp_path, unbroken_run):
    out = tmp_path / "model.pt"
    # A save after every step: the crash at the end of epoch 2 leaves epoch 2's first step saved.
    often = dataclasses.replace(TINY_TRAIN, checkpoint_minutes=1e-9)
    with pytest.raises(Interrupted):
        train(often, speech_commands.root, out, overrides=TINY_MODEL, log=interrupt_at("epoch 2:"))
    state = run_state(out.with_suffix(".run"))
    assert (state["epoch"], state["step"]) == (0, 1)

    messages = []
    result = train(often, speech_commands.root, out, overrides=TINY_MODEL, resume=True, log=messages.append)
    assert any(m.startswith("resuming after epoch 1, step 1") for m in messages)
    assert_same_run(out.with_suffix(".run"), result, unbroken_run)


def assert_same_run(run_dir, result, unbroken_run):
    unbroken, resumed = run_state(unbroken_run[1])["model"], run_state(run_dir)["model"]
    for name in unbroken:
        assert torch.equal(unbroken[name], resumed[name]), name
    strip = lambda history: [{k: v for k, v in h.items() if k not in ("seconds", "train_loss", "train_accuracy")}
                             for h in history]
    assert strip(result["history"]) == strip(unbroken_run[2]["history"])


def test_ctrl_c_mid_epoch_saves_a_state_that_resumes_like_an_unbroken_run(speech_commands, tmp_path,
                                                                         unbroken_run, monkeypatch):
    out = tmp_path / "model.pt"
    draws = []
    real_batch = kws.train.TrainingBatches.batch

    def batch_then_ctrl_c(self, size):
        draws.append(size)
        if len(draws) == 4:  # epoch 2, its second step
            raise KeyboardInterrupt
        return real_batch(self, size)

    monkeypatch.setattr(kws.train.TrainingBatches, "batch", batch_then_ctrl_c)
    messages = []
    with pytest.raises(KeyboardInterrupt):
        train(TINY_TRAIN, speech_commands.root, out, overrides=TINY_MODEL, log=messages.append)
    assert any("continues with --resume" in m for m in messages)
    state = run_state(out.with_suffix(".run"))
    assert (state["epoch"], state["step"]) == (0, 1)
    monkeypatch.setattr(kws.train.TrainingBatches, "batch", real_batch)
    result = train(TINY_TRAIN, speech_commands.root, out, overrides=TINY_MODEL, resume=True, log=quiet)
    assert_same_run(out.with_suffix(".run"), result, unbroken_run)


def test_sigterm_stops_kws_train_with_a_resumable_state(speech_commands, tmp_path):
    out = tmp_path / "m.pt"
    command = [sys.executable, "-m", "kws.cli", "train", "--data", str(speech_commands.root), "--out", str(out),
               "--threads", "1", "--epochs", "1000", "--examples-per-epoch", "8", "--batch-size", "8",
               "--warmup-steps", "1", *TINY_SET]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        last = out.with_suffix(".run") / "last.pt"
        deadline = time.time() + 120
        while not last.exists() and time.time() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert last.exists(), process.stderr.read() if process.poll() is not None else "no run state"
        process.send_signal(signal.SIGTERM)
        output, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130 and "continues with --resume" in output, err[-2000:]
    assert "Traceback" not in err
    assert run_state(out.with_suffix(".run"))["epoch"] >= 0


def test_the_final_phase_trains_on_rounded_delays_that_gaussian_taps_then_match(speech_commands, tmp_path):
    cfg = dataclasses.replace(TINY_TRAIN, rounded_fraction=0.5)
    out = tmp_path / "m.pt"
    result = train(cfg, speech_commands.root, out, overrides=TINY_MODEL, log=quiet)
    assert [h["rounded_delays"] for h in result["history"]] == [False, True, True]  # 3 of 6 steps
    state = run_state(out.with_suffix(".run"))
    positions = [v for k, v in state["model"].items() if k.endswith("positions")]
    assert positions and all(torch.equal(p, p.round()) for p in positions)
    model = tiny_model()
    model.load_state_dict(state["model"])
    audio = torch.randn(4, 16000, generator=torch.Generator().manual_seed(0)) * 0.1
    with torch.no_grad():
        rounded = model.classify(audio)
        model.set_gaussian_at_inference(True)
        gaussian = model.classify(audio)
    # At integer positions a Gaussian of sigma 0.25 puts exp(-8) = 3e-4 of a tap on each neighbour.
    assert (gaussian - rounded).abs().max() < 1e-2


def test_the_saved_model_comes_from_the_rounded_phase_even_when_an_earlier_epoch_scored_higher(
        speech_commands, tmp_path, monkeypatch):
    scores = iter([0.9, 0.5, 0.6])  # the first epoch, before the phase, scores best
    monkeypatch.setattr(kws.train, "accuracy", lambda *args: next(scores))
    out = tmp_path / "m.pt"
    result = train(dataclasses.replace(TINY_TRAIN, rounded_fraction=0.5), speech_commands.root, out,
                   overrides=TINY_MODEL, log=quiet)
    assert result["best_validation_accuracy"] == 0.6
    _, weights, meta = read_checkpoint(out)
    assert meta["history"][-1]["epoch"] == 3 and meta["history"][-1]["rounded_delays"]
    positions = [v for k, v in weights.items() if k.endswith("positions")]
    assert positions and all(torch.equal(p, p.round()) for p in positions)


def test_without_the_final_phase_the_taps_end_off_integer(speech_commands, tmp_path, unbroken_run):
    assert TrainConfig().rounded_fraction == 0.1  # by default the last tenth of the steps
    state = run_state(unbroken_run[1])  # TINY_TRAIN: its last step of 6 was rounded
    assert all(torch.equal(v, v.round()) for k, v in state["model"].items() if k.endswith("positions"))
    cfg = dataclasses.replace(TINY_TRAIN, rounded_fraction=0.0)
    train(cfg, speech_commands.root, tmp_path / "m.pt", overrides=TINY_MODEL, log=quiet)
    state = run_state(tmp_path / "m.run")
    assert any(not torch.equal(v, v.round()) for k, v in state["model"].items() if k.endswith("positions"))


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
    ["--sentence-negatives", "1.5"],
    ["--speech-negatives", "0.6", "--sentence-negatives", "0.5"],  # they share the background examples
    ["--lr", "0"],
    ["--lr", "-0.001"],
    ["--lr", "nan"],
    ["--threads", "-1"],
    ["--context-s", "-0.5"],
    ["--context-s", "30"],
    ["--set", "clip_context_s=0.3"],  # one setting: --context-s
    ["--label-smoothing", "1"],
    ["--label-smoothing", "-0.1"],
    ["--sigma-anneal-fraction", "0"],
    ["--sigma-anneal-fraction", "1.5"],
    ["--rounded-fraction", "1"],
    ["--grad-clip", "0"],
    ["--checkpoint-minutes", "0"],
    ["--warmup-steps", "-1"],
    ["--vtlp", "1.5"],
    ["--reverb", "-0.1"],
    ["--masks", "2"],
    ["--noise-onsets", "1.5"],
    ["--near-misses", "1.5"],
    ["--noise-switches", "-0.5"],
    ["--mic-response", "1.5"],
    ["--quieter-db", "-3"],
    ["--louder-db", "70"],
    ["--set", "power_floor=0"],
    ["--near-misses", "0.5"],  # a share of the sentence negatives, without any
    ["--distill-share", "0"],
    ["--distill-temperature", "0"],
    ["--distill-repr", "-1"],
    ["--distill-repr", "1"],  # a weight without a --teacher
    ["--window-negatives", "-1"],
    ["--anchor-weight", "-1"],
    ["--sentences", "0"],
    ["--workers", "-1"],
])
def test_kws_train_with_bad_settings_exits_2_with_one_line_before_loading_data(tmp_path, capsys, bad):
    out = tmp_path / "m.pt"
    # No dataset at all: the setting must be refused before any data is read.
    tiny = ["--epochs", "1", "--examples-per-epoch", "8", "--batch-size", "8", *TINY_SET]
    code = main(["train", "--data", str(tmp_path / "absent"), "--out", str(out), *tiny, *bad])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith("kws: error: ") and captured.err.count("\n") == 1, captured.err
    assert "absent" not in captured.err, captured.err
    assert not out.exists()


@pytest.mark.parametrize("where", ["folder", "under a file"])
def test_kws_train_with_an_out_it_cannot_write_exits_2_before_loading_data(tmp_path, capsys, where):
    (tmp_path / "file").write_text("")
    out = {"folder": tmp_path, "under a file": tmp_path / "file" / "m.pt"}[where]
    code = main(["train", "--data", str(tmp_path / "absent"), "--out", str(out), *TINY_SET])
    err = capsys.readouterr().err
    assert code == 2 and "--out" in err and err.count("\n") == 1, err


def test_a_fine_tune_takes_its_models_settings_and_taps_as_trained(tmp_path):
    start = tiny_model(width=12, sigma_start=8.0, sigma_end=0.5)
    save_model(start, tmp_path / "start.pt")
    cfg = kws.train.model_config(TrainConfig(), {"dropout": 0.2}, init=tmp_path / "start.pt")
    assert cfg.width == 12 and cfg.n_layers == start.cfg.n_layers  # its shape, not the preset's
    assert cfg.sigma_start == cfg.sigma_end == 0.5  # its taps are not widened again
    assert cfg.dropout == 0.2  # --set still changes what does not change the shape
    assert kws.train.model_config(TrainConfig(), {"sigma_start": 2.0}, init=tmp_path / "start.pt").sigma_start == 2.0


@pytest.mark.parametrize("bad, words", [
    (["--set", "width=16"], ["width=16", "shape"]),
    (["--preset", "edge"], ["--preset", "--set"]),
    (["--init-absent"], ["no model file"]),
])
def test_kws_train_with_an_init_it_cannot_fine_tune_exits_2_before_loading_data(tmp_path, capsys, bad, words):
    save_model(tiny_model(), tmp_path / "start.pt")
    init = ["--init", str(tmp_path / ("absent.pt" if bad == ["--init-absent"] else "start.pt"))]
    bad = [] if bad == ["--init-absent"] else bad
    out = tmp_path / "m.pt"
    code = main(["train", "--data", str(tmp_path / "no-data"), "--out", str(out), *init, *bad])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("kws: error: ") and err.count("\n") == 1, err
    assert all(word in err for word in words) and "no-data" not in err, err
    assert not out.exists()


def test_kws_train_help_says_what_each_setting_does_and_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, also at hyphens
    for f in dataclasses.fields(TrainConfig):
        described = f"{f.metadata['help']} (default {f.default})"
        assert len(described) > 25 and "".join(described.split()) in text, f.name


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


class StoppedWhileBuilt(kws.train.tqdm):
    """A bar that receives `stop` half-way through its construction: enabled, but with no
    position yet, the state in which its __del__ raises."""
    stop = signal.SIGINT

    @classmethod
    def _get_free_pos(cls, instance=None):
        os.kill(os.getpid(), cls.stop)
        return super()._get_free_pos(instance)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_during_a_progress_bars_construction_reaches_its_handler_once_the_bar_is_whole(monkeypatch, stop):
    unraisable, heard = [], []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    monkeypatch.setattr(kws.train, "tqdm", type("Stopped", (StoppedWhileBuilt,), {"stop": stop}))

    def handler(signum, frame):
        heard.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(stop, handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            kws.train.progress_bar(total=3, file=io.StringIO())
    finally:
        signal.signal(stop, previous)
    gc.collect()
    assert heard == [stop]
    assert not unraisable, unraisable[0].exc_value  # a half-built bar's __del__ fails on a missing attribute
