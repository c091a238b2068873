"""The teacher: a frozen pretrained speech embedding and a small classifier over it.

The embedding is Google's speech_embedding (arXiv 2002.01322) as the `openwakeword==0.5.1`
wheel carries it: `melspectrogram.onnx` (32 mel bands, one frame per 10 ms from 512-sample
windows) and `embedding_model.onnx` (96 values from each 76-frame window, windows stepped by 8
frames: one embedding per 80 ms). It was learned from far more speakers than the shared copy
holds, so it hears new voices better than a student trained here alone. It runs only at training
time (`pip install 'kws[distill]'`); nothing at run time needs it.

`kws teacher train` fits the classifier over the 36 labels on the embeddings of the real and
synthetic training clips and of background noise; `kws teacher eval` scores it like `kws eval`.
A clip is heard as the student hears it: 0.5 s of context (silence here) then the 1-s clip, so
1.5 s give 9 embeddings.
"""

import importlib.util
import json
import math
import random
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from kws.audio import CLIP_SAMPLES, SAMPLE_RATE
from kws.data import load_clips, noise_files, noise_segment, read_noise, read_split, read_synth
from kws.labels import BACKGROUND, LABELS
from kws.cli import check_writable
from kws.errors import KwsError

EMBEDDING_DIM = 96
MEL_HOP, MEL_WINDOW = 160, 512  # samples: one mel frame per 10 ms, from 32 ms of audio
FRAMES_PER_EMBEDDING, FRAMES_BETWEEN = 76, 8
CONTEXT_SAMPLES = SAMPLE_RATE // 2  # the student's default context before each clip
TEACHER_FORMAT = "kws-teacher"
# openWakeWord's README puts its pre-trained models under CC BY-NC-SA 4.0; weights distilled from
# them take that licence too (the model card's licence section says why), never the project's.
TEACHER_LICENSE = "CC-BY-NC-SA-4.0"


def _model_files() -> tuple[Path, Path]:
    spec = importlib.util.find_spec("openwakeword")
    if spec is None or not spec.submodule_search_locations:
        raise KwsError("the teacher needs openwakeword 0.5.1 and onnxruntime: pip install 'kws[distill]'")
    folder = Path(spec.submodule_search_locations[0]) / "resources" / "models"
    files = folder / "melspectrogram.onnx", folder / "embedding_model.onnx"
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise KwsError(f"openwakeword in {folder.parent.parent} lacks {', '.join(missing)}: "
                       f"install openwakeword==0.5.1, whose wheel carries them")
    return files


def embedding_count(samples: int) -> int:
    """Embeddings the teacher makes from `samples` samples of audio."""
    frames = (samples - MEL_WINDOW) // MEL_HOP + 1
    return max(0, (frames - FRAMES_PER_EMBEDDING) // FRAMES_BETWEEN + 1)


def embedding_end_sample(k: int) -> int:
    """The last audio sample embedding k has heard: the end of mel frame 8k + 75."""
    last_frame = k * FRAMES_BETWEEN + FRAMES_PER_EMBEDDING - 1
    return last_frame * MEL_HOP + MEL_WINDOW - 1


def aligned_steps(n_embeddings: int, stride: int) -> list[int]:
    """For each embedding, the first student step (of `stride` samples, as MGRADE's front end
    steps: step t has heard samples up to (t + 1) * stride - 1) that has heard all its audio.
    With 10-ms steps embedding k maps to step 8k + 78."""
    return [math.ceil((embedding_end_sample(k) + 1) / stride) - 1 for k in range(n_embeddings)]


class SpeechEmbedding:
    """The frozen embedding: audio (B, L) in [-1, 1] at 16 kHz -> (B, K, 96)."""

    def __init__(self, threads: int = 1):
        try:
            import onnxruntime as ort
        except ImportError:
            raise KwsError("the teacher needs onnxruntime: pip install 'kws[distill]'") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.log_severity_level = 3  # no warnings about unused initialisers on every load
        mel, embedding = _model_files()
        self.mel = ort.InferenceSession(str(mel), options, providers=["CPUExecutionProvider"])
        self.embedding = ort.InferenceSession(str(embedding), options, providers=["CPUExecutionProvider"])

    def __call__(self, audio: np.ndarray, batch_size: int = 64) -> np.ndarray:
        audio = np.asarray(audio, np.float32)
        return np.concatenate([self._embed(audio[i:i + batch_size]) for i in range(0, len(audio), batch_size)])

    def _embed(self, audio: np.ndarray) -> np.ndarray:
        # openWakeWord feeds int16-scaled samples and rescales the log-mel by x / 10 + 2.
        mel = self.mel.run(None, {"input": audio * 32767})[0][:, 0] / 10 + 2  # (B, frames, 32)
        windows = np.lib.stride_tricks.sliding_window_view(mel, FRAMES_PER_EMBEDDING, axis=1)
        windows = windows[:, ::FRAMES_BETWEEN].transpose(0, 1, 3, 2)  # (B, K, 76, 32)
        b, k = windows.shape[:2]
        out = self.embedding.run(None, {"input_1": np.ascontiguousarray(windows, np.float32).reshape(
            b * k, FRAMES_PER_EMBEDDING, 32, 1)})[0]
        return out.reshape(b, k, EMBEDDING_DIM)


class TeacherHead(nn.Module):
    """Standardised embeddings (B, K, 96) -> logits (B, n_classes): one hidden layer."""

    def __init__(self, n_embeddings: int, n_classes: int, hidden: int = 256, dropout: float = 0.3):
        super().__init__()
        self.n_embeddings = n_embeddings
        self.register_buffer("mean", torch.zeros(EMBEDDING_DIM))
        self.register_buffer("std", torch.ones(EMBEDDING_DIM))
        self.net = nn.Sequential(nn.Flatten(), nn.Dropout(dropout),
                                 nn.Linear(n_embeddings * EMBEDDING_DIM, hidden), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, n_classes))

    def standardise(self, embeddings: torch.Tensor) -> torch.Tensor:
        return (embeddings - self.mean) / self.std

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.net(self.standardise(embeddings))


class Teacher:
    """The embedding and a trained head: what distillation asks for on each example."""

    def __init__(self, head: TeacherHead, meta: dict, threads: int = 1):
        self.head, self.meta = head.eval(), meta
        self.embed = SpeechEmbedding(threads)

    @torch.no_grad()
    def targets(self, audio: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(standardised embeddings (B, K, 96), logits (B, 36)) of 1.5-s examples."""
        e = torch.from_numpy(self.embed(audio))
        return self.head.standardise(e), self.head(e)


def save_teacher(head: TeacherHead, path: Path, meta: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": TEACHER_FORMAT, "n_embeddings": head.n_embeddings,
                "labels": list(LABELS), "meta": json.dumps(meta),
                "state_dict": {k: v.detach().cpu() for k, v in head.state_dict().items()}}, path)


def load_teacher(path, threads: int = 1) -> Teacher:
    path = Path(path)
    if not path.is_file():
        raise KwsError(f"no teacher file at {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        assert payload["format"] == TEACHER_FORMAT and tuple(payload["labels"]) == LABELS
        head = TeacherHead(payload["n_embeddings"], len(LABELS))
        head.load_state_dict(payload["state_dict"])
    except Exception:
        raise KwsError(f"{path} is not a kws teacher for these labels (make one with kws teacher train)") from None
    return Teacher(head, json.loads(payload["meta"]), threads)


# ----------------------------------------------------------------------------- training the head

def with_context(clips: np.ndarray) -> np.ndarray:
    """1-s clips -> 1.5-s examples: 0.5 s of silence first, as the student's examples start."""
    return np.pad(clips, ((0, 0), (CONTEXT_SAMPLES, 0)))


def background_examples(data, split: str, n: int, seed: int) -> np.ndarray:
    """n 1.5-s cuts of a split's noise, from near silence to loud; every other one starts with
    0.5 s of silence, as a clip of noise does when `classify` primes it with silence."""
    noise, rng = read_noise(data, split), random.Random(seed)
    out = np.stack([noise_segment(noise, CONTEXT_SAMPLES + CLIP_SAMPLES, rng) for _ in range(n)])
    out[1::2, :CONTEXT_SAMPLES] = 0
    return out * np.array([10 ** (rng.uniform(-60, 0) / 20) for _ in range(n)], np.float32)[:, None]


def cached_embeddings(embed: SpeechEmbedding, name: str, cache: Path | None, make_audio, log,
                      made_from) -> np.ndarray:
    """The embeddings of `make_audio()`, kept in `cache` under `name` and a fingerprint of
    `made_from` (what the audio is made of: clip paths, seeds), so another dataset, synthetic set
    or seed never reads embeddings cached for this one."""
    fingerprint = zlib.crc32(json.dumps(made_from, default=str).encode())
    path = cache / f"{name}-{fingerprint:08x}.npy" if cache else None
    if path and path.is_file():
        return np.load(path)
    start = time.time()
    audio = make_audio()
    e = embed(audio).astype(np.float32)
    log(f"embedded {len(audio)} {name} examples in {time.time() - start:.0f} s "
        f"({len(audio) / max(time.time() - start, 1e-9):.1f} clips/s)")
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, e)
    return e


def split_embeddings(embed, data, split: str, cache, log, seed: int = 0):
    clips = read_split(data, split)
    labels = [LABELS.index(c.label) for c in clips]
    n_background = max(1, round(len(clips) / 11))
    e = cached_embeddings(embed, f"{split}", cache, lambda: with_context(load_clips(clips)), log,
                          [c.path for c in clips])
    b = cached_embeddings(embed, f"{split}-background", cache,
                          lambda: background_examples(data, split, n_background, seed), log,
                          [str(Path(data).resolve()), split, n_background, seed])
    return np.concatenate([e, b]), np.array(labels + [LABELS.index(BACKGROUND)] * len(b))


def train_head(x: np.ndarray, y: np.ndarray, epochs: int = 60, seed: int = 0, log=print) -> TeacherHead:
    """Adam on the embeddings, each word weighted equally (scarce words have few real clips)."""
    torch.manual_seed(seed)
    head = TeacherHead(x.shape[1], len(LABELS))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    head.mean.copy_(xt.mean(dim=(0, 1)))
    head.std.copy_(xt.std(dim=(0, 1)) + 1e-3)
    counts = torch.bincount(yt, minlength=len(LABELS)).float()
    weights = torch.where(counts > 0, 1 / counts.clamp(min=1), torch.zeros_like(counts))
    weights = weights / weights[counts > 0].mean()
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(x) / 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=epochs * steps_per_epoch)
    for epoch in range(epochs):
        head.train()
        order = torch.randperm(len(x))
        total = 0.0
        for i in range(0, len(x), 128):
            idx = order[i:i + 128]
            loss = F.cross_entropy(head(xt[idx]), yt[idx], weight=weights, label_smoothing=0.05)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
        if (epoch + 1) % 10 == 0:
            log(f"teacher epoch {epoch + 1}: loss {total / len(x):.3f}")
    return head.eval()


def train_teacher(data, synth, out: Path, cache: Path | None = None, epochs: int = 60, seed: int = 0,
                  threads: int = 1, log=print) -> dict:
    embed = SpeechEmbedding(threads)
    x, y = split_embeddings(embed, data, "training", cache, log, seed)
    sources = {"real": int((y != LABELS.index(BACKGROUND)).sum()), "background": int((y == LABELS.index(BACKGROUND)).sum())}
    if synth:
        clips = read_synth(synth)
        xs = cached_embeddings(embed, "synth", cache, lambda: with_context(load_clips(clips)), log,
                               [c.path for c in clips])
        x, y = np.concatenate([x, xs]), np.concatenate([y, [LABELS.index(c.label) for c in clips]])
        sources["synthetic"] = len(clips)
    head = train_head(x, y, epochs, seed, log)
    vx, vy = split_embeddings(embed, data, "validation", cache, log, seed)
    with torch.no_grad():
        val = float((head(torch.from_numpy(vx)).argmax(-1).numpy() == vy).mean())
    meta = {"examples": sources, "epochs": epochs, "seed": seed, "validation_accuracy_with_background": val,
            "embedding": "openwakeword 0.5.1 melspectrogram.onnx + embedding_model.onnx"}
    save_teacher(head, out, meta)
    log(f"validation accuracy {val:.4f} (36 labels, background cuts included); saved {out}")
    return meta


# ----------------------------------------------------------------------------- evaluation

class TeacherClassifier:
    """The teacher behind `classify` and `cfg.labels`, as kws.evaluate reads a model."""

    def __init__(self, teacher: Teacher):
        self.teacher = teacher

    @torch.no_grad()
    def classify(self, audio: torch.Tensor) -> torch.Tensor:
        return self.teacher.targets(with_context(audio.numpy()))[1]


def teacher_command(args):
    torch.set_num_threads(args.threads)
    if args.action == "train":
        if not args.out:
            raise KwsError("kws teacher train needs --out FILE")
        # Everything the run needs is checked before the embedding, which takes minutes.
        _model_files()
        check_writable(Path(args.out), "--out")
        noise_files(args.data)  # both splits cut the same recordings
        train_teacher(Path(args.data), Path(args.synth) if args.synth else None, Path(args.out),
                      Path(args.cache) if args.cache else None, args.epochs, args.seed, args.threads)
        return
    from kws.evaluate import accuracy_report, split_audio

    if not args.teacher:
        raise KwsError("kws teacher eval needs --teacher FILE")
    teacher = load_teacher(args.teacher, args.threads)
    audio, truth = split_audio(args.data, args.split)
    with torch.no_grad():
        logits = TeacherClassifier(teacher).classify(torch.from_numpy(audio))
    result = accuracy_report(truth, [LABELS[i] for i in logits.argmax(-1).tolist()], LABELS)
    result["split"] = args.split
    print(json.dumps({k: v for k, v in result.items() if k != "confusion"}))


def register(sub):
    from kws.listen import positive

    p = sub.add_parser(
        "teacher", help="the distillation teacher: train it or score it (kws[distill])",
        description="The teacher for kws train --teacher: openWakeWord's frozen speech embedding "
                    "(shipped in openwakeword 0.5.1's wheel) and a small classifier over the 36 "
                    "labels. `kws teacher train --data D [--synth S] --out T.pt` trains the "
                    "classifier; `kws teacher eval --data D --teacher T.pt` scores it on a split "
                    "(one JSON line). Needs pip install 'kws[distill]'.")
    p.add_argument("action", choices=("train", "eval"), metavar="ACTION",
                   help="train: fit the classifier and save the teacher; eval: its clip accuracy")
    p.add_argument("--data", required=True, help="Speech Commands folder (official layout)")
    p.add_argument("--synth", help="train: synthetic clips made by kws data synth, added to the real ones")
    p.add_argument("--out", metavar="FILE", help="train: where to save the teacher (required for train)")
    p.add_argument("--teacher", metavar="FILE", help="eval: the teacher file (required for eval)")
    p.add_argument("--split", default="testing", choices=("training", "validation", "testing"),
                   help="eval: the split scored (default testing)")
    p.add_argument("--cache", metavar="DIR", help="train: folder that keeps the clips' embeddings "
                   "between runs (computing them is most of the time)")
    p.add_argument("--epochs", type=positive(int), default=60, help="train: epochs of the classifier (default 60)")
    p.add_argument("--seed", type=int, default=0, help="train: seed of the classifier and the background cuts "
                   "(default 0)")
    p.add_argument("--threads", type=positive(int), default=1, help="torch and onnxruntime CPU threads (default 1)")
    p.set_defaults(func=teacher_command)
