"""Audio constants and decoding (every path into kws reads audio through here), and what
another microphone would have recorded: louder or quieter, through a narrower band, in a room."""

import io
import math
import struct
from collections.abc import Iterator
from typing import BinaryIO
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

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


RESAMPLE_QUALITY = "HQ"  # libsoxr's high quality: 20-bit precision, flat to 0.95 of Nyquist


def resample(audio: np.ndarray, orig_sr: int, new_sr: int = SAMPLE_RATE) -> np.ndarray:
    """The whole signal at `new_sr` (libsoxr, as the streaming Resampler of kws.listen)."""
    if orig_sr == new_sr:
        return audio
    return soxr.resample(np.asarray(audio, dtype=np.float32), orig_sr, new_sr, quality=RESAMPLE_QUALITY)


# Bounds checked on the header, before anything is decoded: a few hundred bytes of FLAC can
# declare hours of 8-channel audio at 640 kHz. 192 kHz is the highest rate of common hardware.
MIN_RATE, MAX_RATE = 4000, 192_000
MAX_CHANNELS = 8
BLOCK_FRAMES = 16384  # decoded and mixed down at a time: the most multichannel audio held
UNKNOWN_FRAMES = 2**62  # libsndfile reports about 2**63 frames when the header does not say


def decode(source: "str | Path | bytes | io.IOBase",
           max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decode WAV/FLAC/OGG/MP3 with soundfile: (mono float32 samples, original rate).

    The header's rate and channels are checked first, then the audio is decoded and mixed down
    in blocks, so memory holds one mono signal and one block whatever the file. With
    `max_seconds`, a longer file is refused from its header, or, when the header does not know
    the length (FLAC or WAV written to a pipe), as soon as the decoded audio passes the limit.
    Samples beyond full scale (float files may hold any value) are clipped to [-1, 1]."""
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        with sf.SoundFile(source) as f:
            rate, channels, frames = f.samplerate, f.channels, f.frames
            check_header(rate, channels)
            limit = None if max_seconds is None else math.floor(max_seconds * rate)
            if limit is not None and frames < UNKNOWN_FRAMES and frames > limit:
                raise AudioError(f"audio is {frames / rate:.1f} s long; the limit is {max_seconds:g} s")
            audio = _read_mono(f, limit, max_seconds)
    except sf.LibsndfileError as e:
        # str(e) names the source by repr: a path is worth keeping, "<_io.BytesIO object at
        # 0x...>" is not, so in-memory audio gets libsndfile's own message alone.
        reason = str(e) if isinstance(source, (str, Path)) else e.error_string
        raise AudioError(f"cannot decode audio: {reason}") from None
    except (RuntimeError, TypeError, ValueError) as e:
        raise AudioError(f"cannot decode audio: {e}") from None
    if audio.size == 0:
        raise AudioError("audio has no samples")
    return audio, int(rate)


def check_header(rate: int, channels: int):
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"sample rate {rate} Hz is not supported: it must be between "
                         f"{MIN_RATE} and {MAX_RATE} Hz")
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(f"audio has {channels} channels; at most {MAX_CHANNELS} are supported")


def _read_mono(f: sf.SoundFile, limit: int | None, max_seconds: float | None) -> np.ndarray:
    known = f.frames < UNKNOWN_FRAMES
    # A known length is filled in place; an unknown one is gathered block by block.
    out, blocks, frames = (np.empty(f.frames, np.float32) if known else None), [], 0
    for mono in mono_blocks(f):
        read = len(mono)
        if out is not None and frames + read > len(out):  # more than declared (MP3 estimates)
            out, blocks = None, [out[:frames]]
        if out is not None:
            out[frames:frames + read] = mono
        else:
            blocks.append(mono)
        frames += read
        if limit is not None and frames > limit:
            raise AudioError(f"audio is longer than the limit of {max_seconds:g} s")
    if out is not None:
        return out[:frames]
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)


def mono_blocks(f: sf.SoundFile, block_frames: int = BLOCK_FRAMES) -> Iterator[np.ndarray]:
    """The audio of an open sound file as mono float32 blocks of up to `block_frames`, clipped
    to full scale (float files may hold any value): what `decode` gathers and `kws listen
    --input` plays. AudioError where a sample is NaN or infinite, or where the file cannot be
    decoded on (damaged, or shorter than its header says), after the frames before it."""
    known = f.frames < UNKNOWN_FRAMES
    block = np.empty((block_frames, f.channels), np.float32)
    while True:
        block.fill(np.nan)
        try:
            read = f.buffer_read_into(block, "float32")
        except sf.LibsndfileError as e:
            if known:
                raise AudioError(f"cannot decode audio: {e.error_string}") from None
            # soundfile seeks after every read, and libsndfile cannot seek to the end of a FLAC
            # of unknown length: the last read failed after filling the block. The frames it
            # read are those no longer NaN (FLAC holds integers, never NaN).
            read = int(np.isfinite(block[:, 0]).sum())
        if read == 0:
            return
        got = block[:read]
        finite = np.isfinite(got).all(axis=1)
        if not finite.all():
            first = int(finite.argmin())  # the audio before it is still good to play
            if first:
                yield to_mono(np.clip(got[:first], -1.0, 1.0))
            raise AudioError("audio contains NaN or infinite samples")
        yield to_mono(np.clip(got, -1.0, 1.0))
        if read < block_frames:
            return


# The offset a DcBlocker removes is the mean of the audio so far, and once this much has passed an
# exponential mean with this time constant: then the filter is the first-order DC blocker
# y[n] = R (y[n-1] + x[n] - x[n-1]), R = 1 - 1/(6.25 s of samples), -3 dB at 0.025 Hz, flat above
# 1 Hz. A time constant of 0.6 s raised false alarms on noise by about a sixth on validation
# streams: it also takes away the slow swell below 1 Hz that the model was trained on (see the
# model card, "A microphone off zero").
DC_TIME_CONSTANT_S = 6.25
_DC_SPAN = round(DC_TIME_CONSTANT_S * SAMPLE_RATE)  # samples under the plain mean
_DC_RUN = 1024  # samples per closed-form run: R**-1024 is 1.01, no precision lost
_DC_RATE = 1.0 / _DC_SPAN
_DC_POWERS = (1.0 - _DC_RATE) ** np.arange(1, _DC_RUN + 1)  # R**1 .. R**_DC_RUN, for every run


class DcBlocker:
    """Removes a microphone's DC offset from a stream, chunk by chunk, with two numbers of
    state. Cheap ADCs and MEMS microphones sit 1% of full scale or more off zero, and the
    training clips hardly ever do (mean offset 0.0007). The offset is the mean of the stream so
    far, so a steady one is gone from the first block; after DC_TIME_CONSTANT_S the mean is an
    exponential one, which follows an offset that drifts. The same in any chunking."""

    def __init__(self):
        self._mean = 0.0
        self._seen = 0

    def process(self, samples: np.ndarray) -> np.ndarray:
        x = np.asarray(samples, dtype=np.float64)
        out = np.empty(len(x), np.float32)
        plain = min(len(x), max(0, _DC_SPAN - self._seen))  # samples still under the plain mean
        if plain:
            means = ((self._mean * self._seen + np.cumsum(x[:plain]))
                     / (self._seen + np.arange(1, plain + 1)))
            out[:plain] = x[:plain] - means
            self._mean = float(means[-1])
        for start in range(plain, len(x), _DC_RUN):
            run = x[start:start + _DC_RUN]
            # m[j] = (1 - rate) m[j-1] + rate x[j] = R**j (m[0] + rate sum_{i<=j} R**-i x[i])
            powers = _DC_POWERS[:len(run)]
            means = powers * (self._mean + _DC_RATE * np.cumsum(run / powers))
            out[start:start + len(run)] = run - means
            self._mean = float(means[-1])
        self._seen += len(x)
        return out


# A recorder writing a WAV to a pipe cannot go back to write the length: it leaves a placeholder
# near 2**31 or 2**32 (0x7FFFF000, 0x7FFFFFFF, 0xFFFFFFFF), never a length a file could hold.
STREAMED_WAV_SIZE = 0x7FFFF000
TRUNCATED_WAV = "the WAV file is truncated: it holds less audio than its header says"


def wav_is_truncated(f: BinaryIO) -> bool:
    """Whether the binary file `f` is a WAV whose data chunk holds fewer bytes than its header
    says. libsndfile quietly reads what is there, so a cut-off file would pass as a shorter one."""
    size = f.seek(0, io.SEEK_END)
    f.seek(0)
    head = f.read(12)
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return False
    at = 12
    while at + 8 <= size:
        f.seek(at)
        chunk_id, length = struct.unpack("<4sI", f.read(8))
        if chunk_id == b"data":
            return length < STREAMED_WAV_SIZE and at + 8 + length > size
        at += 8 + length + (length & 1)  # chunks are word-aligned
    return True  # the header ends before the data chunk starts


def load_audio(source: "str | Path | bytes | io.IOBase", sr: int = SAMPLE_RATE) -> np.ndarray:
    """Decode, mix to mono and resample to `sr` (16 kHz by default)."""
    audio, orig_sr = decode(source)
    return resample(audio, orig_sr, sr)


def fit_length(audio: np.ndarray, length: int = CLIP_SAMPLES) -> np.ndarray:
    """Zero-pad at the end or trim to exactly `length` samples."""
    if len(audio) >= length:
        return audio[:length]
    return np.pad(audio, (0, length - len(audio)))


def at_gain(audio: np.ndarray, db: float) -> np.ndarray:
    """`audio` `db` dB louder (negative: quieter), clipped at full scale as a converter clips it:
    what a microphone set higher or lower, or a talker nearer or farther, would have recorded."""
    return np.clip(audio * np.float32(10 ** (db / 20)), -1, 1).astype(np.float32)


FILTER_PAD = 4096  # samples of silence each side: a smooth response's ringing dies out well within


def equalized(audio: np.ndarray, gain_at_hz) -> np.ndarray:
    """`audio` (..., samples) through a zero-phase filter whose amplitude gain at f Hz is
    `gain_at_hz(f)` (f an array from 0 to Nyquist), clipped at full scale: what a microphone with
    that frequency response would have recorded. Padded with silence, so nothing wraps around."""
    audio = np.asarray(audio, dtype=np.float32)
    n = audio.shape[-1]
    size = 1 << (n + 2 * FILTER_PAD - 1).bit_length()
    padded = np.pad(audio, [(0, 0)] * (audio.ndim - 1) + [(FILTER_PAD, FILTER_PAD)])
    spectrum = np.fft.rfft(padded, size) * gain_at_hz(np.fft.rfftfreq(size, 1 / SAMPLE_RATE))
    out = np.fft.irfft(spectrum, size)[..., FILTER_PAD:FILTER_PAD + n]
    return np.clip(out, -1, 1).astype(np.float32)


def band_gain(hz: np.ndarray, low_hz: float = 0.0, high_hz: float | None = None, order: int = 4) -> np.ndarray:
    """The amplitude response of Butterworth high-pass (corner `low_hz`) and low-pass (`high_hz`)
    filters of `order` in series: -3 dB at each corner, then 6 * order dB an octave."""
    gain = np.ones_like(hz, dtype=np.float64)
    if low_hz > 0:
        with np.errstate(divide="ignore"):
            gain /= np.sqrt(1 + (low_hz / np.asarray(hz, dtype=np.float64)) ** (2 * order))
    if high_hz is not None:
        gain /= np.sqrt(1 + (np.asarray(hz, dtype=np.float64) / high_hz) ** (2 * order))
    return gain


def through_band(audio: np.ndarray, low_hz: float, high_hz: float) -> np.ndarray:
    """`audio` as a microphone that hears only `low_hz` to `high_hz` would record it (a
    telephone: 300 to 3,400 Hz; a small laptop microphone loses the bass below a few hundred)."""
    return equalized(audio, lambda hz: band_gain(hz, low_hz, high_hz if high_hz < SAMPLE_RATE / 2 else None))


def synthetic_rir(rt60: float, rng: np.random.Generator, reverberant_db: float | None = None) -> np.ndarray:
    """A room impulse response: the direct sound, then exponentially decaying noise that falls
    60 dB in `rt60` seconds (a diffuse tail, as in Habets' and Lehmann's fast approximations),
    `reverberant_db` louder than the direct sound in all (0: a talker at the critical distance,
    about a metre or two in a living room; None: drawn from -6 to +6 dB)."""
    n = max(2, int(rt60 * SAMPLE_RATE))
    tail = rng.standard_normal(n) * 10 ** (-3 * np.arange(n) / n)
    onset = int(0.002 * SAMPLE_RATE)  # the first reflections arrive a few ms after the direct sound
    tail[:onset] = 0
    if reverberant_db is None:
        reverberant_db = rng.uniform(-6, 6)
    rir = tail * (10 ** (reverberant_db / 20) / (np.sqrt(np.sum(tail ** 2)) + 1e-12))
    rir[0] = 1.0
    return rir


def reverberate(x: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """x (..., samples) heard in the room: convolved with `rir`, cut to its length, each row at
    its original level."""
    n = x.shape[-1]
    size = 1 << (n + len(rir) - 2).bit_length()  # a power of two: several times faster
    wet = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(rir, size), size)[..., :n]
    level = np.sqrt(np.mean(np.square(x, dtype=np.float64), axis=-1, keepdims=True))
    return (wet * (level / (np.sqrt(np.mean(wet ** 2, axis=-1, keepdims=True)) + 1e-12))).astype(np.float32)


ROOM_SEED = 0  # every evaluation in a room of one RT60 hears the same room


@dataclass(frozen=True)
class Microphone:
    """How evaluation plays audio to the model, as another microphone in another place would
    have recorded it: in a room whose reverberation falls 60 dB in `room_rt60_s` seconds (a
    synthetic room, the talker at the critical distance; None: as recorded), then only the band
    `band_hz` (low, high) heard (`through_band`; None: all of it), then `gain_db` louder or
    quieter and clipped at full scale (`at_gain`), then `dc_offset` (a fraction of full scale)
    added, as an ADC that sits off zero, and clipped again. The default changes nothing."""
    gain_db: float = 0.0
    band_hz: tuple[float, float] | None = None
    room_rt60_s: float | None = None
    dc_offset: float = 0.0

    @cached_property
    def room(self) -> np.ndarray | None:
        """The room's impulse response (None: no room)."""
        if self.room_rt60_s is None:
            return None
        return synthetic_rir(self.room_rt60_s, np.random.default_rng(ROOM_SEED), reverberant_db=0.0)

    def record(self, audio: np.ndarray) -> np.ndarray:
        if self.room is not None:
            audio = reverberate(audio, self.room)
        if self.band_hz is not None:
            audio = through_band(audio, *self.band_hz)
        audio = at_gain(audio, self.gain_db)
        if self.dc_offset:
            audio = np.clip(audio + np.float32(self.dc_offset), -1.0, 1.0)
        return audio

    def report(self) -> dict:
        """The JSON keys of a report that say how its audio was played: gain_db, band_hz,
        room_rt60_s, dc_offset."""
        return {"gain_db": self.gain_db, "band_hz": list(self.band_hz) if self.band_hz else None,
                "room_rt60_s": self.room_rt60_s, "dc_offset": self.dc_offset}

    @classmethod
    def of_report(cls, report: dict) -> "Microphone":
        return cls(report["gain_db"], tuple(report["band_hz"]) if report.get("band_hz") else None,
                   report.get("room_rt60_s"), report.get("dc_offset", 0.0))

    def describe(self) -> str:
        """'' for the default, else e.g. ', in a room of RT60 0.5 s, played -20 dB, through
        300-3400 Hz' for a report."""
        return ((f", in a room of RT60 {self.room_rt60_s:g} s" if self.room_rt60_s is not None else "")
                + (f", played {self.gain_db:+g} dB" if self.gain_db else "")
                + (f", through {self.band_hz[0]:g}-{self.band_hz[1]:g} Hz" if self.band_hz else "")
                + (f", {self.dc_offset:+g} of full scale off zero" if self.dc_offset else ""))
