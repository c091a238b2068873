"""Keyword detection on an endless audio stream: the one path `kws listen`, `kws eval-stream`
and the HTTP service all use.

A `Detector` feeds audio of any length to a stream engine (kws.runtime, the NumPy form of
`model.stream`), carrying the recurrent state, and turns the per-step logits
(one per 10 ms step for the edge model) into detections:

- score: softmax of the mean of the last `window_s` seconds of per-step logits. That is the
  training readout (cross-entropy on the mean logits of a 1-s clip), so the scores mean what
  they meant in training, and the background class ("_background_") makes silence and noise
  score low for every word without a separate energy gate. With a long window (the model's
  own, `engine.long_window_s`, the one its thresholds were chosen with; 1.25 s for the shipped
  model), the lower of that and the same over the longer window: a word must hold its score for
  longer, so brief word-like moments in running talk score lower (the model card's "A longer
  second window");
- a word becomes a candidate when its score (background excluded) reaches its threshold, once
  the window has filled: in the first `window_s` of a stream the model has had less context than
  in training (0.5 s before every clip) and the mean runs over fewer steps, and word scores
  measured on noise spike there;
- the candidate is followed until its score has peaked (the first step it falls below its best
  so far) or `peak_wait_s` has passed, whichever comes first; the detection then reports the
  peak, the utterance's score rather than the value that happened to cross, and the word that
  peaked highest if another word overtook the first meanwhile. The wait bounds the latency
  this adds (`peak_wait_s=0` reports at the crossing);
- then a refractory period in which nothing fires, and a word fires again only after its own
  score has fallen back below its threshold, so one utterance gives one detection.

At the end of a stream (a file, a /predict clip) `flush()` feeds silence long enough for a word
at the very end to pass through the score window, so the last word, or a file that holds a
single 1-s clip, is still reported.

State over an endless stream. Everything the detector keeps has a fixed size: the model's stream
state (unconsumed audio, a delay line of `delay_window - 1` steps and one hidden vector per
layer) and the last `window_s` (or `long_window_s`) seconds of logits in fixed-size buffers.
No reset is needed to keep the recurrence healthy: the minGRU hidden state is a convex
combination of the previous state and a positive candidate, h_t = (1 - z_t) h_{t-1} + z_t g(.),
so it stays between 0 and the largest candidate seen and cannot drift or blow up; the delay line
forgets everything older than `delay_window` steps. The model is trained with 0.5 s of
unrelated audio before every clip and the state carried through it, so it expects arbitrary
prior state rather than zeros; a stream starts from the state 0.5 s of silence leaves.
`kws eval-stream --long-run-check` verifies this on an hour of audio (memory flat, recall and
substitutions and false alarms in the last ten minutes no worse than in the first ten).
"""

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kws.audio import SAMPLE_RATE, DcBlocker
from kws.errors import KwsError
from kws.labels import BACKGROUND
from kws.runtime import StreamEngine

# A word's threshold when its model has none of its own (the shipped model has one for each of
# the 17 well-covered words, chosen by `kws eval-stream --choose-thresholds` on 96 validation
# streams). The rule of the streaming issue, on three 30-minute validation streams (`kws
# eval-stream --split validation --minutes 30 --seed 0,1,2`, the command's operating_point; the
# model card has the table): the highest recall with at most 1 false alarm per hour of
# keyword-free audio and at most 5% substitutions. With the shipped model (trained without label
# smoothing, so its sure answers lie between 0.99 and 1) that hears 60% of the spoken keywords.
DEFAULT_THRESHOLD = 0.993
DEFAULT_WINDOW_S = 1.0  # logits averaged over the last second: the training clip length
DEFAULT_REFRACTORY_S = 1.0  # after a detection, silence for this long
# A candidate is reported at its peak, at most this long after crossing: each 0.05 s adds about
# 40 ms to the median latency on the validation streams (the target is 200 ms in all).
DEFAULT_PEAK_WAIT_S = 0.05
DEFAULT_CHUNK_SAMPLES = 512  # 32 ms, a typical microphone block


@dataclass(frozen=True)
class Detection:
    time_s: float  # stream time of the detection: seconds from the start of the stream
    label: str
    score: float  # the peak of the word's score over the utterance


class Detector:
    """One streaming detector: model state, score smoothing, thresholds and refractory period.

    engine: the StreamEngine to run (`kws.runtime.load_engine`), or a torch MGRADE in eval mode
    (evaluation has one at hand), whose engine is built from it. threshold: one probability
    for every word, or {word: probability}; a word not given one keeps its default: the model's
    own threshold for it (`engine.thresholds`, chosen on validation streams), else
    DEFAULT_THRESHOLD.
    words: report only these. Default: the words the model has thresholds of its own for (its
    per-word set, chosen on validation streams; words named in a per-word `threshold` join them),
    or every label but the background for a model without any. The model's other words fire
    on running speech at any threshold (see the model card), so they are opt-in.
    peak_wait_s: how long after crossing its threshold a word may still be rising before it is
    reported (its peak score so far).
    long_window_s: 0 for none; else a word's score is the lower of its probability over the last
    window_s and over the last long_window_s, so that a word must hold its score over a longer
    stretch too: brief word-like moments in running talk score lower (see the model card).
    Default: the model's own (`engine.long_window_s`), the readout its thresholds were chosen
    with.
    """

    def __init__(self, engine, threshold: "float | dict[str, float] | None" = None,
                 words: Iterable[str] | None = None, window_s: float = DEFAULT_WINDOW_S,
                 refractory_s: float = DEFAULT_REFRACTORY_S,
                 peak_wait_s: float = DEFAULT_PEAK_WAIT_S,
                 long_window_s: float | None = None):
        if hasattr(engine, "inference_arrays"):
            engine = StreamEngine.from_model(engine)
        self.engine = engine
        self.labels = tuple(engine.labels)
        self.stride = engine.stride
        self.window_steps = max(1, round(window_s * SAMPLE_RATE / self.stride))
        whose = ""
        if long_window_s is None:
            long_window_s, whose = engine.long_window_s, ", the model's own"
        if long_window_s and long_window_s <= window_s:
            raise KwsError(f"the long window ({long_window_s:g} s{whose}) must be longer than the "
                           f"window ({window_s:g} s), or 0 for none")
        self.long_window_s = float(long_window_s)
        self.long_window_steps = round(long_window_s * SAMPLE_RATE / self.stride) if long_window_s else 0
        self.full_steps = max(self.window_steps, self.long_window_steps)
        self.refractory_steps = max(0, round(refractory_s * SAMPLE_RATE / self.stride))
        self.peak_wait_steps = max(0, round(peak_wait_s * SAMPLE_RATE / self.stride))
        self._thresholds = self._threshold_per_label(threshold, words)
        self.reset()

    def _threshold_per_label(self, threshold, words) -> np.ndarray:
        """(n_classes,) thresholds; labels that must never fire get infinity."""
        candidates = [label for label in self.labels if label != BACKGROUND]
        own = self.engine.thresholds
        if isinstance(threshold, dict):  # before the words, which take their names from it
            self._check_labels(threshold, "threshold")
        elif threshold is not None and not 0.0 < float(threshold) <= 1.0:
            raise KwsError(f"threshold {float(threshold):g} is not a probability in (0, 1]")
        if words is None and own:
            words = reported_words(own, threshold)
        if words is not None:
            words = list(words)
            self._check_labels(words, "--words")
            left_out = [w for w in (threshold if isinstance(threshold, dict) else {}) if w not in words]
            if left_out:
                raise KwsError(f"the threshold names {', '.join(map(repr, left_out))}, which the words "
                               f"listened for leave out: add {'it' if len(left_out) == 1 else 'them'} "
                               f"to --words")
            candidates = [w for w in candidates if w in words]
        per_label = {w: own.get(w, DEFAULT_THRESHOLD) for w in candidates}
        if isinstance(threshold, dict):
            per_label.update((w, float(t)) for w, t in threshold.items() if w in per_label)
        elif threshold is not None:
            per_label = dict.fromkeys(candidates, float(threshold))
        for w, t in per_label.items():
            if not 0.0 < t <= 1.0:  # at 0 a word would be reported with a score of 0
                raise KwsError(f"threshold for {w!r} is {t}; "
                               f"thresholds are probabilities in (0, 1]")
        return np.array([per_label.get(label, np.inf) for label in self.labels])

    @property
    def thresholds(self) -> dict[str, float]:
        """The words this detector reports, with their thresholds."""
        return {label: float(t) for label, t in zip(self.labels, self._thresholds)
                if np.isfinite(t)}

    def _check_labels(self, names, what: str):
        unknown = [n for n in names if n not in self.labels or n == BACKGROUND]
        if unknown:
            words = ", ".join(label for label in self.labels if label != BACKGROUND)
            raise KwsError(f"{what}: unknown word(s) {', '.join(map(repr, unknown))}; "
                           f"the model knows: {words}")

    def reset(self) -> None:
        """Back to the start of a stream: the model's state after `clip_context_s` of silence
        (every training clip came after some audio, never from a zero state, and `classify`
        starts from the same state), an empty score window, time 0."""
        self.state = self.engine.start_state()
        self._dc_blocker = DcBlocker()
        n = len(self.labels)
        self._window = _RunningMean(self.window_steps, n)
        self._long_window = _RunningMean(self.long_window_steps, n) if self.long_window_steps else None
        self._steps = 0
        self._samples = 0
        self._quiet_until = self.full_steps - 1  # first step that may fire: the windows are full
        self._armed = np.ones(n, dtype=bool)  # a word re-arms when its score falls below threshold
        self._candidate: _Candidate | None = None  # a word above threshold, not yet reported
        self._probs = np.zeros(n)
        self.last_logits = np.zeros((0, n), dtype=np.float32)  # from the latest process()

    @property
    def time_s(self) -> float:
        """Seconds of audio consumed so far."""
        return self._samples / SAMPLE_RATE

    @property
    def scores(self) -> dict[str, float]:
        """The latest smoothed probability of every label."""
        return {label: float(p) for label, p in zip(self.labels, self._probs)}

    def process(self, samples: np.ndarray) -> list[Detection]:
        """Feed float32 mono 16 kHz samples of any length; returns the detections they complete."""
        samples = np.asarray(samples, dtype=np.float32)
        if samples.ndim != 1:
            raise KwsError(f"the detector takes mono samples (1-D), got shape {samples.shape}")
        self._samples += len(samples)
        self.last_logits, self.state = self.engine.stream(self._dc_blocker.process(samples), self.state)
        return self.process_logits(self.last_logits)

    def process_logits(self, logits: np.ndarray, last: bool = False) -> list[Detection]:
        """The detection stage alone, for per-step logits (steps, n_classes) in stream order.
        `process` calls it. `last`: these end the stream, so a word still waiting for its peak
        is reported at the last step."""
        logits = np.asarray(logits)
        scores = (self._smoothed_probabilities(logits, self._window, self._long_window)
                  if len(logits) else logits)
        return self.process_scores(scores, last)

    def stream_scores(self, logits: np.ndarray) -> np.ndarray:
        """The per-step scores (steps, n_classes) this detector's readout gives logits that
        start a stream, leaving the detector as it is. eval-stream computes them once per
        recorded stream and readout, and replays them at many thresholds (`process_scores`)."""
        n = len(self.labels)
        long_window = _RunningMean(self.long_window_steps, n) if self.long_window_steps else None
        return self._smoothed_probabilities(np.asarray(logits), _RunningMean(self.window_steps, n),
                                            long_window)

    def process_scores(self, scores: np.ndarray, last: bool = False) -> list[Detection]:
        """The decision stage alone (thresholds, peaks, refractory period), for per-step
        scores in stream order as `stream_scores` gives them. `last` as in `process_logits`."""
        found = []
        if len(scores):
            first_step = self._steps
            self._steps += len(scores)
            self._probs = scores[-1]
            found = self._decide(scores, first_step)
        if last and self._candidate is not None:
            found.append(self._report(self._steps - 1))
        return found

    @staticmethod
    def _smoothed_probabilities(logits: np.ndarray, window: "_RunningMean",
                                long_window: "_RunningMean | None") -> np.ndarray:
        """Each new step's scores, (n, n_classes): softmax of the mean of the last window_s of
        logits, and with a long window the lower of that and the same over long_window_s."""
        probs = _softmax(window.means(logits))
        if long_window is not None:
            np.minimum(probs, _softmax(long_window.means(logits)), out=probs)
        return probs

    def flush(self) -> list[Detection]:
        """End the stream: feed silence until a word at the very end has passed through the
        score window and been reported. Detections made in the silence are dated at the end of
        the audio; `time_s` stays there too. Call `reset()` before feeding another stream."""
        silence = np.zeros((self.full_steps + self.peak_wait_steps + 1) * self.stride,
                           np.float32)
        self.last_logits, self.state = self.engine.stream(silence, self.state)
        found = self.process_logits(self.last_logits, last=True)
        end_s = self.time_s
        return [Detection(min(d.time_s, end_s), d.label, d.score) for d in found]

    def _decide(self, probs: np.ndarray, first_step: int) -> list[Detection]:
        """Thresholds, peak following, re-arming and the refractory period, step by step. Only
        steps where some word is above its threshold need a look, and the first step after
        them, where every score is below threshold (any candidate has peaked, and every word
        re-arms)."""
        detections = []
        above = probs >= self._thresholds
        previous = -1
        for i in dict.fromkeys(above.nonzero()[0].tolist()):  # the steps with a word above, in order
            if i > previous + 1:
                self._below_every_threshold(first_step + previous + 1, detections)
            previous = i
            self._armed |= ~above[i]
            step = first_step + int(i)
            if self._candidate is not None:
                self._follow(probs[i], above[i], step, detections)
            elif step >= self._quiet_until:
                candidates = np.where(above[i] & self._armed, probs[i], -1.0)
                best = int(candidates.argmax())
                if candidates[best] >= 0:
                    self._candidate = _Candidate(best, float(probs[i, best]),
                                                 step + self.peak_wait_steps)
                    if self.peak_wait_steps == 0:
                        detections.append(self._report(step))
        if previous < len(probs) - 1:
            self._below_every_threshold(first_step + previous + 1, detections)
        return detections

    def _follow(self, probs: np.ndarray, above: np.ndarray, step: int, detections: list):
        """A step while a candidate waits for its peak: a higher score (of the candidate or a
        word that overtakes it) becomes the peak; a fall or the end of the wait reports."""
        c = self._candidate
        challengers = np.where(above & self._armed, probs, -1.0)
        best = int(challengers.argmax())
        if challengers[best] > c.peak:
            c.label, c.peak = best, float(challengers[best])
        elif probs[c.label] < c.peak:
            detections.append(self._report(step))
            return
        if step >= c.deadline:
            detections.append(self._report(step))

    def _below_every_threshold(self, step: int, detections: list):
        if self._candidate is not None:
            detections.append(self._report(step))
        self._armed[:] = True

    def _report(self, step: int) -> Detection:
        c, self._candidate = self._candidate, None
        self._armed[c.label] = False
        self._quiet_until = step + 1 + self.refractory_steps
        return Detection(time_s=(step + 1) * self.stride / SAMPLE_RATE, label=self.labels[c.label],
                         score=c.peak)


class _RunningMean:
    """The mean of the last `steps` rows at every new row, in a fixed-size buffer. At the start
    of a stream the mean runs over the rows seen so far."""

    def __init__(self, steps: int, n_classes: int):
        self.steps = steps
        self._recent = np.zeros((steps, n_classes))  # last `steps` rows, oldest first
        self._sum = np.zeros(n_classes)  # their sum
        self._seen = 0

    def means(self, rows: np.ndarray) -> np.ndarray:
        W, n = self.steps, len(rows)
        seq = np.concatenate((self._recent, rows))  # rows not yet seen are zeros: they add nothing
        # Each new row's window sum: the last one's, plus the row it gains, minus the row it
        # loses. Summed afresh once per window, so rounding cannot build up over an endless stream.
        sums = np.subtract(seq[W:], seq[:n])
        np.add.accumulate(sums, axis=0, out=sums)
        sums += self._sum
        self._recent = seq[n:]
        if (self._seen + n) // W > self._seen // W:
            self._sum = np.add.reduce(self._recent, axis=0)
        else:
            self._sum = sums[-1]
        if self._seen + 1 >= W:
            means = sums * (1.0 / W)  # a new array: self._sum is a row of sums
        else:
            means = sums / np.minimum(np.arange(self._seen + 1, self._seen + n + 1), W)[:, None]
        self._seen += n
        return means


def _softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax, in place. ufunc reductions: the ndarray methods' Python wrappers cost
    as much as the work here."""
    x -= np.maximum.reduce(x, axis=1, keepdims=True)
    np.exp(x, out=x)
    x /= np.add.reduce(x, axis=1, keepdims=True)
    return x


@dataclass
class _Candidate:
    label: int  # index into labels
    peak: float  # best score so far
    deadline: int  # the step at which it is reported even if still rising


def reported_words(own_words, threshold) -> list[str]:
    """The words reported when none are named: a model's own words (those it has thresholds
    for), and any named in a per-word threshold."""
    named = threshold if isinstance(threshold, dict) else {}
    return [*own_words, *(w for w in named if w not in own_words)]


def parse_threshold(text: str) -> "float | dict[str, float]":
    """'0.8' for every word, 'yes=0.9,no=0.7' per word, or a JSON file of per-word thresholds
    (what --threshold and KWS_THRESHOLD take); the Detector checks the words and the range."""
    if text.endswith(".json"):
        return read_thresholds(text)
    try:
        if "=" not in text:
            return float(text)
        pairs = [(w.strip(), float(t)) for w, t in (item.split("=", 1) for item in text.split(",") if item.strip())]
    except ValueError:
        raise KwsError(f"{text!r}: give a probability like 0.8, "
                       f"or per word like yes=0.9,no=0.7") from None
    twice = sorted(w for w, n in Counter(w for w, _ in pairs).items() if n > 1)
    if twice:
        raise KwsError(f"{text!r} gives {', '.join(twice)} more than one threshold: give each word once")
    return dict(pairs)


def read_thresholds(path: "str | Path") -> dict[str, float]:
    """The per-word thresholds of a JSON file as `kws eval-stream --choose-thresholds` writes
    it: {"thresholds": {word: probability}, ...}."""
    return read_choice(path)[0]


def read_choice(path: "str | Path") -> tuple[dict[str, float], object]:
    """(thresholds, long window) of a file `kws eval-stream --choose-thresholds` wrote:
    {"thresholds": {word: probability}, "chosen_on": {"long_window_s": seconds, ...}, ...}. The
    long window, as the file has it (`kws export` checks it), is 0 when its "chosen_on" names
    none (files written before the long window existed were chosen without one), and None for
    a file without "chosen_on": thresholds written by hand, not a choice."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise KwsError(f"cannot read thresholds from {path}: {e.strerror}") from None
    except ValueError:
        raise KwsError(f"{path} is not a JSON file") from None
    thresholds = data.get("thresholds") if isinstance(data, dict) else None
    if not isinstance(thresholds, dict) or not all(
            isinstance(t, (int, float)) and not isinstance(t, bool) for t in thresholds.values()):
        raise KwsError(f'{path} holds no per-word thresholds: expected {{"thresholds": '
                       f'{{"yes": 0.9, ...}}}}, as kws eval-stream --choose-thresholds writes')
    chosen_on = data.get("chosen_on")
    long_window_s = chosen_on.get("long_window_s", 0.0) if isinstance(chosen_on, dict) else None
    return {w: float(t) for w, t in thresholds.items()}, long_window_s


def parse_words(text: str) -> list[str]:
    """'yes,no,stop' -> ['yes', 'no', 'stop'] (what --words and KWS_WORDS take)."""
    words = [w.strip() for w in text.split(",") if w.strip()]
    if not words:
        raise KwsError(f"{text!r}: give words separated by commas, like yes,no,stop")
    return words


def detect(engine, audio: np.ndarray, chunk_samples: int = DEFAULT_CHUNK_SAMPLES,
           **detector_kwargs) -> list[Detection]:
    """Every detection in a whole signal, fed through a fresh Detector (of `engine`, as the
    Detector takes it) in chunks, and flushed at the end so that a word at the very end is
    reported too."""
    if chunk_samples < 1:
        raise KwsError(f"chunk_samples must be positive, got {chunk_samples}")
    detector = Detector(engine, **detector_kwargs)
    audio = np.asarray(audio, dtype=np.float32)
    detections = []
    for start in range(0, len(audio), chunk_samples):
        detections += detector.process(audio[start:start + chunk_samples])
    return detections + detector.flush()
