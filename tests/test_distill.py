"""Distillation: the teacher's embedding steps and their alignment with the student's steps,
the two distillation losses, and a tiny run that distils from a stand-in teacher on the
student's own augmented examples. Tests that need the real teacher (openwakeword's ONNX files)
are skipped when the `distill` extra is not installed."""

import numpy as np
import pytest
import torch

from conftest import TINY_MODEL, tiny_model
import kws.train
from kws import PROJECT_LICENSE
from kws.labels import LABELS
from kws.errors import KwsError
from kws.model import read_checkpoint
from kws.teacher import EMBEDDING_DIM, TEACHER_LICENSE, aligned_steps, embedding_count, embedding_end_sample
from kws.train import TrainConfig, distillation_losses, train

TINY_DISTIL = TrainConfig(epochs=1, examples_per_epoch=16, batch_size=8, warmup_steps=1, seed=1,
                          distill_repr=1.0, distill_logits=0.5, distill_share=0.5)


def quiet(*args, **kwargs):
    pass


# ----------------------------------------------------------------------------- alignment

def test_a_1_5_s_example_gives_9_embeddings_each_80_ms_apart():
    assert embedding_count(24000) == 9 and embedding_count(16000) == 3
    ends = [embedding_end_sample(k) for k in range(9)]
    assert np.all(np.diff(ends) == 8 * 160)
    assert ends[-1] < 24000 <= ends[-1] + 8 * 160


def test_each_embedding_maps_to_the_first_10_ms_step_that_has_heard_all_its_audio():
    steps = aligned_steps(9, 160)
    assert steps == [8 * k + 78 for k in range(9)]
    # The student's causality, measured: a change at an embedding's last sample reaches that
    # step and no step before it.
    model = tiny_model(dropout=0.0)
    audio = torch.randn(1, 24000) * 0.1
    for k in (0, 8):
        changed = audio.clone()
        changed[0, embedding_end_sample(k)] += 1.0
        with torch.no_grad():
            before, after = model.features(audio), model.features(changed)
        difference = (after - before).abs().amax(dim=(0, 2))
        assert difference[:steps[k]].max() == 0 and difference[steps[k]] > 0


@pytest.fixture(scope="module")
def embedding():
    pytest.importorskip("onnxruntime")
    from kws.teacher import SpeechEmbedding
    try:
        return SpeechEmbedding()
    except KwsError as e:
        pytest.skip(str(e))


def test_the_teacher_embedding_hears_exactly_the_audio_up_to_its_end_sample(embedding):
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal((1, 24000)) * 0.1).astype(np.float32)
    base = embedding(audio)
    assert base.shape == (1, 9, EMBEDDING_DIM)
    k = 4
    after_end = audio.copy()
    after_end[0, embedding_end_sample(k) + 1:] = rng.standard_normal(24000 - embedding_end_sample(k) - 1) * 0.3
    assert np.array_equal(embedding(after_end)[0, :k + 1], base[0, :k + 1])
    at_end = audio.copy()
    at_end[0, embedding_end_sample(k) - 160:embedding_end_sample(k) + 1] *= 5  # its last 10 ms
    assert np.abs(embedding(at_end)[0, k] - base[0, k]).max() > 1e-3


# ----------------------------------------------------------------------------- the losses

def test_the_representation_loss_reads_the_aligned_steps_of_the_heard_examples_only():
    torch.manual_seed(0)
    steps = [3, 7]
    projected = torch.randn(4, 10, 6, requires_grad=True)
    target = projected.detach()[:2, steps].clone()
    clip, teacher_logits = torch.randn(4, 5), torch.randn(2, 5)
    representation, _ = distillation_losses(clip, projected, target, teacher_logits, steps, 2.0)
    assert float(representation.detach()) == 0.0
    shifted = target + 0.5
    representation, _ = distillation_losses(clip, projected, shifted, teacher_logits, steps, 2.0)
    assert float(representation.detach()) == pytest.approx(0.25)
    representation.backward()
    touched = projected.grad.abs().amax(dim=2)
    assert touched[:2, steps].min() > 0 and touched.sum() == touched[:2, steps].sum()


def test_the_logit_loss_is_the_temperature_scaled_kl_to_the_teachers_softened_outputs():
    torch.manual_seed(1)
    teacher_logits, clip = torch.randn(3, 6), torch.randn(5, 6)
    _, same = distillation_losses(torch.cat([teacher_logits, clip[3:]]), None, None, teacher_logits, [], 2.0)
    assert float(same) == pytest.approx(0.0, abs=1e-6)
    for temperature in (1.0, 4.0):
        _, logit = distillation_losses(clip, None, None, teacher_logits, [], temperature)
        p = torch.softmax(teacher_logits / temperature, -1)
        q = torch.log_softmax(clip[:3] / temperature, -1)
        expected = (p * (p.log() - q)).sum(-1).mean() * temperature ** 2
        assert float(logit) == pytest.approx(float(expected), rel=1e-5)


# ----------------------------------------------------------------------------- a tiny run

class StandInTeacher:
    """Deterministic targets from the audio itself; records what it was asked to hear."""

    def __init__(self):
        self.heard = []
        self.head = type("Head", (), {"n_embeddings": 9})()

    def targets(self, audio):
        self.heard.append(audio.copy())
        x = torch.from_numpy(audio)
        frames = x[:, :9 * 2560].reshape(len(x), 9, 2560)
        embeddings = frames.abs().mean(-1, keepdim=True).expand(-1, -1, EMBEDDING_DIM) * 10
        logits = torch.zeros(len(x), len(LABELS))
        logits[:, 0] = 3.0
        return embeddings.contiguous(), logits


def test_a_distilled_run_asks_the_teacher_about_the_students_own_examples(speech_commands, tmp_path, monkeypatch):
    teacher = StandInTeacher()
    monkeypatch.setattr(kws.train, "load_teacher", lambda path, threads: teacher)
    drawn = []
    real_batch = kws.train.TrainingBatches.batch

    def recording_batch(self, size):
        audio, labels, word_free = real_batch(self, size)
        drawn.append(audio.numpy().copy())
        return audio, labels, word_free

    monkeypatch.setattr(kws.train.TrainingBatches, "batch", recording_batch)
    out = tmp_path / "m.pt"
    train(TINY_DISTIL, speech_commands.root, out, overrides=TINY_MODEL, teacher=tmp_path / "teacher.pt", log=quiet)
    assert len(teacher.heard) == len(drawn) == 2
    for heard, batch in zip(teacher.heard, drawn):
        assert np.array_equal(heard, batch[:4])  # distill_share 0.5 of 8, augmented as trained
    state = torch.load(out.with_suffix(".run") / "last.pt", weights_only=True)
    assert state["projection"]["weight"].shape == (EMBEDDING_DIM, TINY_MODEL["width"])
    assert not any("project" in k for k in read_checkpoint(out)[1])  # the model ships without it


def test_distillation_moves_the_student_toward_the_teacher(speech_commands, tmp_path, monkeypatch):
    """Same seed and budget: with a heavy logit weight, the student's clips lean toward the
    label the stand-in teacher always says."""
    monkeypatch.setattr(kws.train, "load_teacher", lambda path, threads: StandInTeacher())
    cfg = TrainConfig(epochs=3, examples_per_epoch=128, batch_size=16, warmup_steps=1, seed=2, lr=1e-2)
    shares = {}
    for name, weight in (("plain", 0.0), ("distilled", 20.0)):
        run = dict(distill_logits=weight, distill_share=1.0)
        teacher = tmp_path / "t.pt" if weight else None
        out = tmp_path / f"{name}.pt"
        train(TrainConfig(**{**cfg.__dict__, **run}), speech_commands.root, out, overrides=TINY_MODEL,
              teacher=teacher, log=quiet)
        model = tiny_model()
        model.load_state_dict(torch.load(out.with_suffix(".run") / "last.pt", weights_only=True)["model"])
        with torch.no_grad():
            probabilities = torch.softmax(model.eval().classify(torch.randn(16, 16000) * 0.1), -1)
        shares[name] = float(probabilities[:, 0].mean())
    assert shares["distilled"] > 3 * shares["plain"], shares


def test_a_distilled_model_and_its_fine_tunes_carry_the_teachers_licence(speech_commands, tmp_path, monkeypatch):
    monkeypatch.setattr(kws.train, "load_teacher", lambda path, threads: StandInTeacher())
    plain = TrainConfig(epochs=1, examples_per_epoch=16, batch_size=8, warmup_steps=1, seed=1)
    train(plain, speech_commands.root, tmp_path / "plain.pt", overrides=TINY_MODEL, log=quiet)
    train(TINY_DISTIL, speech_commands.root, tmp_path / "distilled.pt", overrides=TINY_MODEL,
          teacher=tmp_path / "teacher.pt", log=quiet)
    train(plain, speech_commands.root, tmp_path / "tuned.pt", overrides=TINY_MODEL,
          init=tmp_path / "distilled.pt", log=quiet)
    train(plain, speech_commands.root, tmp_path / "tuned-plain.pt", overrides=TINY_MODEL,
          init=tmp_path / "plain.pt", log=quiet)
    licences = {name: read_checkpoint(tmp_path / f"{name}.pt")[2]["license"]
                for name in ("plain", "distilled", "tuned", "tuned-plain")}
    assert TEACHER_LICENSE != PROJECT_LICENSE
    assert licences == {"plain": PROJECT_LICENSE, "distilled": TEACHER_LICENSE,
                        "tuned": TEACHER_LICENSE, "tuned-plain": PROJECT_LICENSE}


@pytest.mark.parametrize("settings, message", [
    (dict(distill_repr=1.0), "needs both --teacher"),
    (dict(distill_temperature=0.0), "--distill-temperature"),
    (dict(distill_share=0.0), "--distill-share"),
    (dict(distill_logits=-1.0), "--distill-logits"),
])
def test_bad_distillation_settings_are_clear_errors(speech_commands, tmp_path, settings, message):
    cfg = TrainConfig(**{**TrainConfig(epochs=1, examples_per_epoch=8, batch_size=8).__dict__, **settings})
    with pytest.raises(KwsError, match=message):
        train(cfg, speech_commands.root, tmp_path / "m.pt", overrides=TINY_MODEL, log=quiet)


def test_a_teacher_without_a_weight_is_a_clear_error(speech_commands, tmp_path):
    with pytest.raises(KwsError, match="needs both"):
        train(TrainConfig(epochs=1, examples_per_epoch=8, batch_size=8), speech_commands.root, tmp_path / "m.pt",
              overrides=TINY_MODEL, teacher=tmp_path / "t.pt", log=quiet)


# ----------------------------------------------------------------------------- the teacher's data

def test_teacher_background_cuts_are_noise_and_every_other_starts_with_silence(speech_commands):
    from kws.teacher import CONTEXT_SAMPLES, background_examples
    cuts = background_examples(speech_commands.root, "training", 6, seed=0)
    assert cuts.shape == (6, CONTEXT_SAMPLES + 16000)
    assert np.all(cuts[1::2, :CONTEXT_SAMPLES] == 0) and np.all(np.abs(cuts[0::2, :CONTEXT_SAMPLES]).max(1) > 0)
    assert np.all(np.abs(cuts[:, CONTEXT_SAMPLES:]).max(1) > 0)


def test_without_openwakeword_the_teacher_is_a_one_line_error_naming_the_extra(monkeypatch, tmp_path, capsys):
    import importlib.util
    from kws.cli import main
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "openwakeword" else real_find_spec(name, *a))
    code = main(["teacher", "train", "--data", str(tmp_path), "--out", str(tmp_path / "t.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "kws[distill]" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("problem, message", [
    ("--out in a folder that is a file", "--out"),
    ("no noise recordings", "no noise recordings"),
    ("--epochs 0", "'0' is not a positive number"),
    ("--threads 0", "'0' is not a positive number"),
])
def test_teacher_training_checks_its_inputs_before_any_embedding(
        make_speech_commands, tmp_path, monkeypatch, capsys, problem, message):
    import kws.teacher
    from kws.cli import main
    monkeypatch.setattr(kws.teacher, "_model_files", lambda: None)  # with or without the distill extra
    monkeypatch.setattr(kws.teacher, "SpeechEmbedding", lambda *a: pytest.fail("embedded before the check"))
    data = make_speech_commands()
    args = ["teacher", "train", "--data", str(data.root), "--out", str(tmp_path / "t.pt")]
    if problem.startswith("--out"):
        (tmp_path / "file").write_text("")
        args[-1] = str(tmp_path / "file" / "t.pt")
    elif problem.startswith("no noise"):
        for noise in (data.root / "_background_noise_").iterdir():
            noise.unlink()
    else:
        args += problem.split()
    try:
        code = main(args)
    except SystemExit as stop:  # argparse's refusal
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


def test_cached_embeddings_are_kept_apart_by_what_they_were_made_from(tmp_path):
    from kws.teacher import cached_embeddings
    made = []

    def embed(audio):
        made.append(len(audio))
        return audio[:, :2] * 0 + len(made)

    first = cached_embeddings(embed, "training", tmp_path, lambda: np.ones((3, 4), np.float32), quiet, ["a", "b", "c"])
    again = cached_embeddings(embed, "training", tmp_path, lambda: np.ones((3, 4), np.float32), quiet, ["a", "b", "c"])
    other = cached_embeddings(embed, "training", tmp_path, lambda: np.ones((2, 4), np.float32), quiet, ["a", "d"])
    assert made == [3, 2]  # the second call read the cache; other clips are embedded, not read
    assert np.array_equal(first, again) and other.shape == (2, 2) and other[0, 0] == 2


def test_a_distilled_run_resumes_with_its_projection_like_an_unbroken_run(speech_commands, tmp_path, monkeypatch):
    monkeypatch.setattr(kws.train, "load_teacher", lambda path, threads: StandInTeacher())
    cfg = TrainConfig(**{**TINY_DISTIL.__dict__, "epochs": 2, "checkpoint_minutes": 1e-9})
    unbroken = tmp_path / "unbroken.pt"
    train(cfg, speech_commands.root, unbroken, overrides=TINY_MODEL, teacher=tmp_path / "t.pt", log=quiet)

    class Stop(Exception):
        pass

    def stop_at_epoch_2(message, *args, **kwargs):
        if str(message).startswith("epoch 2:"):
            raise Stop
    broken = tmp_path / "broken.pt"
    with pytest.raises(Stop):
        train(cfg, speech_commands.root, broken, overrides=TINY_MODEL, teacher=tmp_path / "t.pt", log=stop_at_epoch_2)
    assert torch.load(broken.with_suffix(".run") / "last.pt", weights_only=True)["step"] == 1  # mid-epoch 2
    train(cfg, speech_commands.root, broken, overrides=TINY_MODEL, teacher=tmp_path / "t.pt", resume=True, log=quiet)
    a = torch.load(unbroken.with_suffix(".run") / "last.pt", weights_only=True)
    b = torch.load(broken.with_suffix(".run") / "last.pt", weights_only=True)
    for part in ("model", "projection"):
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)
