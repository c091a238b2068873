"""/predict's work: decode and check an upload and, for a long clip, run the streaming detector
over it (both in worker threads), and build the answer around the clip's logits (from the
batcher). The model is only read; every call builds its own stream state."""

import math
import struct
import time

import numpy as np

from kws.audio import CLIP_SAMPLES, SAMPLE_RATE, AudioError, decode, resample
from kws.stream import detect

from app.schemas import Detection, Prediction, Score

DETECT_ABOVE_S = 1.5  # longer clips also get streaming detections
TOP_K = 5
MAX_RESAMPLE_RATIO = 1_000_000  # 44.1 kHz -> 16 kHz is 441 x 160 = 70,560


def check_sample_rate(rate: int):
    """Resampling builds a (16000/g) x (rate/g) filter bank, g = gcd(rate, 16000): an odd rate
    such as 96001 Hz would need gigabytes, so only rates with a small common ratio are taken."""
    g = math.gcd(rate, SAMPLE_RATE)
    if rate <= 0 or (rate // g) * (SAMPLE_RATE // g) > MAX_RESAMPLE_RATIO:
        raise AudioError(f"sample rate {rate} Hz is not supported; use a standard rate "
                         "such as 8000, 16000, 22050, 44100 or 48000 Hz")


# A recorder writing a WAV to a pipe cannot go back to write the length: it leaves a placeholder
# near 2**31 or 2**32 (0x7FFFF000, 0x7FFFFFFF, 0xFFFFFFFF), never a length an upload could hold.
STREAMED_WAV_SIZE = 0x7FFFF000


def wav_is_truncated(data: bytes) -> bool:
    """A WAV whose data chunk holds fewer bytes than its header says. libsndfile quietly reads
    what is there, so a cut-off upload would otherwise pass as a shorter clip."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return False
    at = 12
    while at + 8 <= len(data):
        chunk_id, size = data[at:at + 4], struct.unpack("<I", data[at + 4:at + 8])[0]
        if chunk_id == b"data":
            return size < STREAMED_WAV_SIZE and at + 8 + size > len(data)
        at += 8 + size + (size & 1)  # chunks are word-aligned
    return True  # the header ends before the data chunk starts


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
    if wav_is_truncated(data):
        raise AudioError("the WAV file is truncated: it holds less audio than its header says")
    audio, sample_rate = decode(data, max_seconds=max_s)
    check_sample_rate(sample_rate)
    check_duration(len(audio) / sample_rate, min_s, max_s)
    return resample(audio, sample_rate, SAMPLE_RATE), sample_rate


def clip_for_classifier(audio: np.ndarray) -> np.ndarray:
    """Clips shorter than the 1-s training length are padded with silence at the end."""
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
