"""Training: `kws train --preset edge --data DIR [--synth DIR] --out PATH`.

AdamW (weight decay on matrices only, a higher learning rate for tap positions), warmup then
cosine decay, DCLS sigma annealing then a final phase on the rounded (integer) delays, gradient
clipping, class-balanced augmented batches (made in worker processes with --workers), a
checkpoint every epoch and every few minutes (Ctrl-C or SIGTERM saves one too), --resume,
best-on-validation selection among the epochs of the rounded-delay phase. Runs on a GPU when
present and under `torchrun` (DistributedDataParallel; gloo on CPUs, nccl on GPUs).
"""

import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from kws import PROJECT_LICENSE
from kws.audio import CLIP_SAMPLES, SAMPLE_RATE
from kws.cli import check_writable
from kws.data import TrainingBatches, load_clips, read_noise, read_split, read_synth
from kws.labels import BACKGROUND, LABELS
from kws.errors import KwsError
from kws.model import MGRADE, ModelConfig, average_models, load_model, preset, read_checkpoint, save_model
from kws.speech import (NEAR_MISS_SENTENCES, NEAR_MISS_VOCABULARY, TRAINING_SENTENCES, default_cache,
                        training_sentences)
from kws.teacher import EMBEDDING_DIM, TEACHER_LICENSE, aligned_steps, embedding_count, load_teacher


def setting(default, help: str):
    """A TrainConfig field with the text `kws train --help` shows for it."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    preset: str = setting("edge", "model size and stride: edge (10-ms steps) or paper (every sample)")
    epochs: int = setting(16, "epochs of --examples-per-epoch augmented examples")
    examples_per_epoch: int = setting(16000, "examples per epoch (drawn class-balanced, augmented anew)")
    batch_size: int = setting(64, "examples per optimiser step")
    lr: float = setting(3e-3, "peak learning rate (AdamW; warm-up, then cosine decay)")
    position_lr_scale: float = setting(5.0, "tap positions' learning rate, as a multiple of --lr "
                                             "(positions move in steps, not in weight units)")
    weight_decay: float = setting(0.05, "AdamW weight decay, on matrices only")
    warmup_steps: int = setting(300, "steps of linear learning-rate warm-up")
    grad_clip: float = setting(1.0, "largest gradient norm")
    label_smoothing: float = setting(0.05, "label smoothing of the clip loss, in [0, 1)")
    sigma_anneal_fraction: float = setting(0.8, "share of the run over which the taps' Gaussian "
                                                "width shrinks to its end value, then holds")
    rounded_fraction: float = setting(0.1, "share of the last steps trained on integer delays, "
                                           "as inference reads them")
    background_weight: float = setting(2.0, "how often background is drawn, against 1 for each word")
    speech_negatives: float = setting(0.0, "share of background examples holding a word's end or tail")
    sentence_negatives: float = setting(0.0, "share of background examples cut from keyword-free "
                                             "TTS sentences")
    sentences: int = setting(TRAINING_SENTENCES, "how many such sentences (seeds 0, 1, ...) they "
                                                 "are cut from")
    near_misses: float = setting(0.0, "share of those sentences spoken with words that sound like "
                                      "keywords")
    vtlp: float = setting(0.0, "share of word examples with a warped frequency axis (new vocal tracts)")
    reverb: float = setting(0.0, "share of examples in a synthetic room (RT60 0.1-0.8 s)")
    masks: float = setting(0.0, "share of examples with a silenced time span and frequency band")
    noise_onsets: float = setting(0.0, "share of noisy examples whose noise starts or stops within them")
    noise_switches: float = setting(0.0, "share of noisy examples whose noise gives way to another "
                                         "within them")
    quieter_db: float = setting(0.0, "each example's level moved by -QUIETER_DB .. +LOUDER_DB dB (a "
                                     "microphone's gain, the talker's distance); both 0: off")
    louder_db: float = setting(0.0, "see --quieter-db")
    mic_response: float = setting(0.0, "share of examples recorded through a random microphone's "
                                       "frequency response")
    window_negatives: float = setting(0.0, "loss weight (0: off) of the 1-s window of each word-free "
                                           "background example that least reads background (the "
                                           "streaming operating point)")
    seed: int = setting(0, "seed of the initial weights and of every example drawn")
    checkpoint_minutes: float = setting(10.0, "also save the run state this often within an epoch")
    # Distillation from a teacher (kws teacher train; --teacher FILE): loss weights, 0 = off.
    distill_repr: float = setting(0.0, "loss weight: the last layer, projected, regresses the "
                                       "teacher's embeddings (with --teacher)")
    distill_logits: float = setting(0.0, "loss weight: the clip readout matches the teacher's "
                                         "softened outputs (with --teacher)")
    distill_temperature: float = setting(2.0, "temperature of the softened outputs (--distill-logits, "
                                              "--anchor-weight)")
    distill_share: float = setting(0.25, "share of each batch the teacher hears (it costs ~20 ms a clip)")
    # Fine-tuning's memory (--anchor MODEL [MODEL ...]): on word examples, the clip readout keeps
    # the softened outputs of frozen trained models (their logits averaged: an ensemble), so that
    # learning new negatives does not unlearn the words (learning without forgetting, Li & Hoiem 2016).
    anchor_weight: float = setting(0.0, "loss weight (0: off) keeping the word examples' outputs "
                                        "close to the --anchor models'")

def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: MGRADE, cfg: TrainConfig) -> torch.optim.AdamW:
    positions, decay, no_decay = [], [], []
    for name, p in model.named_parameters():
        if name.endswith("positions"):
            positions.append(p)
        elif p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    return torch.optim.AdamW([
        {"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
        {"params": positions, "weight_decay": 0.0, "lr_scale": cfg.position_lr_scale},
    ], lr=cfg.lr, betas=(0.9, 0.98))


def clip_readout(logits: torch.Tensor, context_steps: int) -> torch.Tensor:
    """(B, classes): the mean of each example's per-step logits after its context."""
    return logits[:, context_steps:].mean(dim=1)


def target_loss(logits: torch.Tensor, labels: torch.Tensor, context_steps: int, label_smoothing: float = 0.0):
    """(loss, accuracy, clip logits): label-smoothed cross-entropy of the clip readout, the mean
    of the target's per-step logits only (the context before it is skipped), as `classify`
    reads a clip. logits (B, steps, classes)."""
    clip = clip_readout(logits, context_steps)
    loss = F.cross_entropy(clip, labels, label_smoothing=label_smoothing)
    return loss, (clip.argmax(-1) == labels).float().mean(), clip


def window_negative_loss(logits: torch.Tensor, word_free: torch.Tensor, window_steps: int,
                         background: int) -> torch.Tensor:
    """Cross-entropy toward background of the hardest window of each word-free example: of all
    its full windows of `window_steps` (means of per-step logits, as the streaming detector reads
    them), the one where background is least likely. A stream's false alarms come from its worst
    windows, not from the one aligned window the clip loss reads. logits (B, steps, classes)."""
    windows = logits[word_free].unfold(1, window_steps, 1).mean(-1)  # (n, steps - W + 1, classes)
    if not len(windows):
        return logits.new_zeros(())
    return -F.log_softmax(windows, -1)[..., background].min(dim=1).values.mean()


def soft_target_loss(logits: torch.Tensor, target_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL divergence from the target's softened distribution to the logits' at `temperature`,
    times temperature^2 (Hinton et al.: gradients keep their scale whatever the temperature)."""
    return F.kl_div(F.log_softmax(logits / temperature, -1), F.softmax(target_logits / temperature, -1),
                    reduction="batchmean") * temperature ** 2


def distillation_losses(clip_logits: torch.Tensor, projected: torch.Tensor | None, teacher_embeddings,
                        teacher_logits, steps: list[int], temperature: float) -> tuple:
    """(representation loss, logit loss) on the first n examples, those the teacher heard.

    Representation: mean squared error between the student's projected features at `steps`
    (the first step that has heard all of each embedding's audio) and the teacher's standardised
    embeddings (n, K, 96). Logits: `soft_target_loss` of the student's clip readout against the
    teacher's logits."""
    n = len(teacher_logits)
    representation = (F.mse_loss(projected[:n, steps], teacher_embeddings)
                      if projected is not None else clip_logits.new_zeros(()))
    return representation, soft_target_loss(clip_logits[:n], teacher_logits, temperature)


def anchor_loss(clip_logits: torch.Tensor, audio: torch.Tensor, labels: torch.Tensor, anchors: list[MGRADE],
                background: int, temperature: float) -> torch.Tensor:
    """`soft_target_loss` of the clip readout of the word examples (label not background) against
    the frozen `anchors`' clip readouts of the same audio, averaged (an ensemble's logits).
    clip_logits (B, classes)."""
    words = labels != background
    if not words.any():
        return clip_logits.new_zeros(())
    with torch.no_grad():
        target = torch.stack([clip_readout(a(audio[words]), a.cfg.context_samples // a.cfg.stride)
                              for a in anchors]).mean(0)
    return soft_target_loss(clip_logits[words], target, temperature)


class Student(nn.Module):
    """The model, and for representation distillation a projection of its last layer onto the
    teacher's embedding. The projection is training's alone: the saved model never holds it."""

    def __init__(self, model: MGRADE, project: bool):
        super().__init__()
        self.model = model
        self.project = nn.Linear(model.cfg.width, EMBEDDING_DIM) if project else None

    def forward(self, audio):
        features = self.model.features(audio)
        return self.model.decoder(features), (self.project(features) if self.project is not None else None)


@torch.no_grad()
def accuracy(model: MGRADE, audio: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(audio), batch_size):
        x = torch.from_numpy(audio[i:i + batch_size]).to(next(model.parameters()).device)
        correct += int((model.classify(x).argmax(-1).cpu().numpy() == labels[i:i + batch_size]).sum())
    return correct / len(audio)


def distributed() -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def epoch_batches(d: dict, cfg: TrainConfig, epoch: int, rank: int = 0,
                  context_s: float = 0.5, worker: int | None = None) -> TrainingBatches:
    """One epoch's batches (of one batch worker's share of them). Seeding per epoch, rank and
    worker makes a resumed run draw the same batches as an unbroken one."""
    stream = 0 if worker is None else worker + 1
    return TrainingBatches(d["real"], d["real_labels"], d["synth"], d["synth_labels"],
                           d["noise"], len(LABELS), LABELS.index(BACKGROUND),
                           seed=cfg.seed * 100003 + epoch * 101 + rank + stream * 1_000_000_007,
                           context_s=context_s,
                           background_weight=cfg.background_weight,
                           speech_negatives=cfg.speech_negatives, vtlp=cfg.vtlp, reverb=cfg.reverb,
                           masks=cfg.masks, sentences=d["sentences"], sentence_negatives=cfg.sentence_negatives,
                           noise_onsets=cfg.noise_onsets, near_miss_sentences=d["near_miss_sentences"],
                           near_misses=cfg.near_misses, noise_switches=cfg.noise_switches,
                           quieter_db=cfg.quieter_db, louder_db=cfg.louder_db,
                           mic_response=cfg.mic_response)


class WorkerBatches(torch.utils.data.IterableDataset):
    """`steps` of an epoch's batches, made in DataLoader worker processes (a GPU trains faster
    than one process makes examples). Worker w of n makes steps w, w + n, ... from its own
    seeded stream, and the loader hands them out in that round-robin order: the same number of
    workers gives the same batches."""

    def __init__(self, d: dict, cfg: TrainConfig, epoch: int, rank: int, context_s: float, steps: int):
        super().__init__()
        self.d, self.cfg, self.epoch, self.rank, self.context_s, self.steps = d, cfg, epoch, rank, context_s, steps

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        if worker is None:
            raise RuntimeError("WorkerBatches is read through a DataLoader with num_workers >= 1")
        batches = epoch_batches(self.d, self.cfg, self.epoch, self.rank, self.context_s, worker.id)
        for _ in range(worker.id, self.steps, worker.num_workers):
            yield batches.batch(self.cfg.batch_size)


def worker_batches(d: dict, cfg: TrainConfig, epoch: int, rank: int, context_s: float, steps: int,
                   workers: int):
    """An iterator over the epoch's `steps` batches, made by `workers` processes."""
    loader = torch.utils.data.DataLoader(WorkerBatches(d, cfg, epoch, rank, context_s, steps), batch_size=None,
                                         num_workers=workers, prefetch_factor=4,
                                         pin_memory=torch.cuda.is_available())
    return iter(loader)


def load_training_data(data: Path, synth: Path | None, log, sentences: int = 0,
                       near_misses: bool = False) -> dict:
    """Clips, noise and validation clips; `sentences` keyword-free TTS sentences, with
    `near_misses` the near-miss ones (rendered into kws.speech's cache the first time, a few
    minutes)."""
    real = read_split(data, "training")
    synth_clips = read_synth(synth) if synth else []
    valid = read_split(data, "validation")
    log(f"loading {len(real)} real + {len(synth_clips)} synthetic training clips, "
        f"{len(valid)} validation clips")
    index = {label: i for i, label in enumerate(LABELS)}
    return {
        "real": load_clips(real), "real_labels": [index[c.label] for c in real],
        "synth": load_clips(synth_clips), "synth_labels": [index[c.label] for c in synth_clips],
        "noise": read_noise(data, "training"),
        "sentences": training_sentences(default_cache(), sentences) if sentences else [],
        "near_miss_sentences": (training_sentences(default_cache(), NEAR_MISS_SENTENCES, NEAR_MISS_VOCABULARY)
                                if near_misses else []),
        "valid": load_clips(valid), "valid_labels": np.array([index[c.label] for c in valid]),
        "counts": {w: {"real": sum(c.label == w for c in real),
                       "synthetic": sum(c.label == w for c in synth_clips)} for w in LABELS[:-1]},
    }


def model_config(cfg: TrainConfig, overrides: dict | None, init: Path | None = None) -> ModelConfig:
    """The preset's settings or, fine-tuning from `init`, that model's own with its taps as trained
    (sigma starts at its end value, not re-annealed from wide), changed by --set."""
    try:
        if init is None:
            return preset(cfg.preset, LABELS, **(overrides or {}))
        start, weights, _ = read_checkpoint(init)
        if start.labels != tuple(LABELS):
            raise KwsError(f"--init {init} has other labels than the 35 words and background: "
                           "it cannot be fine-tuned here")
        model_cfg = replace(start, **{"sigma_start": start.sigma_end, **(overrides or {})})
    except (TypeError, ValueError) as e:
        raise KwsError(f"bad model settings: {e}") from None
    try:
        MGRADE(model_cfg).load_state_dict(weights)
    except RuntimeError:
        changed = ", ".join(f"{k}={v}" for k, v in (overrides or {}).items() if getattr(start, k) != v)
        raise KwsError(f"--set {changed} changes the shape of --init {init}'s model; "
                       "a fine-tune keeps its shape") from None
    return model_cfg


def check_config(cfg: TrainConfig, world: int = 1) -> int:
    """Steps per epoch, or a KwsError naming the first setting that cannot train."""
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise KwsError(f"--epochs and --batch-size must be at least 1, not {cfg.epochs} and {cfg.batch_size}")
    positive = {"--lr": cfg.lr, "--grad-clip": cfg.grad_clip, "--background-weight": cfg.background_weight,
                "--checkpoint-minutes": cfg.checkpoint_minutes}
    for flag, value in positive.items():
        if not (math.isfinite(value) and value > 0):
            raise KwsError(f"{flag} must be a positive number, not {value}")
    for flag, value in {"--weight-decay": cfg.weight_decay, "--position-lr-scale": cfg.position_lr_scale,
                        "--warmup-steps": cfg.warmup_steps}.items():
        if not (math.isfinite(value) and value >= 0):
            raise KwsError(f"{flag} must be 0 or more, not {value}")
    fractions = {"--speech-negatives": (cfg.speech_negatives, 0.0, 1.0, True),
                 "--sentence-negatives": (cfg.sentence_negatives, 0.0, 1.0, True),
                 "--near-misses": (cfg.near_misses, 0.0, 1.0, True),
                 "--noise-switches": (cfg.noise_switches, 0.0, 1.0, True),
                 "--vtlp": (cfg.vtlp, 0.0, 1.0, True), "--reverb": (cfg.reverb, 0.0, 1.0, True),
                 "--masks": (cfg.masks, 0.0, 1.0, True), "--noise-onsets": (cfg.noise_onsets, 0.0, 1.0, True),
                 "--mic-response": (cfg.mic_response, 0.0, 1.0, True),
                 "--label-smoothing": (cfg.label_smoothing, 0.0, 1.0, False),
                 "--rounded-fraction": (cfg.rounded_fraction, 0.0, 1.0, False)}
    for flag, (value, low, high, high_ok) in fractions.items():
        if not (low <= value < high or (high_ok and value == high)):
            raise KwsError(f"{flag} is a fraction from {low:g} to {high:g}{'' if high_ok else ' (not included)'}, "
                           f"not {value}")
    for flag, value in {"--quieter-db": cfg.quieter_db, "--louder-db": cfg.louder_db}.items():
        if not 0.0 <= value <= 60.0:
            raise KwsError(f"{flag} is 0 (off) to 60 dB, not {value}")
    if cfg.speech_negatives + cfg.sentence_negatives > 1.0:
        raise KwsError(f"--speech-negatives and --sentence-negatives share the background examples: "
                       f"together at most 1, not {cfg.speech_negatives + cfg.sentence_negatives:g}")
    if cfg.sentences < 1:
        raise KwsError(f"--sentences is how many training sentences to cut negatives from: at least 1, "
                       f"not {cfg.sentences}")
    if cfg.near_misses > 0 and cfg.sentence_negatives == 0:
        raise KwsError("--near-misses is a share of the sentence negatives: give --sentence-negatives too")
    for flag, value in {"--distill-repr": cfg.distill_repr, "--distill-logits": cfg.distill_logits,
                        "--window-negatives": cfg.window_negatives, "--anchor-weight": cfg.anchor_weight}.items():
        if not (math.isfinite(value) and value >= 0):
            raise KwsError(f"{flag} is a loss weight, 0 (off) or more, not {value}")
    if not (math.isfinite(cfg.distill_temperature) and cfg.distill_temperature > 0):
        raise KwsError(f"--distill-temperature must be a positive number, not {cfg.distill_temperature}")
    if not 0.0 < cfg.distill_share <= 1.0:
        raise KwsError(f"--distill-share is a fraction above 0 and at most 1, not {cfg.distill_share}")
    if not 0.0 < cfg.sigma_anneal_fraction <= 1.0:
        raise KwsError(f"--sigma-anneal-fraction is a fraction above 0 and at most 1, not {cfg.sigma_anneal_fraction}")
    steps = cfg.examples_per_epoch // (cfg.batch_size * world)
    if steps < 1:
        raise KwsError(f"--examples-per-epoch {cfg.examples_per_epoch} is less than one batch "
                       f"({cfg.batch_size} x {world} processes)")
    return steps


def load_anchor(path: Path, model_cfg: ModelConfig) -> MGRADE:
    """The frozen model a fine-tune keeps its words' outputs close to: it must read the same
    labels, and the same context before each clip, so that the two clip readouts compare."""
    anchor = load_model(path)
    if anchor.cfg.labels != model_cfg.labels or anchor.cfg.context_samples != model_cfg.context_samples:
        raise KwsError(f"--anchor {path} reads other labels or another context than the model trained")
    return anchor.requires_grad_(False)  # load_model gives it in eval mode


# Run states saved before accuracy() returned a plain float hold the best accuracy as a numpy
# float64; torch.load(weights_only=True) needs its reconstructor and dtype allowed to read them.
_NUMPY_FLOAT_GLOBALS = [np.float64(0).__reduce__()[0], np.dtype, type(np.dtype(np.float64))]


def read_run_state(path: Path, device) -> dict:
    if not path.is_file():
        raise KwsError(f"nothing to resume: no {path}")
    try:
        with torch.serialization.safe_globals(_NUMPY_FLOAT_GLOBALS):
            return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch raises many types for damaged zips and pickles
        raise KwsError(f"cannot resume from {path}: damaged or not a kws run state ({type(e).__name__})") from None


def train(cfg: TrainConfig, data: Path, out: Path, synth: Path | None = None,
          run_dir: Path | None = None, resume: bool = False, overrides: dict | None = None,
          init: Path | None = None, teacher: Path | None = None, anchors: list[Path] = (),
          workers: int = 0, log=print) -> dict:
    model_cfg = model_config(cfg, overrides, init)  # bad settings fail before minutes of loading
    rank, world = distributed()
    steps_per_epoch = check_config(cfg, world)
    check_writable(out, "--out")
    distilling = cfg.distill_repr > 0 or cfg.distill_logits > 0
    if distilling != (teacher is not None):
        raise KwsError("distillation needs both --teacher FILE and a weight (--distill-repr, --distill-logits)")
    if distilling:
        teacher = load_teacher(teacher, threads=torch.get_num_threads())
        example = model_cfg.context_samples + CLIP_SAMPLES
        if embedding_count(example) != teacher.head.n_embeddings:
            raise KwsError(f"the teacher reads {teacher.head.n_embeddings} embeddings, a {example / SAMPLE_RATE:g}-s "
                           f"example gives {embedding_count(example)}: train with --context-s 0.5")
        teacher_steps = aligned_steps(teacher.head.n_embeddings, model_cfg.stride)
    if (cfg.anchor_weight > 0) != bool(anchors):
        raise KwsError("anchoring needs both --anchor MODEL and --anchor-weight")
    anchors = [load_anchor(a, model_cfg) for a in anchors]
    log = log if rank == 0 else (lambda *a, **k: None)
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    run_dir = Path(run_dir or out.with_suffix(".run"))
    torch.manual_seed(cfg.seed)

    d = load_training_data(data, synth, log, sentences=cfg.sentences if cfg.sentence_negatives > 0 else 0,
                           near_misses=cfg.near_misses > 0)
    model = MGRADE(model_cfg).to(device)
    if init is not None:  # fine-tune: start from a trained model's weights, not at random
        _, init_weights, init_meta = read_checkpoint(init)
        model.load_state_dict(init_weights)  # model_config has checked that it fits
        model.license = init_meta.get("license", model.license)  # a fine-tune keeps its origin's terms
    if distilling:
        model.license = TEACHER_LICENSE
    for anchor in anchors:
        anchor.to(device)
        if anchor.license != PROJECT_LICENSE:
            model.license = anchor.license  # what it learns from an anchor is under the anchor's terms
    student = Student(model, project=cfg.distill_repr > 0).to(device)
    optimizer = make_optimizer(student, cfg)
    total_steps = steps_per_epoch * cfg.epochs
    rounded_from = total_steps - round(cfg.rounded_fraction * total_steps)
    context_s = model_cfg.context_samples / SAMPLE_RATE
    context_steps = model_cfg.context_samples // model_cfg.stride
    window_steps, background = CLIP_SAMPLES // model_cfg.stride, LABELS.index(BACKGROUND)
    history, start_epoch, start_step, best, saved = [], 0, 0, -1.0, None

    last = run_dir / "last.pt"
    if resume:
        saved = read_run_state(last, device)
        try:
            # The final phase freezes tap positions: the parameters must be in that state
            # before the optimizer's state (which then has none for them) is loaded.
            model.set_rounded_delays(saved.get("rounded", False))
            model.load_state_dict(saved["model"])
            if student.project is not None:
                student.project.load_state_dict(saved["projection"])
            optimizer.load_state_dict(saved["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise KwsError(f"{last} does not match these settings ({str(e).splitlines()[0]}); "
                           f"resume with the settings it was started with") from None
        # Dropout draws from torch's generator: continue it where the broken run left it.
        if "torch_rng" in saved:
            torch.set_rng_state(saved["torch_rng"].cpu())
        if "cuda_rng" in saved and device.type == "cuda":
            torch.cuda.set_rng_state(saved["cuda_rng"].cpu(), device)
        start_epoch, best = int(saved["epoch"]) + 1, float(saved["best"])
        start_step = int(saved.get("step", 0))
        history = json.loads(saved["history"])
        where = f"epoch {start_epoch}" + (f", step {start_step}" if start_step else "")
        log(f"resuming after {where} (best validation accuracy {best:.4f})")

    def save_run_state(epoch_done: int, step: int = 0, batches_state: str = "", smoothed=None):
        """The run state after `epoch_done` (0-based) and `step` steps of the next epoch."""
        rng = {"torch_rng": torch.get_rng_state()}
        if device.type == "cuda":
            rng["cuda_rng"] = torch.cuda.get_rng_state(device)
        mid_epoch = {"step": step, "batches": batches_state, "smoothed": json.dumps(smoothed)} if step else {}
        run_dir.mkdir(parents=True, exist_ok=True)
        projection = {"projection": student.project.state_dict()} if student.project is not None else {}
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), **projection,
                    "epoch": epoch_done, "best": best, "history": json.dumps(history),
                    "rounded": bool(model.layers and model.layers[0].delay is not None
                                    and model.layers[0].delay.rounded), **mid_epoch, **rng},
                   last.with_suffix(".tmp"))
        last.with_suffix(".tmp").replace(last)

    net = torch.nn.parallel.DistributedDataParallel(student) if world > 1 else student
    run_started = last_saved = time.time()
    # Where the steps stand, for a save when Ctrl-C or SIGTERM comes mid-epoch.
    at = {"epoch": start_epoch, "completed": 0, "batches": None, "smoothed": None}

    def run_epoch(epoch: int, batches: TrainingBatches | None, first_step: int, smoothed: list) -> list:
        """Train one epoch's steps from `first_step`, from `batches` or, if None, from batch
        workers' processes; returns the running [loss, accuracy]."""
        nonlocal last_saved
        bar = progress_bar(total=steps_per_epoch, initial=first_step, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                           unit="step", disable=rank != 0, mininterval=0.5 if sys.stderr.isatty() else 60)
        started = time.time()
        if batches is None:
            made = worker_batches(d, cfg, epoch, rank, context_s, steps_per_epoch - first_step, workers)
        with bar:
            for step in range(first_step, steps_per_epoch):
                global_step = epoch * steps_per_epoch + step
                model.set_sigma(global_step / (cfg.sigma_anneal_fraction * total_steps))
                model.set_rounded_delays(global_step >= rounded_from)
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * group["lr_scale"] * lr_factor(global_step, total_steps, cfg.warmup_steps)
                if batches is None:
                    audio, labels, word_free = next(made)
                else:
                    at["batches"] = batches.state()  # an interrupted step is redone from here
                    audio, labels, word_free = batches.batch(cfg.batch_size)
                device_audio, labels = audio.to(device), labels.to(device)
                logits, projected = net(device_audio)
                loss, acc, clip = target_loss(logits, labels, context_steps, cfg.label_smoothing)
                if cfg.window_negatives > 0:
                    loss = loss + cfg.window_negatives * window_negative_loss(
                        logits, word_free.to(device), window_steps, background)
                if distilling:  # the teacher hears the student's own augmented examples
                    heard = max(1, round(cfg.distill_share * len(audio)))
                    embeddings, teacher_logits = teacher.targets(audio[:heard].numpy())
                    representation, logit = distillation_losses(
                        clip, projected, embeddings.to(device), teacher_logits.to(device), teacher_steps,
                        cfg.distill_temperature)
                    loss = loss + cfg.distill_repr * representation + cfg.distill_logits * logit
                if anchors:
                    loss = loss + cfg.anchor_weight * anchor_loss(
                        clip, device_audio, labels, anchors, background, cfg.distill_temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
                optimizer.step()
                model.clamp_positions()
                smoothed = [v if s is None else 0.95 * s + 0.05 * v
                            for s, v in zip(smoothed, (loss.item(), acc.item()))]
                at.update(completed=step + 1, batches=batches and batches.state(), smoothed=smoothed)
                clips_s = (step + 1 - first_step) * cfg.batch_size * world / max(time.time() - started, 1e-9)
                bar.set_postfix_str(f"loss {smoothed[0]:.3f} acc {smoothed[1]:.3f} {clips_s:.0f} clips/s",
                                    refresh=False)
                bar.update()
                # Mid-epoch states hold one process's batches: under DDP or with batch workers
                # only epochs are saved.
                if (rank == 0 and world == 1 and batches is not None and step + 1 < steps_per_epoch
                        and time.time() - last_saved > cfg.checkpoint_minutes * 60):
                    save_run_state(epoch - 1, step + 1, at["batches"], smoothed)
                    last_saved = time.time()
        return smoothed

    try:
        for epoch in range(start_epoch, cfg.epochs):
            first_step, smoothed = 0, [None, None]
            resumed_mid_epoch = epoch == start_epoch and start_step > 0  # saved only when made here
            batches = epoch_batches(d, cfg, epoch, rank, context_s) if resumed_mid_epoch or not workers else None
            if resumed_mid_epoch:
                batches.set_state(saved["batches"])
                first_step, smoothed = start_step, json.loads(saved["smoothed"])
            at.update(epoch=epoch, completed=first_step, in_steps=True)
            model.train()
            smoothed = run_epoch(epoch, batches, first_step, smoothed)
            at["in_steps"] = False
            if rank == 0:
                val = accuracy(model, d["valid"], d["valid_labels"])
                history.append({"epoch": epoch + 1, "train_loss": smoothed[0], "train_accuracy": smoothed[1],
                                "validation_accuracy": val, "sigma": float(model.layers[0].delay.sigma)
                                if model.layers[0].delay is not None else None,
                                "rounded_delays": (epoch + 1) * steps_per_epoch > rounded_from,
                                "seconds": time.time() - run_started})
                log(f"epoch {epoch + 1}: validation accuracy {val:.4f}")
                meta = {"train": asdict(cfg), "history": history, "data_counts": d["counts"],
                        "device": str(device), "world_size": world, "batch_workers": workers,
                        "license": model.license}
                # With a rounded-delay phase, only its epochs may be kept: the saved model must
                # be the one trained on the integer delays inference reads.
                if val > best and (history[-1]["rounded_delays"] or rounded_from >= total_steps):
                    best = val
                    save_model(model, out, meta)
                    log(f"  saved best model to {out}")
                save_run_state(epoch)
                last_saved = time.time()
            if world > 1:
                dist.barrier()
    except KeyboardInterrupt:
        # Inside an epoch's steps, save where they stand; between them, the epoch's save stands.
        if rank == 0 and world == 1 and at.get("in_steps") and at["completed"] > 0 and at["batches"]:
            save_run_state(at["epoch"] - 1, at["completed"], at["batches"], at["smoothed"])
        log(f"interrupted: the run state in {last} continues with --resume")
        raise
    if world > 1:
        dist.destroy_process_group()
    return {"best_validation_accuracy": best, "history": history}


def parse_overrides(items: list[str]) -> dict:
    """--set key=value pairs for ModelConfig fields, typed like the field's default."""
    types = {f.name: type(f.default) for f in fields(ModelConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if key == "clip_context_s":
            raise KwsError("the context before each clip is set with --context-s")
        if not sep or key not in types or key == "labels":
            raise KwsError(f"--set takes KEY=VALUE with KEY a model setting, not {item!r}")
        kind = types[key]
        try:
            out[key] = _BOOLS[value.lower()] if kind is bool else kind(value)
        except (KeyError, ValueError):
            raise KwsError(f"--set {key} takes a {kind.__name__}, not {value!r}") from None
    return out


_BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def progress_bar(**options) -> tqdm:
    """A tqdm bar built with Ctrl-C and SIGTERM held until it is whole, then delivered to their
    own handlers: interrupted half-way, a bar's __del__ prints a traceback over the stop."""
    if threading.current_thread() is not threading.main_thread():  # only it may set handlers
        return tqdm(**options)
    arrived = []
    stops = (signal.SIGINT, signal.SIGTERM)
    handlers = {s: signal.signal(s, lambda signum, frame: arrived.append(signum)) for s in stops}
    try:
        return tqdm(**options)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        for signum in arrived:
            os.kill(os.getpid(), signum)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (a shutdown, a scheduler) saves the run state like Ctrl-C


def run(args):
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)
                         if getattr(args, f.name, None) is not None})
    overrides = parse_overrides(args.set)
    if args.context_s is not None:
        overrides["clip_context_s"] = args.context_s
    # Every setting is checked here, before minutes of loading data.
    if args.init and args.preset is not None:
        raise KwsError("--init trains the model it names: change its settings with --set, not --preset")
    model_config(cfg, overrides, Path(args.init) if args.init else None)
    check_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if args.threads < 0:
        raise KwsError(f"--threads must be 0 (torch's choice) or more, not {args.threads}")
    if args.workers < 0:
        raise KwsError(f"--workers must be 0 (batches made in the training process) or more, not {args.workers}")
    check_writable(Path(args.out), "--out")
    if args.threads:
        torch.set_num_threads(args.threads)
    signal.signal(signal.SIGTERM, _interrupt)
    result = train(cfg, Path(args.data), Path(args.out), Path(args.synth) if args.synth else None,
                   Path(args.run_dir) if args.run_dir else None, args.resume, overrides,
                   Path(args.init) if args.init else None, Path(args.teacher) if args.teacher else None,
                   [Path(a) for a in args.anchor], args.workers)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one answer, not one per process
        print(json.dumps({"best_validation_accuracy": result["best_validation_accuracy"], "out": args.out}))


def run_average(args):
    for path in map(Path, args.checkpoints):
        if path.suffix == ".npz":
            raise KwsError(f"{path} is a model file for listen and serve: average the .pt checkpoints "
                           "it was exported from")
    if Path(args.out).suffix != ".pt":
        raise KwsError(f"--out {args.out}: an average is a PyTorch checkpoint, so name it .pt "
                       "(kws export then writes its .npz)")
    check_writable(Path(args.out), "--out")
    model, meta = average_models(args.checkpoints)
    save_model(model, args.out, meta)
    print(json.dumps({"averaged": len(args.checkpoints), "out": args.out}))


def register(sub):
    p = sub.add_parser("train", help="train an mGRADE keyword model",
                       description="Train an mGRADE model on Speech Commands (and synthetic speech "
                       "with --synth): from scratch, or a fine-tune of a trained model (--init). "
                       "The command and every setting are kept in the checkpoint's metadata; the "
                       "shipped model's recipe is under Training in models/mgrade-edge.md.")
    p.add_argument("--data", required=True, help="Speech Commands folder (official layout)")
    p.add_argument("--synth", help="synthetic speech folder made by `kws data synth`")
    p.add_argument("--out", required=True, help="where to save the best model (of the rounded-delay phase)")
    p.add_argument("--run-dir", help="per-epoch training state for --resume (default: OUT.run/)")
    p.add_argument("--resume", action="store_true", help="continue from the run dir's last epoch")
    p.add_argument("--init", metavar="MODEL", help="start from this model: its weights and settings, its "
                                                   "taps as trained (fine-tuning; --set changes settings)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model setting, e.g. --set use_delay=false")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    p.add_argument("--workers", type=int, default=0, help="processes that make the augmented batches "
                   "(default 0: the training process makes them); a GPU needs several. The same number "
                   "gives the same batches; with workers the run state is saved at each epoch's end")
    p.add_argument("--teacher", metavar="FILE", help="distil from this teacher (kws teacher train; "
                                                     "with --distill-repr and/or --distill-logits)")
    p.add_argument("--anchor", nargs="+", default=[], metavar="MODEL",
                   help="while fine-tuning, keep the word examples' outputs close to this model's, or to "
                        "the average logits of several (with --anchor-weight)")
    p.add_argument("--context-s", type=float, metavar="SECONDS",
                   help="other audio before each training clip, and the silence `classify` puts "
                        "before a clip: one setting, kept in the model (default 0.5)")
    for f in fields(TrainConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None,
                       help=f"{f.metadata['help']} (default {f.default})")
    p.set_defaults(func=run)

    p = sub.add_parser("average", help="average the weights of fine-tunes of one model (a model soup)")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="two or more fine-tunes of one "
                   "model, e.g. `kws train --init M --seed N` for several N (M itself may be one); the "
                   "average runs with the first one's settings (--set ones such as power_floor)")
    p.add_argument("--out", required=True, help="where to save the averaged checkpoint (choose its "
                   "thresholds again: kws eval-stream --choose-thresholds, kws export --thresholds)")
    p.set_defaults(func=run_average)
