"""Speech Commands v0.02: the dataset reader, augmentation and batches (the label set is in
kws.labels, which needs no torch)."""

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kws.audio import (CLIP_SAMPLES, SAMPLE_RATE, AudioError, at_gain, band_gain, equalized, fit_length, load_audio,
                       reverberate, synthetic_rir)
from kws.errors import KwsError
from kws.labels import WORDS

SPLITS = ("training", "validation", "testing")
AUDIO_SUFFIXES = (".wav", ".flac")
NOISE_DIR = "_background_noise_"
# Each noise recording is cut in time: training uses the start, evaluation the end, so no test
# stream or silence example ever replays noise the model was trained on.
NOISE_TRAIN_FRACTION = 0.8
# A "word tail" speech negative keeps this share of the word's span (see TrainingBatches).
WORD_TAIL_FRACTION = (0.15, 0.5)


class DataError(KwsError):
    pass


@dataclass(frozen=True)
class Clip:
    path: Path
    label: str


def _check_root(root) -> Path:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"no dataset folder at {root}")
    return root


def _word_files(root: Path) -> list[str]:
    """Relative paths 'word/file' of every clip of a known word under root."""
    found = []
    for word in WORDS:
        folder = root / word
        if folder.is_dir():
            found += sorted(f"{word}/{p.name}" for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
    return found


def _read_list(root: Path, name: str) -> set[str]:
    path = root / name
    if not path.is_file():
        return set()
    # One relative path a line; names may hold spaces, and lists may have Windows line ends.
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def read_split(root, split: str) -> list[Clip]:
    """The clips of one split of a Speech Commands layout (official lists; training = the rest)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    root = _check_root(root)
    files = _word_files(root)
    if not files:
        raise DataError(f"{root} holds no clips in word folders (expected e.g. {root}/yes/*.wav)")
    validation = _read_list(root, "validation_list.txt")
    testing = _read_list(root, "testing_list.txt")
    if split == "training":
        chosen = [f for f in files if f not in validation and f not in testing]
    else:
        listed = validation if split == "validation" else testing
        chosen = [f for f in files if f in listed]
    if not chosen:
        raise DataError(f"the {split} split of {root} is empty")
    return [Clip(root / f, f.split("/")[0]) for f in chosen]


def read_synth(root) -> list[Clip]:
    """Every clip of a synthetic set made by `kws data synth` (all of it is training data)."""
    root = _check_root(root)
    files = _word_files(root)
    if not files:
        raise DataError(f"{root} holds no synthetic clips")
    return [Clip(root / f, f.split("/")[0]) for f in files]


def noise_files(root) -> list[Path]:
    """The background noise recordings' files; a DataError when there are none (checked before
    long work, without decoding them)."""
    root = _check_root(root)
    files = sorted(p for p in (root / NOISE_DIR).glob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        raise DataError(f"no noise recordings in {root / NOISE_DIR}")
    return files


def read_noise(root, split: str = "training") -> list[np.ndarray]:
    """The background noise recordings at 16 kHz: their first 80% for training, the rest else."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    noise = []
    for path in noise_files(root):
        audio = load_audio(path)
        cut = int(len(audio) * NOISE_TRAIN_FRACTION)
        noise.append(audio[:cut] if split == "training" else audio[cut:])
    return noise


def load_clips(clips: list[Clip], length: int = CLIP_SAMPLES) -> np.ndarray:
    """(N, length) float32 array of the clips, each padded or trimmed to `length` samples."""
    out = np.zeros((len(clips), length), dtype=np.float32)
    for i, clip in enumerate(clips):
        try:
            out[i] = fit_length(load_audio(clip.path), length)
        except AudioError as e:
            raise DataError(f"{clip.path}: {e}") from None
    return out


def noise_segment(noise: list[np.ndarray], length: int, rng: random.Random) -> np.ndarray:
    recording = noise[rng.randrange(len(noise))]
    start = rng.randrange(max(1, len(recording) - length))
    return fit_length(recording[start:start + length], length)


SWITCH_FADE = 160  # samples (10 ms) of fade out and in where the noise switches, as eval-stream's slots meet
WORD_FLOOR_DB = 20.0  # frames this far below the loudest frame are not the word


def word_bounds(clip: np.ndarray, frame: int = 160) -> tuple[int, int]:
    """(first, last) sample of the word: the frames within WORD_FLOOR_DB of the loudest one."""
    n = len(clip) // frame
    if n == 0:
        return 0, len(clip)
    energy = np.square(clip[: n * frame].reshape(n, frame)).mean(axis=1)
    loud = np.flatnonzero(energy >= energy.max() * 10 ** (-WORD_FLOOR_DB / 10))
    return int(loud[0]) * frame, int(loud[-1] + 1) * frame


def rms(x: torch.Tensor) -> torch.Tensor:
    return x.square().mean(-1, keepdim=True).add(1e-10).sqrt()


class TrainingBatches:
    """Endless, seeded, class-balanced augmented batches for streaming-ready training.

    Each example is `context` seconds of something else (noise, silence or the end of another
    clip) followed by a 1-s target clip, so the model learns from arbitrary carried state; the
    loss reads out only the target's steps. Synthetic clips are also sped up or slowed down.

    `speech_negatives` is the fraction of background examples that hold speech which must not
    fire: about half of them the end of a clip in the context then a target of noise alone (a
    word just ended), the others a target second that starts with only the tail of a word
    (`word_tail`). No background example's target ever holds a whole word. `sentence_negatives`
    is the fraction of background examples cut from `sentences`, running speech without any
    keyword (kws.speech.training_sentences); with it, a fifth of the words' contexts are also
    the end of a sentence, as when a keyword follows talk. `near_misses` is the share of those
    sentences drawn from `near_miss_sentences`, spoken with words that sound like keywords.

    Augmentations for new voices and rooms, each the share of examples it touches (0: off, and
    then it draws nothing, so seeded batches stay as they were): `vtlp` warps a word's frequency
    axis by 0.9-1.1 (vocal-tract length perturbation, Jaitly & Hinton 2013), `reverb` puts the
    example in a synthetic room (RT60 0.1-0.8 s), `masks` silences one span of up to 50 ms of
    the target and one band of up to 500 Hz (SpecAugment's masks, on the waveform).
    `noise_onsets` makes the noise of an example 10-40 dB quieter before or after a random
    sample: noise that starts or stops (a tap, a fan, the next room), which a stream holds and
    an example of steady noise never does. `noise_switches` makes the noise give way, at a
    random sample, to another stretch of noise (most often another recording) 30 dB quieter to
    30 dB louder, through a 10-ms fade each way: one sound giving way to another, as where two
    slots of an evaluation stream meet. `quieter_db` and `louder_db` move the whole example's
    level by a draw from -quieter_db to +louder_db dB (clipped at full scale, as a converter
    clips): a microphone's gain and the talker's distance, which set the level a user's audio
    arrives at (both 0: off). `mic_response` is the share of examples recorded through a random
    microphone (`microphone_response`): bass lost below 50-600 Hz, treble above 3-7.5 kHz in half
    of them, and two resonances of up to 10 dB either way, as small and cheap microphones,
    their housings and a talker's distance colour speech and noise alike.
    """

    def __init__(self, real: np.ndarray, real_labels: list[int], synth: np.ndarray,
                 synth_labels: list[int], noise: list[np.ndarray], n_classes: int,
                 background: int, seed: int = 0, context_s: float = 0.5,
                 real_weight: float = 4.0, background_weight: float = 2.0,
                 speech_negatives: float = 0.0, vtlp: float = 0.0, reverb: float = 0.0, masks: float = 0.0,
                 sentences: list[np.ndarray] | None = None, sentence_negatives: float = 0.0,
                 noise_onsets: float = 0.0, near_miss_sentences: list[np.ndarray] | None = None,
                 near_misses: float = 0.0, noise_switches: float = 0.0, quieter_db: float = 0.0,
                 louder_db: float = 0.0, mic_response: float = 0.0):
        for name, value in {"speech_negatives": speech_negatives, "vtlp": vtlp, "reverb": reverb,
                            "masks": masks, "sentence_negatives": sentence_negatives,
                            "noise_onsets": noise_onsets, "near_misses": near_misses,
                            "noise_switches": noise_switches, "mic_response": mic_response}.items():
            if not 0.0 <= value <= 1.0:
                raise DataError(f"{name} is a fraction from 0 to 1, not {value}")
        if not (0.0 <= quieter_db <= 60.0 and 0.0 <= louder_db <= 60.0):
            raise DataError(f"quieter_db and louder_db are 0 to 60 dB, not {quieter_db} and {louder_db}")
        if speech_negatives + sentence_negatives > 1.0:
            raise DataError(f"speech_negatives and sentence_negatives share the background examples: "
                            f"together at most 1, not {speech_negatives + sentence_negatives:g}")
        self.sentences = [s for s in (sentences or []) if len(s)]
        if sentence_negatives > 0 and not self.sentences:
            raise DataError("sentence_negatives needs sentences to cut them from")
        self.sentence_negatives = sentence_negatives
        self.near_miss_sentences = [s for s in (near_miss_sentences or []) if len(s)]
        if near_misses > 0 and not self.near_miss_sentences:
            raise DataError("near_misses needs near-miss sentences to cut them from")
        self.near_misses = near_misses
        self.vtlp, self.reverb, self.masks, self.noise_onsets = vtlp, reverb, masks, noise_onsets
        self.noise_switches, self.mic_response = noise_switches, mic_response
        self.quieter_db, self.louder_db = quieter_db, louder_db
        # Kept apart, not concatenated: each epoch (and each batch worker) builds its own
        # TrainingBatches, and a copy of every clip would cost seconds and a gigabyte each time.
        self.real, self.synth = real, synth
        self.is_synth = np.r_[np.zeros(len(real), bool), np.ones(len(synth), bool)]
        labels = np.r_[np.asarray(real_labels, int), np.asarray(synth_labels, int)]
        weights = np.where(self.is_synth, 1.0, real_weight)
        self.pools = [np.flatnonzero(labels == c) for c in range(n_classes)]
        self.pool_p = [weights[p] / weights[p].sum() if len(p) else None for p in self.pools]
        self.class_p = np.array([background_weight if c == background else float(len(p) > 0)
                                 for c, p in enumerate(self.pools)])
        self.class_p /= self.class_p.sum()
        self.noise = noise
        self.background = background
        self.context = round(context_s * SAMPLE_RATE)
        self.speech_negatives = speech_negatives
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)

    def _clip(self, i: int) -> np.ndarray:
        """Clip i of the real clips followed by the synthetic ones."""
        return self.real[i] if i < len(self.real) else self.synth[i - len(self.real)]

    def _speech(self, label: int) -> np.ndarray:
        i = self.np_rng.choice(self.pools[label], p=self.pool_p[label])
        clip = self._clip(i)
        if self.is_synth[i]:
            clip = _change_speed(clip, self.rng.uniform(0.88, 1.12))
        else:
            clip = _change_speed(clip, self.rng.uniform(0.95, 1.05))
        return _shift(clip, self.rng.randint(-1600, 1600))  # +-100 ms

    def _context(self) -> np.ndarray:
        kind = self.rng.random()
        if kind < 0.4:  # the end of another word, as when keywords follow each other
            return self._clip_end()
        if self.sentence_negatives > 0 and kind < 0.6:  # the end of a sentence: a keyword after talk
            return self._sentence_window(self.context, end=True)
        return np.zeros(self.context, np.float32)  # noise is added to the whole example below

    def _clip_end(self) -> np.ndarray:
        """The last `context` samples of a random clip at a random level."""
        other = self.np_rng.choice(len(self.is_synth))
        tail = self._clip(other)[max(0, CLIP_SAMPLES - self.context):]  # [-0:] would be all
        tail = np.pad(tail, (self.context - len(tail), 0))  # a context longer than a clip
        return tail * 10 ** (self.rng.uniform(-10, 5) / 20)

    def _speech_negative(self) -> tuple[np.ndarray, bool]:
        """A background example (before noise) that holds speech the model must not fire on, and
        whether it is word-free throughout (not when its context ends with a whole clip)."""
        x = np.zeros(self.context + CLIP_SAMPLES, np.float32)
        if self.context > 0 and self.rng.random() < 0.5:  # a word just ended before the target
            x[:self.context] = self._clip_end()
            return x, False
        clip = self._clip(self.np_rng.choice(len(self.is_synth)))
        tail = word_tail(clip, self.rng.uniform(*WORD_TAIL_FRACTION))
        x[self.context:self.context + len(tail)] = tail * 10 ** (self.rng.uniform(-10, 5) / 20)
        return x, True

    def _sentence_window(self, length: int, end: bool = False) -> np.ndarray:
        """`length` samples of a random sentence at -40 to -15 dBFS: any stretch of it, with
        silence where the window overhangs it, or with `end` the last samples of its speech."""
        # No draw when near misses are off: the seeded batches stay as they were.
        pool = (self.near_miss_sentences if self.near_misses > 0 and self.rng.random() < self.near_misses
                else self.sentences)
        speech = pool[self.rng.randrange(len(pool))]
        level = 10 ** (self.rng.uniform(-40, -15) / 20) / (float(np.sqrt(np.mean(speech ** 2))) + 1e-8)
        padded = np.pad(speech, (length, length))
        start = len(speech) if end else self.rng.randrange(len(speech) + length)
        return (padded[start:start + length] * level).astype(np.float32)

    def example(self) -> tuple[np.ndarray, int, bool]:
        """(audio, label, word-free): word-free examples hold no whole word anywhere, context
        included, so every 1-s window of them must read background."""
        label = int(self.np_rng.choice(len(self.class_p), p=self.class_p))
        total = self.context + CLIP_SAMPLES
        word_free = label == self.background
        if label == self.background:
            x = np.zeros(total, np.float32)
            # No draw at all when the options are off: the seeded batches stay as they were.
            if self.speech_negatives > 0 or self.sentence_negatives > 0:
                kind = self.rng.random()
                if kind < self.speech_negatives:
                    x, word_free = self._speech_negative()
                elif kind < self.speech_negatives + self.sentence_negatives:
                    x = self._sentence_window(total)
        else:
            target = self._speech(label) * 10 ** (self.rng.uniform(-12, 8) / 20)
            if self.vtlp > 0 and self.rng.random() < self.vtlp:
                target = spectral_edit(target, warp=self.rng.uniform(0.9, 1.1))
            x = np.concatenate([self._context(), target]).astype(np.float32)
        if self.reverb > 0 and self.rng.random() < self.reverb:
            x = reverberate(x, synthetic_rir(self.rng.uniform(0.1, 0.8), self.np_rng))
        if label == self.background or self.rng.random() < 0.85:
            noise = noise_segment(self.noise, total, self.rng)
            if self.noise_onsets > 0 and self.rng.random() < self.noise_onsets:
                noise = self._onset(noise)
            if self.noise_switches > 0 and self.rng.random() < self.noise_switches:
                noise = self._switch(noise)
            speech_rms = float(np.sqrt(np.mean(x[self.context:] ** 2)) + 1e-8)
            if label == self.background:  # from near silence up to loud noise
                level = 10 ** (self.rng.uniform(-70, -10) / 20)
            else:
                level = speech_rms * 10 ** (-self.rng.uniform(0, 25) / 20)
            x = x + noise * (level / (np.sqrt(np.mean(noise ** 2)) + 1e-8))
        if self.masks > 0 and self.rng.random() < self.masks:
            x = self._mask(x)
        if self.mic_response > 0 and self.rng.random() < self.mic_response:
            x = self._through_microphone(x)
        if self.quieter_db > 0 or self.louder_db > 0:
            x = at_gain(x, self.rng.uniform(-self.quieter_db, self.louder_db))
        return np.clip(x, -1, 1), label, word_free

    def _onset(self, noise: np.ndarray) -> np.ndarray:
        """`noise` 10-40 dB quieter before a random sample (it starts there) or after it (stops)."""
        at = self.rng.randrange(1, len(noise))
        quieter = np.float32(10 ** (-self.rng.uniform(10, 40) / 20))
        noise = noise.copy()
        if self.rng.random() < 0.5:
            noise[:at] *= quieter
        else:
            noise[at:] *= quieter
        return noise

    def _switch(self, noise: np.ndarray) -> np.ndarray:
        """`noise` until a random sample, then another stretch of noise at -30 to +30 dB."""
        at = self.rng.randrange(1, len(noise))
        other = noise_segment(self.noise, len(noise), self.rng)
        gain = (10 ** (self.rng.uniform(-30, 30) / 20) * (np.sqrt(np.mean(noise ** 2)) + 1e-8)
                / (np.sqrt(np.mean(other[at:] ** 2)) + 1e-8))
        out = noise.copy()
        out[at:] = other[at:] * np.float32(gain)
        fade = min(SWITCH_FADE, at, len(noise) - at)
        ramp = np.linspace(0, 1, fade, dtype=np.float32)
        out[at - fade:at] *= ramp[::-1]
        out[at:at + fade] *= ramp
        return out

    def _mask(self, x: np.ndarray) -> np.ndarray:
        low = self.rng.uniform(0, SAMPLE_RATE / 2 - 500)
        x = spectral_edit(x, band=(low, low + self.rng.uniform(100, 500)))
        span = self.rng.randint(160, 800)  # 10-50 ms
        start = self.context + self.rng.randrange(CLIP_SAMPLES - span)
        x[start:start + span] = 0.0
        return x

    def _through_microphone(self, x: np.ndarray) -> np.ndarray:
        """x recorded through a random microphone, at its level before (the level is --quieter-db's)."""
        y = equalized(x, microphone_response(self.rng))
        return y * np.float32(np.sqrt(np.mean(x ** 2)) / (np.sqrt(np.mean(y ** 2)) + 1e-12))

    def state(self) -> str:
        """Where the batches stand, as JSON text: `set_state` continues from here."""
        return json.dumps({"random": self.rng.getstate(), "numpy": self.np_rng.bit_generator.state})

    def set_state(self, text: str):
        saved = json.loads(text)
        version, internal, gauss = saved["random"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.np_rng.bit_generator.state = saved["numpy"]

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(audio, labels, word-free flags) of `size` examples."""
        xs, ys, free = zip(*(self.example() for _ in range(size)))
        return torch.from_numpy(np.stack(xs)), torch.tensor(ys), torch.tensor(free)


STFT_SIZE, STFT_HOP = 512, 128  # 32-ms frames, a Hann window's sum of squares is flat at this hop


def spectral_edit(x: np.ndarray, warp: float = 1.0, band: tuple[float, float] | None = None) -> np.ndarray:
    """x with its frequency axis stretched by `warp` (content at f moves to warp * f; above
    Nyquist it is dropped) and the band (low, high) Hz silenced, by short-time Fourier
    transform and overlap-add. Same length; warp 1 and no band give x back."""
    n = len(x)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(STFT_SIZE) / STFT_SIZE)  # periodic Hann
    padded = np.pad(x.astype(np.float64), (STFT_SIZE, STFT_SIZE + (-n) % STFT_HOP))
    frames = np.lib.stride_tricks.sliding_window_view(padded, STFT_SIZE)[::STFT_HOP] * window
    spectrum = np.fft.rfft(frames, axis=1)
    bins = np.arange(spectrum.shape[1])
    if warp != 1.0:
        # A phase vocoder: output bin k takes the magnitude at input bin k / warp and that bin's
        # running phase times warp, so a component's phase advances at its new frequency.
        expected = 2 * np.pi * bins * STFT_HOP / STFT_SIZE  # phase advance per hop of each bin
        advance = np.diff(np.angle(spectrum), axis=0) - expected
        advance = expected + (advance + np.pi) % (2 * np.pi) - np.pi
        phase = np.angle(spectrum[:1]) + np.r_[np.zeros((1, len(bins))), np.cumsum(advance, axis=0)]
        source = bins / warp
        below, frac = np.floor(source).astype(int), source - np.floor(source)
        inside = below + 1 < len(bins)
        below = np.minimum(below, len(bins) - 2)
        magnitude = np.abs(spectrum)
        magnitude = magnitude[:, below] * (1 - frac) + magnitude[:, below + 1] * frac
        nearest = np.minimum(np.round(source).astype(int), len(bins) - 1)
        spectrum = np.where(inside, magnitude * np.exp(1j * warp * phase[:, nearest]), 0)
    if band is not None:
        hz = bins * SAMPLE_RATE / STFT_SIZE
        spectrum[:, (hz >= band[0]) & (hz <= band[1])] = 0
    # Overlap-add: frame i's quarter q lands on hop i + q.
    quarters = (np.fft.irfft(spectrum, STFT_SIZE, axis=1) * window).reshape(len(spectrum), 4, STFT_HOP)
    out = np.zeros((len(spectrum) + 3, STFT_HOP))
    for q in range(4):
        out[q:q + len(spectrum)] += quarters[:, q]
    return (out.reshape(-1)[STFT_SIZE:STFT_SIZE + n] / 1.5).astype(np.float32)  # 1.5: sum of Hann^2 at hop N/4


def microphone_response(rng: random.Random):
    """A random microphone's amplitude response, as a function of frequency in Hz: bass lost
    below a corner at 50-600 Hz (12 dB an octave; small capsules and ports roll off early), in
    half of them treble lost above 3-7.5 kHz (24 dB an octave; band-limited codecs, cheap
    capsules), and two resonances (a housing, a desk, proximity) of -10 to +10 dB at 150 Hz to
    6 kHz, each 0.3-1 octave wide."""
    low = math.exp(rng.uniform(math.log(50), math.log(600)))
    high = math.exp(rng.uniform(math.log(3000), math.log(7500))) if rng.random() < 0.5 else None
    peaks = [(math.exp(rng.uniform(math.log(150), math.log(6000))), rng.uniform(-10, 10), rng.uniform(0.3, 1.0))
             for _ in range(2)]

    def gain(hz: np.ndarray) -> np.ndarray:
        octaves = np.log2(np.maximum(hz, 1.0))
        db = sum(g * np.exp(-0.5 * ((octaves - math.log2(f)) / width) ** 2) for f, g, width in peaks)
        response = band_gain(hz, low, order=2) * 10 ** (db / 20)
        return response if high is None else response * band_gain(hz, high_hz=high)
    return gain


def word_tail(clip: np.ndarray, fraction: float) -> np.ndarray:
    """The last `fraction` (< 1) of the word in `clip` (located by `word_bounds`), at least one
    sample and never the whole word: what a 1-s window starting inside the word hears of it."""
    first, last = word_bounds(clip)
    span = last - first
    keep = min(max(1, int(span * fraction)), max(1, span - 1))
    return clip[last - keep:last].astype(np.float32)


def _change_speed(clip: np.ndarray, factor: float) -> np.ndarray:
    """Resample by linear interpolation: faster and higher (factor > 1) or slower and lower."""
    n = len(clip)
    src = (np.arange(n) - n / 2) * factor + n / 2
    return np.interp(src, np.arange(n), clip, left=0.0, right=0.0).astype(np.float32)


def _shift(clip: np.ndarray, shift: int) -> np.ndarray:
    """Move the clip `shift` samples later (earlier if negative), filling with silence."""
    out = np.zeros_like(clip)
    if shift >= 0:
        out[shift:] = clip[:len(clip) - shift]
    else:
        out[:shift] = clip[-shift:]
    return out
