"""Training: `kws train --preset edge --data DIR [--synth DIR] --out PATH`.

AdamW (weight decay on matrices only, a higher learning rate for tap positions), warmup then
cosine decay, DCLS sigma annealing, gradient clipping, class-balanced augmented batches, a
checkpoint every epoch, --resume, best-on-validation selection. Runs on a GPU when present and
under `torchrun` (DistributedDataParallel; gloo on CPUs, nccl on GPUs).
"""

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from kws.data import (BACKGROUND, LABELS, TrainingBatches, load_clips, read_noise, read_split,
                      read_synth)
from kws.errors import KwsError
from kws.model import MGRADE, ModelConfig, preset, read_checkpoint, save_model


@dataclass
class TrainConfig:
    preset: str = "edge"
    epochs: int = 16
    examples_per_epoch: int = 16000
    batch_size: int = 64
    lr: float = 3e-3
    position_lr_scale: float = 5.0  # tap positions move in steps, not in weight units
    weight_decay: float = 0.05
    warmup_steps: int = 300
    grad_clip: float = 1.0
    label_smoothing: float = 0.05
    sigma_anneal_fraction: float = 0.8  # sigma reaches its end value here, then holds
    context_s: float = 0.5  # audio before each target clip, so training sees carried state
    background_weight: float = 2.0  # how often background is drawn, against 1 for each word
    speech_negatives: float = 0.0  # share of background examples holding a word's end or tail
    seed: int = 0


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


def target_loss(model, audio, labels, context_steps: int, label_smoothing: float = 0.0):
    """Cross-entropy of the clip readout over the target's steps only (the context is skipped)."""
    logits = model(audio)[:, context_steps:].mean(dim=1)
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    return loss, (logits.argmax(-1) == labels).float().mean()


@torch.no_grad()
def accuracy(model: MGRADE, audio: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(audio), batch_size):
        x = torch.from_numpy(audio[i:i + batch_size]).to(next(model.parameters()).device)
        correct += int((model.classify(x).argmax(-1).cpu().numpy() == labels[i:i + batch_size]).sum())
    return correct / len(audio)


class Progress:
    """A one-line progress bar on stderr: epoch, step, loss, accuracy, clips per second."""

    def __init__(self, epoch: int, epochs: int, steps: int, enabled: bool):
        self.epoch, self.epochs, self.steps, self.enabled = epoch, epochs, steps, enabled
        self.start = time.time()
        self.loss = self.acc = None

    def update(self, step: int, loss: float, acc: float, clips: int):
        self.loss = loss if self.loss is None else 0.95 * self.loss + 0.05 * loss
        self.acc = acc if self.acc is None else 0.95 * self.acc + 0.05 * acc
        if not self.enabled or not (sys.stderr.isatty() or (step + 1) % 50 == 0 or step + 1 == self.steps):
            return
        done = (step + 1) / self.steps
        bar = "#" * int(24 * done) + "-" * (24 - int(24 * done))
        rate = clips / max(time.time() - self.start, 1e-9)
        print(f"\repoch {self.epoch + 1}/{self.epochs} [{bar}] {step + 1}/{self.steps} "
              f"loss {self.loss:.3f} acc {self.acc:.3f} {rate:.0f} clips/s",
              end="" if sys.stderr.isatty() else "\n", file=sys.stderr)

    def close(self):
        if self.enabled and sys.stderr.isatty():
            print(file=sys.stderr)


def distributed() -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun."""
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def epoch_batches(d: dict, cfg: TrainConfig, epoch: int, rank: int = 0) -> TrainingBatches:
    """One epoch's batches. Seeding per epoch and rank makes a resumed run draw the same
    batches as an unbroken one."""
    return TrainingBatches(d["real"], d["real_labels"], d["synth"], d["synth_labels"],
                           d["noise"], len(LABELS), LABELS.index(BACKGROUND),
                           seed=cfg.seed * 100003 + epoch * 101 + rank, context_s=cfg.context_s,
                           background_weight=cfg.background_weight,
                           speech_negatives=cfg.speech_negatives)


def load_training_data(data: Path, synth: Path | None, log) -> dict:
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
        "valid": load_clips(valid), "valid_labels": np.array([index[c.label] for c in valid]),
        "counts": {w: {"real": sum(c.label == w for c in real),
                       "synthetic": sum(c.label == w for c in synth_clips)} for w in LABELS[:-1]},
    }


def model_config(cfg: TrainConfig, overrides: dict | None) -> ModelConfig:
    try:
        return preset(cfg.preset, LABELS, **(overrides or {}))
    except (TypeError, ValueError) as e:
        raise KwsError(f"bad model settings: {e}") from None


def check_budget(cfg: TrainConfig, world: int) -> int:
    """Steps per epoch, or a KwsError when the settings leave nothing to train."""
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise KwsError(f"--epochs and --batch-size must be at least 1, not {cfg.epochs} and {cfg.batch_size}")
    if not 0.0 <= cfg.speech_negatives <= 1.0:
        raise KwsError(f"--speech-negatives is a fraction from 0 to 1, not {cfg.speech_negatives}")
    steps = cfg.examples_per_epoch // (cfg.batch_size * world)
    if steps < 1:
        raise KwsError(f"--examples-per-epoch {cfg.examples_per_epoch} is less than one batch "
                       f"({cfg.batch_size} x {world} processes)")
    return steps


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
          init: Path | None = None, log=print) -> dict:
    model_cfg = model_config(cfg, overrides)  # bad settings fail before minutes of loading
    rank, world = distributed()
    steps_per_epoch = check_budget(cfg, world)
    log = log if rank == 0 else (lambda *a, **k: None)
    device = torch.device(f"cuda:{rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    run_dir = Path(run_dir or out.with_suffix(".run"))
    torch.manual_seed(cfg.seed)

    d = load_training_data(data, synth, log)
    model = MGRADE(model_cfg).to(device)
    if init is not None:  # fine-tune: start from a trained model's weights, not at random
        try:
            model.load_state_dict(read_checkpoint(init)[1])
        except RuntimeError as e:
            raise KwsError(f"--init {init} does not fit these settings ({str(e).splitlines()[0]})") from None
    optimizer = make_optimizer(model, cfg)
    total_steps = steps_per_epoch * cfg.epochs
    context_steps = int(cfg.context_s * 16000) // model_cfg.stride
    history, start_epoch, best = [], 0, -1.0

    last = run_dir / "last.pt"
    if resume:
        saved = read_run_state(last, device)
        try:
            model.load_state_dict(saved["model"])
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
        history = json.loads(saved["history"])
        log(f"resuming after epoch {start_epoch} (best validation accuracy {best:.4f})")

    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    started = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        batches = epoch_batches(d, cfg, epoch, rank)
        model.train()
        progress = Progress(epoch, cfg.epochs, steps_per_epoch, enabled=rank == 0)
        for step in range(steps_per_epoch):
            global_step = epoch * steps_per_epoch + step
            model.set_sigma(global_step / (cfg.sigma_anneal_fraction * total_steps))
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * group["lr_scale"] * lr_factor(global_step, total_steps, cfg.warmup_steps)
            audio, labels = batches.batch(cfg.batch_size)
            loss, acc = target_loss(net, audio.to(device), labels.to(device), context_steps, cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            model.clamp_positions()
            progress.update(step, loss.item(), acc.item(), (step + 1) * cfg.batch_size * world)
        progress.close()

        if rank == 0:
            val = accuracy(model, d["valid"], d["valid_labels"])
            history.append({"epoch": epoch + 1, "train_loss": progress.loss, "train_accuracy": progress.acc,
                            "validation_accuracy": val, "sigma": float(model.layers[0].delay.sigma)
                            if model.layers[0].delay is not None else None,
                            "seconds": time.time() - started})
            log(f"epoch {epoch + 1}: validation accuracy {val:.4f}")
            meta = {"train": asdict(cfg), "history": history, "data_counts": d["counts"],
                    "device": str(device), "world_size": world}
            if val > best:
                best = val
                save_model(model, out, meta)
                log(f"  saved best model to {out}")
            run_dir.mkdir(parents=True, exist_ok=True)
            rng = {"torch_rng": torch.get_rng_state()}
            if device.type == "cuda":
                rng["cuda_rng"] = torch.cuda.get_rng_state(device)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "epoch": epoch, "best": best, "history": json.dumps(history), **rng},
                       last.with_suffix(".tmp"))
            last.with_suffix(".tmp").replace(last)
        if world > 1:
            dist.barrier()
    if world > 1:
        dist.destroy_process_group()
    return {"best_validation_accuracy": best, "history": history}


def parse_overrides(items: list[str]) -> dict:
    """--set key=value pairs for ModelConfig fields, typed like the field's default."""
    types = {f.name: type(f.default) for f in fields(ModelConfig)}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in types or key == "labels":
            raise KwsError(f"--set takes KEY=VALUE with KEY a model setting, not {item!r}")
        kind = types[key]
        try:
            out[key] = _BOOLS[value.lower()] if kind is bool else kind(value)
        except (KeyError, ValueError):
            raise KwsError(f"--set {key} takes a {kind.__name__}, not {value!r}") from None
    return out


_BOOLS = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}


def run(args):
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)
                         if getattr(args, f.name, None) is not None})
    if args.threads:
        torch.set_num_threads(args.threads)
    result = train(cfg, Path(args.data), Path(args.out), Path(args.synth) if args.synth else None,
                   Path(args.run_dir) if args.run_dir else None, args.resume, parse_overrides(args.set),
                   Path(args.init) if args.init else None)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one answer, not one per process
        print(json.dumps({"best_validation_accuracy": result["best_validation_accuracy"], "out": args.out}))


def register(sub):
    p = sub.add_parser("train", help="train an mGRADE keyword model")
    p.add_argument("--data", required=True, help="Speech Commands folder (official layout)")
    p.add_argument("--synth", help="synthetic speech folder made by `kws data synth`")
    p.add_argument("--out", required=True, help="where to save the best model")
    p.add_argument("--run-dir", help="per-epoch training state for --resume (default: OUT.run/)")
    p.add_argument("--resume", action="store_true", help="continue from the run dir's last epoch")
    p.add_argument("--init", metavar="MODEL", help="start from this model's weights (fine-tuning)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a model setting, e.g. --set use_delay=false")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    for f in fields(TrainConfig):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=None,
                       help=f"default {f.default}")
    p.set_defaults(func=run)
