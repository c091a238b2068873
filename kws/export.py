"""`kws export CHECKPOINT OUT`: the torch-free model file that `kws listen`, `kws serve` and
`kws info` load (format: kws.runtime), written from a PyTorch checkpoint.

The export checks itself: the file is read back and must give the checkpoint's `model.stream`
logits on a few seconds of seeded test audio within EXPORT_TOLERANCE."""

import sys

import numpy as np

from kws.errors import KwsError

EXPORT_TOLERANCE = 1e-4  # largest difference allowed between the file's and the model's logits
CHECK_SECONDS = 3.0
CHECK_CHUNK = 512  # 32 ms, as kws listen feeds it


def check_audio(seconds: float = CHECK_SECONDS, seed: int = 0) -> np.ndarray:
    """Seeded noise with tone bursts, so every part of the model is exercised."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    audio = 0.02 * rng.standard_normal(len(t))
    for start in np.arange(0.1, seconds - 0.4, 0.7):
        on = (t >= start) & (t < start + 0.3)
        audio[on] += 0.3 * np.sin(2 * np.pi * rng.uniform(200, 3000) * t[on])
    return audio.astype(np.float32)


def stream_difference(model, engine, audio: np.ndarray, chunk: int = CHECK_CHUNK) -> float:
    """Largest absolute difference between `model.stream` (PyTorch, the whole signal) and the
    engine fed `chunk` samples at a time."""
    import torch

    with torch.inference_mode():
        expected, _ = model.stream(torch.from_numpy(audio)[None], model.primed_state(1))
    state, got = engine.start_state(), []
    for start in range(0, len(audio), chunk):
        logits, state = engine.stream(audio[start:start + chunk], state)
        got.append(logits)
    return float(np.abs(np.concatenate(got) - expected[0].numpy()).max())


def export(checkpoint, out) -> float:
    """Write `out` from `checkpoint`; returns the checked difference in logits."""
    from kws.cli import load
    from kws.runtime import load_engine, save_engine

    model = load(checkpoint)
    save_engine(out, *model.inference_arrays())
    difference = stream_difference(model, load_engine(out), check_audio())
    if not difference <= EXPORT_TOLERANCE:
        raise KwsError(f"the exported file's logits differ from the checkpoint's by {difference:.2g} "
                       f"(more than {EXPORT_TOLERANCE:g}); {out} is not to be used")
    return difference


def run(args):
    difference = export(args.checkpoint, args.out)
    print(f"kws export: wrote {args.out} (logits within {difference:.1e} of the checkpoint's)",
          file=sys.stderr)


def register(sub):
    from kws.cli import COMMANDS

    p = sub.add_parser("export", help=COMMANDS["export"][1],
                       description="Write the torch-free model file of a checkpoint: a NumPy "
                       ".npz of named arrays and a JSON config, read without pickle.")
    p.add_argument("checkpoint", help="PyTorch checkpoint (.pt) from kws train")
    p.add_argument("out", help="model file to write (.npz)")
    p.set_defaults(func=run)
