"""Audio constants and decoding: every path into kws reads audio through here."""

import io
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from kws.errors import KwsError

SAMPLE_RATE = 16000  # Speech Commands is 16 kHz; the model sees nothing else
CLIP_SECONDS = 1.0
CLIP_SAMPLES = int(SAMPLE_RATE * CLIP_SECONDS)


class AudioError(KwsError):
    """Audio that cannot be used: unreadable, empty or not finite."""


def to_mono(audio: np.ndarray) -> np.ndarray:
    """(frames,) or (frames, channels) -> (frames,) float32, channels averaged."""
    audio = np.asarray(audio, dtype=np.float32)
    return audio.mean(axis=1) if audio.ndim == 2 else audio


def resample(audio: np.ndarray, orig_sr: int, new_sr: int = SAMPLE_RATE) -> np.ndarray:
    if orig_sr == new_sr:
        return audio
    out = AF.resample(torch.from_numpy(np.ascontiguousarray(audio)), orig_sr, new_sr)
    return out.numpy()


def decode(source: "str | Path | bytes | io.IOBase") -> tuple[np.ndarray, int]:
    """Decode WAV/FLAC/OGG/MP3 with soundfile: (mono float32 samples, original rate)."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        audio, sr = sf.read(source, dtype="float32", always_2d=False)
    except sf.LibsndfileError as e:
        # str(e) names the source by repr: a path is worth keeping, "<_io.BytesIO object at
        # 0x...>" is not, so in-memory audio gets libsndfile's own message alone.
        reason = str(e) if isinstance(source, (str, Path)) else e.error_string
        raise AudioError(f"cannot decode audio: {reason}") from None
    except (RuntimeError, TypeError, ValueError) as e:
        raise AudioError(f"cannot decode audio: {e}") from None
    audio = to_mono(audio)
    if audio.size == 0:
        raise AudioError("audio has no samples")
    if not np.isfinite(audio).all():
        raise AudioError("audio contains NaN or infinite samples")
    return audio, int(sr)


def load_audio(source: "str | Path | bytes | io.IOBase", sr: int = SAMPLE_RATE) -> np.ndarray:
    """Decode, mix to mono and resample to `sr` (16 kHz by default)."""
    audio, orig_sr = decode(source)
    return resample(audio, orig_sr, sr)


def fit_length(audio: np.ndarray, length: int = CLIP_SAMPLES) -> np.ndarray:
    """Zero-pad at the end or trim to exactly `length` samples."""
    if len(audio) >= length:
        return audio[:length]
    return np.pad(audio, (0, length - len(audio)))
