"""Clip evaluation: `kws eval --data DIR [--split testing] [--json]`.

35-word accuracy, per-word accuracy, the v2 benchmark's 12-class protocol (ten words, the other
25 as unknown, silence cut from the held-out end of the noise recordings), a confusion matrix,
and how much rounding the tap delays to integers changes the model's outputs.
"""

import json
import random
from pathlib import Path

import numpy as np
import torch

from kws.audio import CLIP_SAMPLES, Microphone
from kws.data import load_clips, noise_segment, read_noise, read_split
from kws.labels import BACKGROUND, CORE_WORDS, WELL_COVERED, WORDS
from kws.errors import KwsError
from kws.model import MGRADE, footprint_bytes, parameter_count

UNKNOWN, SILENCE = "_unknown_", "_silence_"
LABELS_12 = CORE_WORDS + (UNKNOWN, SILENCE)


def silence_clips(data, n: int, seed: int = 0) -> np.ndarray:
    """n 1-s cuts of held-out noise, from near silence to loud, as the benchmark's silence."""
    noise = read_noise(data, "testing")
    rng = random.Random(seed)
    out = np.stack([noise_segment(noise, CLIP_SAMPLES, rng) for _ in range(n)])
    gains = np.array([10 ** (rng.uniform(-40, 0) / 20) for _ in range(n)], dtype=np.float32)
    return out * gains[:, None]


@torch.no_grad()
def clip_logits(model: MGRADE, audio: np.ndarray, batch_size: int = 128) -> torch.Tensor:
    return torch.cat([model.classify(torch.from_numpy(audio[i:i + batch_size]))
                      for i in range(0, len(audio), batch_size)])


def to_12(label: str) -> str:
    if label in CORE_WORDS:
        return label
    return SILENCE if label == BACKGROUND else UNKNOWN


def split_audio(data, split: str, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """A split's clips, then held-out noise cuts (about one in 12, the benchmark's silence),
    and the true label of each."""
    clips = read_split(data, split)
    audio = np.concatenate([load_clips(clips), silence_clips(data, max(1, round(len(clips) / 11)), seed)])
    return audio, [c.label for c in clips] + [BACKGROUND] * (len(audio) - len(clips))


def accuracy_report(truth: list[str], predicted: list[str], labels) -> dict:
    """35-word, per-word, well-covered, scarce, 12-class and silence accuracy, the word clips'
    errors by kind (heard as no word, heard as another word), and the confusion."""
    words = [(t, p) for t, p in zip(truth, predicted) if t != BACKGROUND]
    per_word = {}
    for w in WORDS:
        hits = [t == p for t, p in words if t == w]
        per_word[w] = {"accuracy": float(np.mean(hits)) if hits else None, "n": len(hits)}
    well = [t == p for t, p in words if t in WELL_COVERED]
    scarce = [t == p for t, p in words if t not in WELL_COVERED]

    confusion = np.zeros((len(labels), len(labels)), dtype=int)
    for t, p in zip(truth, predicted):
        confusion[labels.index(t), labels.index(p)] += 1
    return {
        "clips": len(words),
        "accuracy": float(np.mean([t == p for t, p in words])),
        "accuracy_well_covered": float(np.mean(well)) if well else None,
        "accuracy_scarce": float(np.mean(scarce)) if scarce else None,
        "accuracy_12": float(np.mean([to_12(t) == to_12(p) for t, p in zip(truth, predicted)])),
        # The two ways a word clip is missed: a model trained to keep streams quiet leans to the
        # first, one trained on words alone to the second (the model card has both).
        "words_as_background": sum(p == BACKGROUND for _, p in words),
        "words_as_other_words": sum(p not in (t, BACKGROUND) for t, p in words),
        "silence_clips": len(truth) - len(words),
        "silence_accuracy": float(np.mean([p == BACKGROUND for t, p in zip(truth, predicted) if t == BACKGROUND])),
        "per_word": per_word,
        "confusion": confusion.tolist(),
    }


def evaluate(model: "MGRADE | list[MGRADE]", data, split: str = "testing", seed: int = 0,
             rounding: bool = True, mic: Microphone = Microphone()) -> dict:
    """The report of one model, or of several as an ensemble: the average of their logits (what
    `kws train --anchor` with several models learns from), on the clips as `mic` records them.
    The Gaussian-taps comparison (`rounding`) is one model's."""
    models = model if isinstance(model, list) else [model]
    labels = models[0].cfg.labels
    missing = [w for w in WORDS + (BACKGROUND,) if w not in labels]
    if missing:
        raise KwsError(f"the model does not know these labels: {', '.join(missing)}")
    if any(m.cfg.labels != labels for m in models[1:]):
        raise KwsError("an ensemble's models must read the same labels in the same order")
    audio, truth = split_audio(data, split, seed)
    audio = mic.record(audio)
    for m in models:
        m.eval()
    logits = torch.stack([clip_logits(m, audio) for m in models]).mean(0)
    predicted = [labels[i] for i in logits.argmax(-1).tolist()]
    report = accuracy_report(truth, predicted, labels)
    confusion = report.pop("confusion")
    result = {"split": split, **mic.report(), **report, "models": len(models),
              "parameters": sum(parameter_count(m) for m in models),
              "footprint_bytes": sum(footprint_bytes(m) for m in models), "labels": list(labels),
              "confusion": confusion}
    if rounding and len(models) == 1:
        n = report["clips"]
        result["rounding"] = rounding_effect(models[0], audio[:n], logits[:n], truth[:n])
    return result


def rounding_effect(model: MGRADE, audio: np.ndarray, rounded_logits: torch.Tensor, truth: list[str]) -> dict:
    """Integer delays (what ships) against the trained Gaussian taps, on the same clips."""
    model.set_gaussian_at_inference(True)
    try:
        gaussian = clip_logits(model, audio)
    finally:
        model.set_gaussian_at_inference(False)
    labels = model.cfg.labels
    acc = float(np.mean([labels[i] == t for i, t in zip(gaussian.argmax(-1).tolist(), truth)]))
    return {
        "accuracy_gaussian_taps": acc,
        "max_abs_logit_change": float((gaussian - rounded_logits).abs().max()),
        "mean_abs_logit_change": float((gaussian - rounded_logits).abs().mean()),
        "prediction_agreement": float((gaussian.argmax(-1) == rounded_logits.argmax(-1)).float().mean()),
    }


def pyplot():
    """matplotlib.pyplot on the Agg backend, or a KwsError: matplotlib is an optional extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KwsError("--confusion needs matplotlib, which is not installed: "
                       "pip install 'kws[plots]'") from None
    return plt


def plot_confusion(result: dict, path: Path):
    plt = pyplot()

    counts = np.array(result["confusion"], dtype=float)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(11, 10))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(result["labels"]))
    ax.set_xticks(ticks, result["labels"], rotation=90, fontsize=8)
    ax.set_yticks(ticks, result["labels"], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("spoken")
    ax.set_title(f"{result['split']}: accuracy {result['accuracy']:.3f} over {result['clips']} clips (rows sum to 1)")
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=80, format="png")  # PNG whatever the name ends with
    except OSError as e:
        raise KwsError(f"cannot write the confusion matrix to {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


def print_report(result: dict):
    print(f"{result['split']} split: {result['clips']} word clips, {result['silence_clips']} silence clips"
          + (f", an ensemble of {result['models']} models" if result["models"] > 1 else "")
          + Microphone.of_report(result).describe())
    print(f"  35-word accuracy      {result['accuracy']:.4f}")
    well, scarce = len(WELL_COVERED), len(WORDS) - len(WELL_COVERED)
    print(f"  {well} well-covered words {result['accuracy_well_covered']:.4f}")
    print(f"  {scarce} scarce words       {result['accuracy_scarce']:.4f}")
    print(f"  12-class protocol     {result['accuracy_12']:.4f}")
    print(f"  silence as background {result['silence_accuracy']:.4f}")
    n = result["clips"]
    print(f"  word clips heard as no word {result['words_as_background']} ({result['words_as_background'] / n:.1%}), "
          f"as another word {result['words_as_other_words']} ({result['words_as_other_words'] / n:.1%})")
    if "rounding" in result:
        r = result["rounding"]
        print(f"  Gaussian taps instead of integer delays: accuracy {r['accuracy_gaussian_taps']:.4f}, "
              f"max |logit change| {r['max_abs_logit_change']:.4f}, same prediction {r['prediction_agreement']:.4f}")
    print(f"  parameters {result['parameters']:,}, inference footprint {result['footprint_bytes']:,} bytes")
    print("  per word:")
    for word, r in result["per_word"].items():
        acc = "  n/a " if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        print(f"    {word:>9} {acc} (n={r['n']})")


def run(args):
    from kws.cli import check_writable, load

    if args.confusion:  # say so before the evaluation rather than after it
        pyplot()
        check_writable(Path(args.confusion), "--confusion")
    models = [load(path) for path in args.model] if args.model else [load()]
    result = evaluate(models, args.data, args.split, seed=args.seed, rounding=not args.no_rounding,
                      mic=Microphone(args.gain_db, args.band_hz, args.room_rt60, args.dc_offset))
    if args.confusion:
        plot_confusion(result, Path(args.confusion))
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "confusion" or args.with_confusion}))
    else:
        print_report(result)
        if args.confusion:
            print(f"  confusion matrix: {args.confusion}")


def register(sub):
    from kws.listen import band_hz, dc_offset, gain_db, room_rt60

    p = sub.add_parser("eval", help="clip accuracy on a Speech Commands split")
    p.add_argument("--model", nargs="+", metavar="MODEL",
                   help="PyTorch checkpoint (.pt; default: $KWS_MODEL or the shipped one); several: "
                        "their ensemble (the average of their logits)")
    p.add_argument("--data", required=True, help="Speech Commands folder (official layout)")
    p.add_argument("--split", default="testing", choices=["testing", "validation", "training"],
                   help="which speakers' clips (testing)")
    p.add_argument("--confusion", metavar="PNG",
                   help="write the confusion matrix here (needs matplotlib: pip install 'kws[plots]')")
    p.add_argument("--seed", type=int, default=0, help="seed for the silence clips (0)")
    p.add_argument("--no-rounding", action="store_true", help="skip the Gaussian-taps comparison")
    p.add_argument("--gain-db", type=gain_db, default=0.0, metavar="DB",
                   help="play every clip this many dB louder, or quieter if negative (clipped at "
                        "full scale): how the model copes with a quiet or a hot microphone (0)")
    p.add_argument("--band-hz", type=band_hz, metavar="LOW,HIGH",
                   help="play every clip through a band-pass filter (Butterworth, 4th order each side), "
                        "e.g. 300,3400 (a telephone) or 500,8000 (a small microphone that loses the bass); "
                        "0 as LOW: no bass cut (default: the whole band)")
    p.add_argument("--dc-offset", type=dc_offset, default=0.0, metavar="FRACTION",
                   help="add this offset (a fraction of full scale, e.g. 0.01) to every clip: a "
                        "microphone or ADC that sits off zero (0)")
    p.add_argument("--room-rt60", type=room_rt60, metavar="SECONDS",
                   help="play every clip in a synthetic room whose reverberation falls 60 dB in SECONDS, "
                        "the talker at the critical distance (as much reverberant sound as direct), "
                        "e.g. 0.3 (a furnished living room) or 0.8 (a bare kitchen) (default: as recorded)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--with-confusion", action="store_true", help="include the matrix in --json")
    p.set_defaults(func=run)
