"""/predict's work: decode and check an upload and, for a long clip, run the streaming detector
over it (both in worker threads), and build the answer around the clip's logits (from the
batcher). The model is only read; every call builds its own stream state."""

import io
import time

import numpy as np

from kws.audio import (CLIP_SAMPLES, SAMPLE_RATE, TRUNCATED_WAV, AudioError, decode, resample,
                       wav_is_truncated)
from kws.stream import detect

from app.schemas import Detection, Prediction, Score

DETECT_ABOVE_S = 1.5  # longer clips also get streaming detections
TOP_K = 5


def check_duration(seconds: float, min_s: float, max_s: float):
    if seconds < min_s:
        raise AudioError(f"audio is {seconds:.3f} s long; at least {min_s:g} s is needed")
    if seconds > max_s:
        raise AudioError(f"audio is {seconds:.1f} s long; the limit is {max_s:g} s")


def top_scores(logits: np.ndarray, labels, k: int = TOP_K) -> list[Score]:
    z = np.asarray(logits, dtype=np.float64)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    best = np.argsort(-probs, kind="stable")[:k]
    return [Score(label=labels[i], score=float(probs[i])) for i in best]


def decode_upload(data: bytes, min_s: float, max_s: float) -> tuple[np.ndarray, int]:
    """(float32 mono 16-kHz samples, the upload's sample rate), or AudioError saying why the
    upload cannot be used. Decoding is bounded by the header's rate and channels and by `max_s`
    (kws.audio.decode), so a small file that declares hours of audio costs nothing."""
    if wav_is_truncated(io.BytesIO(data)):
        raise AudioError(TRUNCATED_WAV)
    audio, sample_rate = decode(data, max_seconds=max_s)
    check_duration(len(audio) / sample_rate, min_s, max_s)
    return resample(audio, sample_rate, SAMPLE_RATE), sample_rate


def clip_for_classifier(audio: np.ndarray) -> np.ndarray:
    """The clip without its DC offset (its mean: a microphone's offset, which the streaming
    detector removes too, kws.audio.DcBlocker); one shorter than the 1-s training length is
    padded with silence at the end."""
    audio = audio - audio.mean()
    return np.pad(audio, (0, max(0, CLIP_SAMPLES - len(audio))))


def streaming_detections(engine, audio: np.ndarray, threshold=None,
                         words=None) -> list[Detection]:
    """A long clip's detections by the streaming path of `kws listen` (flushed at the end)."""
    # Chunking does not change what the detector finds; 1-s chunks keep the overhead low.
    found = detect(engine, audio, chunk_samples=SAMPLE_RATE, threshold=threshold, words=words)
    return [Detection(time_s=d.time_s, label=d.label, score=d.score) for d in found]


def prediction(labels, logits: np.ndarray, audio: np.ndarray, sample_rate: int,
               detections: list[Detection] | None, started: float) -> Prediction:
    if not np.isfinite(logits).all():  # never an answer of NaN scores, whatever the audio
        raise AudioError("the model's output for this audio is not finite")
    top = top_scores(logits, labels)
    return Prediction(label=top[0].label, score=top[0].score, top=top,
                      duration_s=len(audio) / SAMPLE_RATE, sample_rate=sample_rate,
                      latency_ms=(time.perf_counter() - started) * 1000, detections=detections)
