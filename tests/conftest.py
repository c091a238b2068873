"""Shared fixtures: a tiny Speech Commands-layout dataset made of seeded synthetic sounds, and
tiny model checkpoints. Everything is generated in temporary folders; nothing is committed."""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from kws.data import NOISE_DIR
from kws.labels import LABELS, WORDS
from kws.model import MGRADE, preset, save_model

SR = 16000
# Clips per word in (training, validation, testing). "marvin" is the scarce word.
CLIP_COUNTS = {
    "yes": (6, 1, 2),
    "no": (6, 1, 2),
    "up": (3, 1, 1),
    "bed": (3, 1, 1),
    "marvin": (1, 1, 1),
}
# A model small enough that a training step takes milliseconds.
TINY_MODEL = dict(n_layers=1, width=8, frontend_filters=8, delay_window=4, n_taps=2)


@dataclass
class SpeechCommandsFixture:
    root: Path
    splits: dict = field(default_factory=lambda: {"training": [], "validation": [], "testing": []})
    lengths: dict = field(default_factory=dict)  # relative path -> samples written
    noise: list = field(default_factory=list)  # noise file paths

    def labels(self, split: str) -> list[str]:
        return [p.split("/")[0] for p in self.splits[split]]


def word_sound(word: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """A tone whose pitch depends on the word, under a smooth envelope, with a little noise."""
    t = np.arange(n) / SR
    f0 = 200 + 60 * WORDS.index(word) + rng.uniform(-10, 10)
    tone = np.sin(2 * np.pi * f0 * t) + 0.3 * np.sin(2 * np.pi * 2 * f0 * t + rng.uniform(0, 6))
    envelope = np.sin(np.pi * np.arange(n) / n) ** 2
    return (0.3 * tone * envelope + rng.normal(0, 0.01, n)).astype(np.float32)


def write_speech_commands(root: Path, counts=CLIP_COUNTS, seed: int = 0,
                          all_word_folders: bool = True) -> SpeechCommandsFixture:
    """The official layout: word folders, _background_noise_, validation and testing lists.
    Clips alternate WAV and FLAC and run 0.6-1.3 s, so loading must pad and trim."""
    rng = np.random.default_rng(seed)
    fx = SpeechCommandsFixture(Path(root))
    for word in WORDS if all_word_folders else counts:
        (fx.root / word).mkdir(parents=True, exist_ok=True)
    speaker = 0
    for word, per_split in counts.items():
        for split, n in zip(("training", "validation", "testing"), per_split):
            for _ in range(n):
                speaker += 1
                suffix = ".wav" if speaker % 2 else ".flac"
                rel = f"{word}/{speaker:08x}_nohash_0{suffix}"
                samples = int(rng.integers(int(0.6 * SR), int(1.3 * SR)))
                sf.write(fx.root / rel, word_sound(word, samples, rng), SR, subtype="PCM_16")
                fx.splits[split].append(rel)
                fx.lengths[rel] = samples
    for name in ("validation", "testing"):
        (fx.root / f"{name}_list.txt").write_text("".join(f"{p}\n" for p in fx.splits[name]))
    noise_dir = fx.root / NOISE_DIR
    noise_dir.mkdir()
    # Float WAV keeps every sample exact; FLAC is 16-bit like the official copy.
    fx.noise = [noise_dir / "white_noise.wav", noise_dir / "hum.flac"]
    sf.write(fx.noise[0], rng.uniform(-0.5, 0.5, 3 * SR).astype(np.float32), SR, subtype="FLOAT")
    hum = 0.2 * np.sin(2 * np.pi * 50 * np.arange(2 * SR) / SR) + rng.normal(0, 0.05, 2 * SR)
    sf.write(fx.noise[1], hum.astype(np.float32), SR, subtype="PCM_16")
    return fx


@pytest.fixture(scope="session")
def speech_commands(tmp_path_factory) -> SpeechCommandsFixture:
    """A shared read-only tiny dataset; tests that change files make their own."""
    return write_speech_commands(tmp_path_factory.mktemp("speech_commands"))


@pytest.fixture
def make_speech_commands(tmp_path):
    """Factory for a dataset a test may modify: make_speech_commands(counts=..., seed=...)."""
    made = []

    def make(**kwargs) -> SpeechCommandsFixture:
        fx = write_speech_commands(tmp_path / f"speech_commands_{len(made)}", **kwargs)
        made.append(fx)
        return fx

    return make


def tiny_model(seed: int = 0, **overrides) -> MGRADE:
    torch.manual_seed(seed)
    return MGRADE(preset("edge", LABELS, **{**TINY_MODEL, **overrides})).eval()


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny.pt"
    save_model(tiny_model(), path)
    return path


@pytest.fixture
def constant_model_path(tmp_path):
    """Factory: a checkpoint whose clip prediction is always `label` (zero decoder weights)."""

    def make(label: str) -> Path:
        model = tiny_model()
        with torch.no_grad():
            model.decoder.weight.zero_()
            model.decoder.bias.copy_(torch.nn.functional.one_hot(
                torch.tensor(LABELS.index(label)), len(LABELS)).float() * 10)
        path = tmp_path / f"always_{label}.pt"
        save_model(model, path)
        return path

    return make


@pytest.fixture(scope="session")
def tiny_edge_model_path(tmp_path_factory) -> Path:
    """A tiny model with the edge preset's front end and delay window (bench, listen, eval-stream)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "tiny-edge.pt"
    save_model(MGRADE(preset("edge", LABELS, n_layers=1, width=8)), path)
    return path


def noisy_bursts(seconds: float, seed: int) -> np.ndarray:
    """Noise with loud tonal bursts, so a random model's scores move around."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    audio = 0.01 * rng.standard_normal(len(t))
    for start in rng.uniform(0, seconds - 0.5, size=int(seconds / 2)):
        on = (t >= start) & (t < start + 0.4)
        audio[on] += 0.3 * np.sin(2 * np.pi * rng.uniform(200, 3000) * t[on])
    return audio.astype(np.float32)
