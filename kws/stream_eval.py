"""`kws eval-stream`: keyword spotting measured the way it is used, on long streams.

A stream is a run of slots, 3-6 s each. Most slots hold one clip of the split at a random time,
at a random gain (-10..+5 dB), over background noise at a random SNR (5-20 dB, speech RMS over
the 1-s clip against noise RMS, as in training); a fifth hold a sentence without any keyword,
rendered by the TTS engines (kws.speech), over noise the same way: speech that must not fire;
the rest hold only noise, from near silence to loud (-70..-25 dBFS). Noise comes from the
held-out end of the split's noise recordings (see kws.data.read_noise). The stream runs through
the same `Detector` that `kws listen` uses, in 32-ms blocks, and is flushed at its end.

Scoring, for every spoken keyword of the chosen words (default: the 17 words the shared data
covers well). Each clip's word is where its 10-ms frames are within 20 dB of its loudest frame
(an energy estimate of its start and end); its window runs from the word's start to one second
after its end. The keyword is a *hit* when its own label is detected in its window, a
*substitution* when it is not and another label is, and a *miss* otherwise. A detection in no
window of any of the 35 words is a *false alarm*, counted per hour of such keyword-free audio,
and separately on speech (a sentence's span and the second after it) and on noise (the rest).
Clips of the other words stay in the stream as speech that must not fire; detections in their
windows are counted apart. Latency is detection time minus word end (the detection's time is
when it is reported, after the peak wait).

The DET curve comes from replaying the recorded per-step logits through fresh Detectors at other
thresholds (their readout computed once per stream, `Detector.stream_scores`, then decided at
each threshold, `Detector.process_scores`), so every point uses the same decision path. Several
seeds (`--seed 0,1,2`) give several streams, scored together.
"""

import itertools
import json
import math
import resource
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from kws.audio import SAMPLE_RATE, Microphone, load_audio
from kws.data import read_noise, read_split, word_bounds
from kws.labels import WELL_COVERED
from kws.errors import KwsError
from kws.runtime import StreamEngine
from kws.speech import SPEECH, default_cache, spoken
from kws.stream import (DEFAULT_CHUNK_SAMPLES, DEFAULT_PEAK_WAIT_S,
                        DEFAULT_REFRACTORY_S, DEFAULT_THRESHOLD, DEFAULT_WINDOW_S, Detection,
                        Detector, parse_threshold, parse_words, reported_words)

SLOT_S = (3.0, 6.0)
KEYWORD_FREE_SLOTS = 0.2  # noise only
SPEECH_SLOTS = 0.2  # a sentence without keywords
SNR_DB = (5.0, 20.0)
GAIN_DB = (-10.0, 5.0)
SENTENCE_DBFS = (-32.0, -18.0)  # RMS of a rendered sentence, like the clips' speech
QUIET_DBFS = (-70.0, -25.0)
MAX_LATENCY_S = 1.0
# A stream's sentences are drawn by its seed's generator, XOR its split's salt. Streams of the
# same seed share that generator's draws (slot lengths, noise pieces, positions), so without a
# salt testing stream s would hold validation stream s's sentences, the ones thresholds are
# chosen on, and its false alarms on speech would not be held out.
SENTENCE_SALT = {"validation": 0, "testing": 0x5EED7E57}
FADE_S = 0.01
DET_THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7,
                  0.75, 0.8, 0.825, 0.85, 0.875, 0.9, 0.925, 0.94, 0.95, 0.96, 0.965, 0.97, 0.975,
                  0.98, 0.985, 0.99, 0.993, 0.995, 0.997, 0.999, 0.9995, 0.9998, 0.9999)
MAX_FALSE_ALARMS_PER_HOUR = 1.0  # the limits a default threshold must meet (validation streams)
MAX_SUBSTITUTION_RATE = 0.05
# --choose-thresholds: each scored word's threshold is one of these; a substitution costs as
# much as this many hits, and a false alarm each of these prices in turn (see choose_thresholds).
# The top of both grids is for confident models (a distilled one): their limit can lie above 0.999.
# The bottom is 0.5 (it was 0.8, where eight of 17 words sat with false alarms to spare); below
# it, two words could pass together.
CHOICE_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.993, 0.995, 0.997, 0.999, 0.9995, 0.9998)
SUBSTITUTION_PRICE = 2.0
FALSE_ALARM_PRICES = (1, 2, 3, 5, 8, 12, 20, 30, 50, 100, 200)
# A set is charged with the false alarms it would raise this many grid steps lower: without the
# margin, sets chosen on 48 validation streams raised about twice the limit on the other 48.
FALSE_ALARM_MARGIN_STEPS = 1
MEMORY_TOLERANCE_BYTES = 5 * 2**20
DEFAULT_COMPARE_MINUTES = 10.0  # --long-run-check: the stretch compared at the start and the end
SUMMARY_KEYS = ("recall", "substitution_rate", "false_alarms_per_hour", "keywords",
                "latency_ms_median")


@dataclass(frozen=True)
class Placement:
    label: str  # one of the 35 words, or kws.speech.SPEECH for a sentence without keywords
    start_s: float  # onset (energy estimate), stream time
    end_s: float  # end


# ----------------------------------------------------------------------------- building streams

def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))) + 1e-8)


def noise_piece(noise: list[np.ndarray], length: int, rng: np.random.Generator) -> np.ndarray:
    """`length` samples of a random noise recording at unit RMS, faded in and out."""
    recording = noise[rng.integers(len(noise))]
    if len(recording) <= length:
        recording = np.tile(recording, length // len(recording) + 1)
    start = rng.integers(len(recording) - length + 1)
    piece = recording[start:start + length].astype(np.float32)
    fade = min(int(FADE_S * SAMPLE_RATE), length // 2)  # no clicks where slots meet
    ramp = np.linspace(0, 1, fade, dtype=np.float32)
    piece[:fade] *= ramp
    piece[length - fade:] *= ramp[::-1]
    return piece / _rms(piece)


def stream_slots(clips, noise: list[np.ndarray], seconds: float, seed: int, split: str,
                 start_s: float = 0.0, speech_cache: Path | None = None, mic: Microphone = Microphone()
                 ) -> Iterator[tuple[np.ndarray, list[Placement]]]:
    """Seeded slots of a stream of `split`'s clips and noise, generated one at a time (constant
    memory), until `seconds` of audio: (audio, placements in stream time counted from `start_s`), each slot
    as `mic` records it (its levels below then `mic`'s band and gain). Sentences are rendered into
    (or read from) `speech_cache` (default: kws.speech.default_cache())."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(clips))
    made, next_clip = 0, 0
    total = int(seconds * SAMPLE_RATE)
    cache = speech_cache or default_cache()
    while made < total:
        length = min(int(rng.uniform(*SLOT_S) * SAMPLE_RATE), total - made)
        background = noise_piece(noise, length, rng)
        kind = rng.random()
        if kind < KEYWORD_FREE_SLOTS or length < 2 * SAMPLE_RATE:
            yield mic.record(background * 10 ** (rng.uniform(*QUIET_DBFS) / 20)), []
            made += length
            continue
        if kind < KEYWORD_FREE_SLOTS + SPEECH_SLOTS:
            label = SPEECH
            sentence = int(rng.integers(2**31)) ^ SENTENCE_SALT[split]
            speech = spoken(sentence, cache)[: length - SAMPLE_RATE // 2]
            speech = speech * np.float32(10 ** (rng.uniform(*SENTENCE_DBFS) / 20) / _rms(speech))
        else:
            clip = clips[order[next_clip % len(order)]]
            next_clip += 1
            label = clip.label
            speech = load_audio(clip.path)[: length - SAMPLE_RATE // 2]
            speech = speech * np.float32(10 ** (rng.uniform(*GAIN_DB) / 20))
        noise_rms = _rms(speech) * 10 ** (-rng.uniform(*SNR_DB) / 20)
        audio = background * noise_rms
        at = int(rng.integers(SAMPLE_RATE // 4, length - len(speech) + 1))
        audio[at:at + len(speech)] += speech
        first, last = word_bounds(speech)
        t0 = start_s + (made + at) / SAMPLE_RATE
        yield (mic.record(audio),
               [Placement(label, t0 + first / SAMPLE_RATE, t0 + last / SAMPLE_RATE)])
        made += length


# ----------------------------------------------------------------------------- running, scoring

@dataclass
class StreamRun:
    detections: list[Detection]
    placements: list[Placement]
    seconds: float
    logits: np.ndarray | None  # (steps, n_classes) when recorded, for the DET curve
    compute_seconds: float
    _scores: dict = field(default_factory=dict, repr=False)  # readout (window steps) -> scores

    def scores(self, detector: Detector) -> np.ndarray:
        """The detector's readout of the recorded logits (`Detector.stream_scores`), computed
        once per readout: replays at other thresholds only decide again. The readout is the
        costly part of a replay (about 90% of it), and choosing thresholds replays each
        stream hundreds of times."""
        key = (detector.window_steps, detector.long_window_steps)
        if key not in self._scores:
            self._scores[key] = detector.stream_scores(self.logits)
        return self._scores[key]


def run_stream(detector: Detector, slots, record_logits: bool = False, on_slot=None) -> StreamRun:
    """Feed slots to the detector in DEFAULT_CHUNK_SAMPLES blocks, exactly as listen does, and
    flush it at the end, as listen does at the end of a file."""
    import time

    detections, placements, logits = [], [], []
    carry = np.zeros(0, np.float32)
    compute = 0.0
    chunk = DEFAULT_CHUNK_SAMPLES
    for audio, slot_placements in slots:
        placements += slot_placements
        audio = np.concatenate([carry, audio])
        whole = len(audio) // chunk * chunk
        for start in range(0, whole, chunk):
            t0 = time.perf_counter()
            detections += detector.process(audio[start:start + chunk])
            compute += time.perf_counter() - t0
            if record_logits:
                logits.append(detector.last_logits.copy())
        carry = audio[whole:]
        if on_slot:
            on_slot(detector)
    if len(carry):
        detections += detector.process(carry)
        if record_logits:
            logits.append(detector.last_logits.copy())
    detections += detector.flush()
    if record_logits:  # a replay ends with the same flush
        logits.append(detector.last_logits.copy())
    return StreamRun(detections, placements, detector.time_s,
                     np.concatenate(logits) if record_logits else None, compute)


def _covered(intervals, lo: float, hi: float) -> float:
    """Seconds of [lo, hi) inside the union of `intervals` ((start, end) pairs)."""
    total, reach = 0.0, lo
    for a, b in sorted(intervals):
        a, b = max(a, reach), min(b, hi)
        if b > a:
            total += b - a
            reach = b
    return total


@dataclass
class Tally:
    """Counts of one or more streams; `+` pools streams, `summary()` gives the rates."""
    keywords: int = 0
    hits: int = 0
    substitutions: int = 0
    false_alarms_speech: int = 0
    false_alarms_noise: int = 0
    extra_in_word_windows: int = 0  # detections in a chosen word's window beyond its hit or substitution
    on_other_words: int = 0  # detections in the window of a word that is not among the chosen
    seconds: float = 0.0
    keyword_free_seconds: float = 0.0
    speech_seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    spoken: Counter = field(default_factory=Counter)  # per word
    heard: Counter = field(default_factory=Counter)  # hits per word

    def __add__(self, other: "Tally") -> "Tally":
        return Tally(*(a + b for a, b in zip(vars(self).values(), vars(other).values())))

    def summary(self) -> dict:
        def per_hour(count, seconds):
            return count * 3600 / seconds if seconds > 0 else float("nan")

        lat = self.latencies_ms
        false_alarms = self.false_alarms_speech + self.false_alarms_noise
        detections = (self.hits + self.substitutions + false_alarms + self.extra_in_word_windows
                      + self.on_other_words)
        return {
            "recall": self.hits / self.keywords if self.keywords else float("nan"),
            "substitution_rate": self.substitutions / self.keywords if self.keywords else float("nan"),
            "false_alarms_per_hour": per_hour(false_alarms, self.keyword_free_seconds),
            "false_alarms_per_hour_speech": per_hour(self.false_alarms_speech, self.speech_seconds),
            "false_alarms_per_hour_noise": per_hour(
                self.false_alarms_noise, self.keyword_free_seconds - self.speech_seconds),
            "keyword_free_hours": self.keyword_free_seconds / 3600,
            "speech_hours": self.speech_seconds / 3600,
            "latency_ms_median": float(np.median(lat)) if lat else float("nan"),
            "latency_ms_p90": float(np.percentile(lat, 90)) if lat else float("nan"),
            "keywords": self.keywords, "hits": self.hits, "substitutions": self.substitutions,
            "misses": self.keywords - self.hits - self.substitutions,
            "false_alarms": false_alarms, "false_alarms_speech": self.false_alarms_speech,
            "false_alarms_noise": self.false_alarms_noise,
            "extra_detections_in_word_windows": self.extra_in_word_windows,
            "detections_on_other_words": self.on_other_words,
            # Every detection that is not a hit, per hour of stream (the metric before the error
            # types were told apart).
            "false_accepts_per_hour": per_hour(detections - self.hits, self.seconds),
            "hours": self.seconds / 3600,
            "recall_per_word": {w: round(self.heard[w] / n, 4)
                                for w, n in sorted(self.spoken.items())},
        }


def score(detections: list[Detection], placements: list[Placement], words, seconds: float,
          window: tuple[float, float] = (0.0, math.inf)) -> Tally:
    """Hits, substitutions, misses and false alarms of detections against the placed words and
    sentences, counting only placements that start and detections that fall in `window`."""
    lo, hi = window[0], min(window[1], seconds)
    words = set(words)
    keyword_windows = [(p.start_s, p.end_s + MAX_LATENCY_S, i) for i, p in enumerate(placements)
                       if p.label != SPEECH]
    speech_windows = [(p.start_s, p.end_s + MAX_LATENCY_S) for p in placements
                      if p.label == SPEECH]
    t = Tally(seconds=hi - lo)
    hit, other_label = set(), set()
    for d in detections:
        if not lo <= d.time_s < hi:
            continue
        inside = [i for a, b, i in keyword_windows if a <= d.time_s <= b]
        if not inside:
            if any(a <= d.time_s <= b for a, b in speech_windows):
                t.false_alarms_speech += 1
            else:
                t.false_alarms_noise += 1
            continue
        # Of overlapping windows, the one this detection hits, else the earliest.
        i = next((i for i in inside if placements[i].label == d.label and i not in hit), inside[0])
        p = placements[i]
        if p.label not in words or not lo <= p.start_s < hi:
            t.on_other_words += 1
        elif p.label == d.label and i not in hit:
            hit.add(i)
            t.latencies_ms.append(1000 * (d.time_s - p.end_s))
        elif p.label != d.label and i not in other_label:
            other_label.add(i)
        else:
            t.extra_in_word_windows += 1
    for i, p in enumerate(placements):
        if p.label in words and lo <= p.start_s < hi:
            t.keywords += 1
            t.spoken[p.label] += 1
            t.heard[p.label] += i in hit
    t.hits = len(hit)
    t.substitutions = len(other_label - hit)
    t.extra_in_word_windows += len(other_label & hit)  # a wrong label as well as the right one
    t.keyword_free_seconds = hi - lo - _covered([(a, b) for a, b, _ in keyword_windows], lo, hi)
    t.speech_seconds = (_covered([(a, b) for a, b, _ in keyword_windows] + speech_windows, lo, hi)
                        - _covered([(a, b) for a, b, _ in keyword_windows], lo, hi))
    return t


def replay(model, run: StreamRun, words, threshold, window_s: float, refractory_s: float,
           peak_wait_s: float, long_window_s: float | None = None) -> list[Detection]:
    """The detections a Detector with these settings makes on the run's recorded logits."""
    detector = Detector(model, threshold=threshold, words=words, window_s=window_s,
                        refractory_s=refractory_s, peak_wait_s=peak_wait_s, long_window_s=long_window_s)
    return [Detection(min(d.time_s, run.seconds), d.label, d.score)  # dated as flush() dates them
            for d in detector.process_scores(run.scores(detector), last=True)]


def replay_tally(model, runs: list[StreamRun], words, threshold, window_s: float,
                 refractory_s: float, peak_wait_s: float, long_window_s: float | None = None,
                 listening=None) -> Tally:
    """The pooled counts, scored for `words`, of the runs replayed at `threshold` (one value or
    per word) with a detector that listens for `listening` (default: `words`)."""
    return sum((score(replay(model, run, listening or words, threshold, window_s, refractory_s,
                             peak_wait_s, long_window_s), run.placements, words, run.seconds)
                for run in runs), Tally())


DET_KEYS = ("recall", "substitution_rate", "false_alarms_per_hour",
            "false_alarms_per_hour_speech", "false_alarms_per_hour_noise", "latency_ms_median")


def det_curve(model, runs: list[StreamRun], words, window_s: float, refractory_s: float,
              peak_wait_s: float, thresholds=DET_THRESHOLDS,
              long_window_s: float | None = None) -> list[dict]:
    """The pooled error rates of the runs at each threshold, replaying their recorded logits."""
    points = []
    for t in thresholds:
        summary = replay_tally(model, runs, words, float(t), window_s, refractory_s, peak_wait_s,
                               long_window_s).summary()
        points.append({"threshold": float(t), **{k: summary[k] for k in DET_KEYS}})
    return points


def operating_point(points: list[dict], max_false_alarms_per_hour: float = MAX_FALSE_ALARMS_PER_HOUR,
                    max_substitution_rate: float = MAX_SUBSTITUTION_RATE) -> dict | None:
    """The DET point with the highest recall within both limits (the higher threshold on a
    tie), or None when no threshold meets them."""
    ok = [p for p in points if p["false_alarms_per_hour"] <= max_false_alarms_per_hour
          and p["substitution_rate"] <= max_substitution_rate]
    return max(ok, key=lambda p: (p["recall"], p["threshold"])) if ok else None


def choose_thresholds(model, runs: list[StreamRun], words, window_s: float, refractory_s: float,
                      peak_wait_s: float, grid=CHOICE_GRID,
                      long_window_s: float | None = None,
                      max_false_alarms_per_hour: float = MAX_FALSE_ALARMS_PER_HOUR,
                      max_substitution_rate: float = MAX_SUBSTITUTION_RATE,
                      false_alarm_margin: int = FALSE_ALARM_MARGIN_STEPS) -> dict | None:
    """Per-word thresholds for `words` with the highest recall within both limits on the runs,
    or None when no set meets them.

    With a `false_alarm_margin` of n, every false alarm a set is charged with is one it would
    raise with each word's threshold n steps lower on `grid`: a set whose false alarms were few
    on these streams by chance, just above scores that fire, is refused, so the limit holds
    better on other streams. Hits and substitutions are counted at the thresholds themselves.

    Each word is replayed alone at every threshold of `grid`: its hits, the substitutions it
    makes on the other words, its false alarms. For each price of a false alarm (in hits,
    FALSE_ALARM_PRICES), every word takes the threshold that maximises hits - price x false
    alarms - SUBSTITUTION_PRICE x substitutions (the higher threshold on a tie). Each such set
    is then replayed with all words together, as `kws listen` runs them, and the set with the
    highest recall within the limits is kept. The prices step over what a word's next hits
    would cost, so that set usually leaves part of the false-alarm budget unspent: then, one
    word at a time, a threshold goes down to where the word alone hears more, the move that
    gains the most hits per false alarm it adds (a move that adds none counts as half of one),
    while the set stays within the limits. Returned with its pooled rates and the false alarms
    an hour it was charged with."""
    def replayed(threshold, only=None) -> Tally:
        return replay_tally(model, runs, words, threshold, window_s, refractory_s, peak_wait_s,
                            long_window_s, listening=only)

    def stepped_down(t: float) -> float:
        return grid[max(grid.index(t) - false_alarm_margin, 0)]

    def with_false_alarms_of(tally: Tally, other: Tally) -> Tally:
        return replace(tally, false_alarms_speech=other.false_alarms_speech,
                       false_alarms_noise=other.false_alarms_noise)

    def charged(threshold: dict) -> Tally:
        tally = replayed(threshold)
        if not false_alarm_margin:
            return tally
        return with_false_alarms_of(tally, replayed({w: stepped_down(t) for w, t in threshold.items()}))

    def within(summary) -> bool:
        return (summary["false_alarms_per_hour"] <= max_false_alarms_per_hour
                and summary["substitution_rate"] <= max_substitution_rate)

    heard_alone = {w: {t: replayed(t, [w]) for t in grid} for w in words}
    alone = {w: {t: with_false_alarms_of(heard_alone[w][t], heard_alone[w][stepped_down(t)])
                 for t in grid} for w in words}
    best = None
    for price in FALSE_ALARM_PRICES:
        def value(t: Tally) -> float:
            return (t.hits - price * (t.false_alarms_speech + t.false_alarms_noise)
                    - SUBSTITUTION_PRICE * t.substitutions)

        chosen = {w: max(grid, key=lambda t: (value(alone[w][t]), t)) for w in words}
        summary = charged(chosen).summary()
        if within(summary) and (best is None or summary["recall"] > best_summary["recall"]):
            best, best_summary, best_price = chosen, summary, price
    if best is None:
        return None
    chosen, summary = best, best_summary
    while True:
        moves = []
        for w in words:
            lower = [t for t in grid if t < chosen[w] and alone[w][t].hits > alone[w][chosen[w]].hits]
            if lower:
                trial = {**chosen, w: max(lower)}
                moved = charged(trial).summary()
                gain = moved["hits"] - summary["hits"]
                cost = moved["false_alarms"] - summary["false_alarms"]
                if gain > 0 and within(moved):
                    moves.append((gain / max(cost, 0.5), trial, moved))
        if not moves:
            break
        _, chosen, summary = max(moves, key=lambda m: m[0])  # the first word's on a tie
    actual = replayed(chosen).summary() if false_alarm_margin else summary
    return {"thresholds": chosen, "false_alarm_price": best_price,  # of the set the budget step began from
            "false_alarm_margin": false_alarm_margin,
            "false_alarms_per_hour_charged": summary["false_alarms_per_hour"],
            **{k: actual[k] for k in DET_KEYS + ("latency_ms_p90", "recall_per_word")}}


def clip_accuracy(model, clips, seed: int, batch: int = 64, mic: Microphone = Microphone()) -> dict:
    """Clip accuracy (mean-logit readout over each clip's own steps, the clips as `mic`
    records them) with the stream state reset before every clip to the state a stream starts in
    (`model.primed_state`, what `classify` does), and carried from one clip to the next in a
    seeded order."""
    order = np.random.default_rng(seed).permutation(len(clips))
    audio = [mic.record(np.pad(a, (0, max(0, SAMPLE_RATE - len(a))))[:SAMPLE_RATE])
             for a in (load_audio(clips[i].path) for i in order)]
    labels = [model.cfg.labels.index(clips[i].label) for i in order]
    reset, carried = [], []
    with torch.inference_mode():
        for start in range(0, len(audio), batch):
            x = torch.from_numpy(np.stack(audio[start:start + batch]))
            reset += model.classify(x).argmax(1).tolist()
        state = model.primed_state(1)
        for a in audio:
            logits, state = model.stream(torch.from_numpy(a)[None], state)
            carried.append(int(logits[0].mean(0).argmax()))
    labels = np.array(labels)
    return {"clip_accuracy_reset": float(np.mean(np.array(reset) == labels)),
            "clip_accuracy_carried": float(np.mean(np.array(carried) == labels)),
            "clips": len(labels)}


# ----------------------------------------------------------------------------- DET picture

_GLYPHS = {  # 3x5 pixel glyphs for tick labels, the axis title and the legend
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001001001001", "8": "111101111101111",
    "9": "111101111001111", ".": "000000000000010", "%": "101001010100101",
    " ": "000000000000000", "A": "010101111101101", "B": "110101110101110",
    "C": "011100100100011", "D": "110101101101110", "E": "111100110100111", "F": "111100110100100",
    "H": "101101111101101", "I": "111010010010111", "L": "100100100100111",
    "M": "101111111101101", "N": "110101101101101", "O": "010101101101010",
    "P": "110101110100100", "R": "110101110101101", "S": "011100010001110",
    "T": "111010010010010", "U": "101101101101111",
}


def _text(image: np.ndarray, x: int, y: int, text: str, scale: int = 2):
    for k, ch in enumerate(text):
        glyph = np.array([int(b) for b in _GLYPHS[ch]], bool).reshape(5, 3)
        block = np.kron(glyph, np.ones((scale, scale), bool))
        x0 = x + k * 4 * scale
        region = image[y:y + block.shape[0], x0:x0 + block.shape[1]]
        region[block[: region.shape[0], : region.shape[1]]] = 0


def _line(image: np.ndarray, p0, p1, color, width: int = 1):
    n = int(max(abs(p1[0] - p0[0]), abs(p1[1] - p0[1]))) + 1
    xs = np.linspace(p0[0], p1[0], n).round().astype(int)
    ys = np.linspace(p0[1], p1[1], n).round().astype(int)
    for dx in range(-(width // 2), width - width // 2):
        for dy in range(-(width // 2), width - width // 2):
            x = np.clip(xs + dx, 0, image.shape[1] - 1)
            y = np.clip(ys + dy, 0, image.shape[0] - 1)
            image[y, x] = color


RECALL_COLOR, SUBSTITUTION_COLOR, RUN_COLOR = (30, 80, 200), (240, 140, 20), (220, 30, 30)


def det_image(points: list[dict], operating: dict | None = None) -> np.ndarray:
    """A DET plot, (H, W, 3) uint8: x false alarms per hour of keyword-free audio (log,
    0.1-1000; none at all is drawn at 0.1), y 0-100%: recall in blue and the substitution rate
    beside it in orange, one point per threshold; the operating point's recall in red. The x
    axis is titled and the three colours named below it."""
    h, w, left, bottom, top, right = 380, 480, 60, 60, 14, 30
    image = np.full((h, w, 3), 255, np.uint8)
    x_range = (-1.0, 3.0)

    def xy(fa, rate):
        fx = (np.log10(max(fa, 10 ** x_range[0])) - x_range[0]) / (x_range[1] - x_range[0])
        return left + fx * (w - left - right), h - bottom - rate * (h - bottom - top)

    for decade, label in zip(range(-1, 4), ("0.1", "1", "10", "100", "1000")):
        x, _ = xy(10.0 ** decade, 1.0)
        _line(image, (x, top), (x, h - bottom), (220, 220, 220))
        _text(image, int(x) - 4 * len(label), h - bottom + 8, label)
    for rate, label in ((0.0, "0%"), (0.25, "25%"), (0.5, "50%"), (0.75, "75%"), (1.0, "100%")):
        _, y = xy(1.0, rate)
        _line(image, (left, y), (w - right, y), (220, 220, 220))
        _text(image, 4, int(y) - 5, label)
    _line(image, (left, top), (left, h - bottom), (0, 0, 0))
    _line(image, (left, h - bottom), (w - right, h - bottom), (0, 0, 0))
    title = "FALSE ALARMS PER HOUR"
    _text(image, (left + w - right) // 2 - 4 * len(title), h - bottom + 24, title)
    x = left
    for name, color in (("RECALL", RECALL_COLOR), ("SUBSTITUTIONS", SUBSTITUTION_COLOR),
                        ("RUN THRESHOLD", RUN_COLOR)):
        _line(image, (x, h - 13), (x + 14, h - 13), color, width=4)
        _text(image, x + 20, h - 18, name)
        x += 20 + 8 * len(name) + 24
    for key, color in (("substitution_rate", SUBSTITUTION_COLOR), ("recall", RECALL_COLOR)):
        curve = sorted((p["false_alarms_per_hour"], p[key]) for p in points)
        for a, b in zip(curve, curve[1:]):
            _line(image, xy(*a), xy(*b), color, width=2)
        for p in curve:
            _line(image, xy(*p), xy(*p), color, width=5)
    if operating:
        point = xy(operating["false_alarms_per_hour"], operating["recall"])
        _line(image, point, point, RUN_COLOR, width=9)
    return image


def write_png(path: "str | Path", image: np.ndarray, description: str = ""):
    """An 8-bit RGB PNG, written with zlib and struct (no imaging library needed)."""
    import struct
    import zlib

    image = np.ascontiguousarray(image, dtype=np.uint8)
    h, w, _ = image.shape
    rows = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, w * 3)], axis=1)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    if description:
        png += chunk(b"tEXt", b"Description\x00" + description.encode("latin-1", "replace"))
    png += chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


# ----------------------------------------------------------------------------- the command

def _rss_bytes() -> int:
    """Resident memory now (Linux /proc), else the peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _state_max(detector: Detector) -> float:
    return max(float(np.abs(s).max()) for s in detector.state.arrays()[1:])


def evaluate(model, data: Path, split: str, minutes: float, seeds: list[int], words, threshold,
             window_s: list[float], refractory_s: float, peak_wait_s: float,
             long_window_s: float | None, det_png: Path | None, speech_cache: Path | None,
             mic: Microphone = Microphone(), choose: bool = False,
             false_alarm_limit: float = MAX_FALSE_ALARMS_PER_HOUR,
             false_alarm_margin: int = FALSE_ALARM_MARGIN_STEPS) -> dict:
    """One stream per seed through a Detector with the first readout window, scored together;
    the DET curve and operating point of every window in `window_s`, from the same logits;
    with `choose`, per-word thresholds for the first window (`choose_thresholds`). The operating
    point and the choice keep within `false_alarm_limit` per keyword-free hour, the choice with
    its `false_alarm_margin`."""
    clips = read_split(data, split)
    noise = read_noise(data, split)
    # One engine for every stream and replay: building it from the torch model costs a pass
    # over the weights and the start state's half second of silence.
    engine = StreamEngine.from_model(model)
    runs = []
    for seed in seeds:
        detector = Detector(engine, threshold=threshold, words=words, window_s=window_s[0],
                            refractory_s=refractory_s, peak_wait_s=peak_wait_s,
                            long_window_s=long_window_s)
        runs.append(run_stream(detector, stream_slots(clips, noise, minutes * 60, seed, split,
                                                      speech_cache=speech_cache, mic=mic),
                               record_logits=True))
    tallies = [score(r.detections, r.placements, words, r.seconds) for r in runs]
    result = sum(tallies, Tally()).summary()
    readouts = []
    for w in window_s:
        points = det_curve(engine, runs, words, w, refractory_s, peak_wait_s,
                           long_window_s=long_window_s)
        readouts.append({"window_s": w, "operating_point": operating_point(points, false_alarm_limit),
                         "det_curve": points})
    used = detector.thresholds
    result.update({
        "split": split, "minutes": sum(r.seconds for r in runs) / 60, "seeds": list(seeds),
        **mic.report(),
        "threshold": used.popitem()[1] if len(set(used.values())) == 1 else used,
        "window_s": window_s[0], "long_window_s": detector.long_window_s, "refractory_s": refractory_s,
        "peak_wait_s": peak_wait_s, "words": list(words),
        "real_time_factor": sum(r.compute_seconds for r in runs) / sum(r.seconds for r in runs),
        "per_seed": [{"seed": seed, **{k: t.summary()[k] for k in DET_KEYS}}
                     for seed, t in zip(seeds, tallies)],
        "limits": {"false_alarms_per_hour": false_alarm_limit,
                   "substitution_rate": MAX_SUBSTITUTION_RATE},
        "det_curve": readouts[0]["det_curve"],
        "operating_point": readouts[0]["operating_point"],
    })
    if len(readouts) > 1:
        result["readouts"] = readouts
    if choose:
        result["chosen_thresholds"] = choose_thresholds(engine, runs, words, window_s[0],
                                                        refractory_s, peak_wait_s,
                                                        long_window_s=long_window_s,
                                                        max_false_alarms_per_hour=false_alarm_limit,
                                                        false_alarm_margin=false_alarm_margin)
    result.update(clip_accuracy(model, clips, seeds[0], mic=mic))
    if det_png:
        write_png(det_png, det_image(result["det_curve"], result),
                  "DET curve of kws eval-stream: x false alarms per hour of keyword-free audio "
                  "(log); y recall (blue) and substitution rate (orange); red: the run's threshold")
        result["det_png"] = str(det_png)
    return result


def long_run_check(model, data: Path, split: str, minutes: float, seeds: list[int], words,
                   threshold, window_s: list[float], refractory_s: float, peak_wait_s: float,
                   long_window_s: float | None, speech_cache: Path | None, compare_minutes: float,
                   mic: Microphone = Microphone()) -> dict:
    """One stream of `minutes`: the same `compare_minutes` of audio at its start and its end,
    other audio between. Passes when memory stays within 5 MB after the first compare window
    and the end scores no worse than the start (same audio, so only the carried state differs)."""
    if minutes < 2 * compare_minutes:
        raise KwsError(f"--long-run-check needs --minutes of at least twice the compared "
                       f"{compare_minutes:g} minutes")
    clips, noise = read_split(data, split), read_noise(data, split)
    compare_s, total_s = compare_minutes * 60, minutes * 60
    seed = seeds[0]

    def part(seconds: float, part_seed: int, start_s: float = 0.0):
        return stream_slots(clips, noise, seconds, part_seed, split, start_s=start_s,
                            speech_cache=speech_cache, mic=mic)

    def slots():
        return itertools.chain(part(compare_s, seed), part(total_s - 2 * compare_s, seed + 1, compare_s),
                               part(compare_s, seed, total_s - compare_s))

    # A first pass renders every sentence into the cache, so that the memory watched is the
    # detector's and the stream's, not the TTS engines'.
    for _ in slots():
        pass
    detector = Detector(model, threshold=threshold, words=words, window_s=window_s[0],
                        refractory_s=refractory_s, peak_wait_s=peak_wait_s, long_window_s=long_window_s)
    memory, state_max = [], []

    def watch(d: Detector):
        memory.append((d.time_s, _rss_bytes()))
        state_max.append((d.time_s, _state_max(d)))

    run = run_stream(detector, slots(), on_slot=watch)
    baseline = next(rss for t, rss in memory if t >= compare_s)
    growth = max(rss for t, rss in memory if t >= compare_s) - baseline
    first = score(run.detections, run.placements, words, run.seconds, (0, compare_s)).summary()
    last = score(run.detections, run.placements, words, run.seconds,
                 (total_s - compare_s, total_s)).summary()
    no_worse = (last["recall"] >= first["recall"]
                and last["substitution_rate"] <= first["substitution_rate"]
                and last["false_alarms_per_hour"] <= first["false_alarms_per_hour"])
    return {
        "minutes": run.seconds / 60, "compare_minutes": compare_minutes, **mic.report(),
        "long_window_s": detector.long_window_s,
        "rss_after_warmup_bytes": baseline, "rss_growth_bytes": growth,
        "memory_flat": growth <= MEMORY_TOLERANCE_BYTES,
        "state_max_first": max(v for t, v in state_max if t <= compare_s),
        "state_max_last": max(v for t, v in state_max if t > total_s - compare_s),
        "first": {k: first[k] for k in SUMMARY_KEYS},
        "last": {k: last[k] for k in SUMMARY_KEYS},
        "no_worse": no_worse,
        "real_time_factor": run.compute_seconds / run.seconds,
        "passed": growth <= MEMORY_TOLERANCE_BYTES and no_worse,
    }


def _describe(p: dict) -> str:
    return (f"recall {p['recall']:.1%}, substitutions {p['substitution_rate']:.1%}, "
            f"false alarms/hour {p['false_alarms_per_hour']:.2f}")


def _thresholds_text(threshold) -> str:
    if isinstance(threshold, dict):
        return "per word (" + ", ".join(f"{w} {t:g}" for w, t in threshold.items()) + ")"
    return f"{threshold:g}"


def json_text(result, indent: int | None = None) -> str:
    """Standard JSON (RFC 8259 has no NaN): a rate with nothing to count over, such as false
    alarms on speech in streams that hold none, or latency without a hit, is null."""
    def clean(x):
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x
    return json.dumps(clean(result), indent=indent, allow_nan=False)


def _rate_text(rate: float) -> str:
    return "none heard" if math.isnan(rate) else f"{rate:.2f}/hour"


def _print_report(r: dict):
    print(f"streams: {r['minutes']:.1f} min of the {r['split']} split (seeds "
          f"{', '.join(map(str, r['seeds']))}), {r['keywords']} keywords, threshold "
          f"{_thresholds_text(r['threshold'])}, window {r['window_s']} s"
          + (f" and {r['long_window_s']:g} s" if r['long_window_s'] else "")
          + f", refractory {r['refractory_s']} s, peak wait {r['peak_wait_s']} s"
          + Microphone.of_report(r).describe())
    print(f"keywords: {r['hits']} hits ({r['recall']:.1%}), {r['substitutions']} substitutions "
          f"({r['substitution_rate']:.1%}), {r['misses']} misses")
    print(f"false alarms: {r['false_alarms']} in {r['keyword_free_hours']:.2f} h of keyword-free "
          f"audio = {_rate_text(r['false_alarms_per_hour'])} (on speech "
          f"{_rate_text(r['false_alarms_per_hour_speech'])}, on noise "
          f"{_rate_text(r['false_alarms_per_hour_noise'])})")
    print("latency after the word's end: " + ("none (no hits)" if not r["hits"] else
          f"median {r['latency_ms_median']:.0f} ms, p90 {r['latency_ms_p90']:.0f} ms"))
    limits = (f"<= {r['limits']['false_alarms_per_hour']:g} false alarms/hour and "
              f"<= {r['limits']['substitution_rate']:.0%} substitutions")
    for readout in r.get("readouts", [{"window_s": r["window_s"],
                                       "operating_point": r["operating_point"]}]):
        best = readout["operating_point"]
        print(f"window {readout['window_s']:g} s, best within {limits}: "
              + (f"threshold {best['threshold']}: {_describe(best)}" if best else "none"))
    if "chosen_thresholds" in r:
        chosen = r["chosen_thresholds"]
        print(f"per-word thresholds, best within {limits}: "
              + (f"{_thresholds_text(chosen['thresholds'])}: {_describe(chosen)}" if chosen else "none"))
    print(f"clip accuracy over {r['clips']} clips: state reset {r['clip_accuracy_reset']:.1%}, "
          f"carried {r['clip_accuracy_carried']:.1%}")
    if "det_png" in r:
        print(f"DET curve: {r['det_png']}")


def _print_long_run(r: dict):
    print(f"long run: {r['minutes']:.0f} min, memory growth after warm-up "
          f"{r['rss_growth_bytes'] / 2**20:.2f} MB ({'flat' if r['memory_flat'] else 'NOT flat'}), "
          f"largest state value {r['state_max_first']:.3f} first vs {r['state_max_last']:.3f} last")
    for name in ("first", "last"):
        s = r[name]
        print(f"  {name} {r['compare_minutes']:g} min, {s['keywords']} keywords: {_describe(s)}")
    print("passed" if r["passed"] else "FAILED")


def default_words(model, threshold) -> list[str]:
    """The words `kws listen` reports by default: the model's own threshold words, and any named
    in a per-word threshold; for a checkpoint without thresholds, the 17 well-covered words."""
    own = list(model.thresholds) or [w for w in WELL_COVERED if w in model.cfg.labels]
    return reported_words(own, threshold)


def eval_stream(args) -> int:
    from kws.cli import check_writable, load

    if args.compare_minutes and not args.long_run_check:
        raise KwsError("--compare-minutes is for --long-run-check: add it, or leave --compare-minutes out")
    if args.false_alarm_margin is not None and not args.choose_thresholds:
        raise KwsError("--false-alarm-margin is for --choose-thresholds: add it, or leave "
                       "--false-alarm-margin out")
    if args.false_alarm_limit is not None and args.long_run_check:
        raise KwsError("--false-alarm-limit sets the operating point and --choose-thresholds, "
                       "which --long-run-check does not report: leave one out")
    # Before the streams run, not after: a run can take an hour.
    for flag, path in {"--det-png": args.det_png, "--choose-thresholds": args.choose_thresholds}.items():
        if path and not args.long_run_check:
            check_writable(Path(path), flag)
    torch.set_num_threads(args.threads)
    model = load(args.model)
    words = args.words or default_words(model, args.threshold)
    common = dict(model=model, data=Path(args.data), split=args.split, minutes=args.minutes,
                  seeds=args.seed, words=words, threshold=args.threshold,
                  window_s=args.window_s, refractory_s=args.refractory_s,
                  peak_wait_s=args.peak_wait_s, long_window_s=args.long_window_s,
                  speech_cache=Path(args.speech_cache) if args.speech_cache else None,
                  mic=Microphone(args.gain_db, args.band_hz, args.room_rt60, args.dc_offset))
    if args.long_run_check:
        result = long_run_check(**common, compare_minutes=args.compare_minutes or DEFAULT_COMPARE_MINUTES)
        if args.json:
            print(json_text(result))
        else:
            _print_long_run(result)
        return 0 if result["passed"] else 1
    result = evaluate(**common, det_png=Path(args.det_png) if args.det_png else None,
                      choose=bool(args.choose_thresholds),
                      false_alarm_limit=args.false_alarm_limit or MAX_FALSE_ALARMS_PER_HOUR,
                      false_alarm_margin=(FALSE_ALARM_MARGIN_STEPS if args.false_alarm_margin is None
                                          else args.false_alarm_margin))
    if args.json:
        print(json_text(result))
    else:
        _print_report(result)
    if args.choose_thresholds:
        return _write_thresholds(args.choose_thresholds, result, args.model or "the shipped model")
    return 0


def _write_thresholds(path: str, result: dict, model: str) -> int:
    """The chosen per-word thresholds, with what they were chosen on and what they gave there,
    as `--threshold FILE` and `kws export --thresholds FILE` read them; 1 when none met the limits."""
    chosen = result["chosen_thresholds"]
    if chosen is None:
        print(f"kws eval-stream: no per-word thresholds on the grid meet the limits; "
              f"{path} not written", file=sys.stderr)
        return 1
    record = {"thresholds": chosen["thresholds"], "model": model,
              "chosen_on": {k: result[k] for k in ("split", "minutes", "seeds", "words", "window_s",
                                                   "long_window_s", "refractory_s", "peak_wait_s",
                                                   "limits")},
              "result": {k: v for k, v in chosen.items() if k != "thresholds"}}
    out = Path(path)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json_text(record, indent=1) + "\n")
    tmp.replace(out)
    print(f"kws eval-stream: per-word thresholds written to {path}", file=sys.stderr)
    return 0


def _numbers(kind, what: str):
    """A parser for comma-separated positive numbers of `kind` (what --seed and --window-s take)."""
    def parse(text: str) -> list:
        try:
            values = [kind(t) for t in text.split(",") if t.strip()]
        except ValueError:
            values = []
        if not values or any(v < 0 for v in values) or (kind is float and 0 in values):
            raise KwsError(f"{text!r}: give {what} separated by commas")
        return values
    return parse


def register(sub):
    from kws.listen import argument, band_hz, dc_offset, gain_db, non_negative, positive, room_rt60

    p = sub.add_parser("eval-stream", help="hits, substitutions, misses, false alarms per hour "
                       "and latency on long test streams through the live detection path")
    p.add_argument("--model", help="PyTorch checkpoint (.pt; default: $KWS_MODEL or the "
                   "shipped one)")
    p.add_argument("--data", required=True, help="Speech Commands folder (official layout)")
    p.add_argument("--split", default="testing", choices=("validation", "testing"),
                   help="which speakers' clips and which end of the noise recordings (testing)")
    p.add_argument("--minutes", type=positive(float), default=10.0,
                   help="length of each stream (10)")
    p.add_argument("--seed", type=argument(_numbers(int, "seeds (integers >= 0)")), default=[0],
                   help="one stream per seed, scored together, e.g. 0,1,2 (0)")
    p.add_argument("--words", type=argument(parse_words),
                   help="keywords, comma separated (default: as kws listen, the words the "
                   "model has thresholds for and those named in --threshold; the 17 "
                   "well-covered words for a checkpoint without thresholds)")
    p.add_argument("--threshold", type=argument(parse_threshold), help="detection probability "
                   "for every word, per word (yes=0.9,no=0.7), or a JSON file of per-word "
                   "thresholds (default: the model's own, chosen on validation streams; "
                   f"{DEFAULT_THRESHOLD} for a model without them)")
    p.add_argument("--window-s", type=argument(_numbers(float, "seconds (> 0)")),
                   default=[DEFAULT_WINDOW_S], help=f"seconds of logits averaged into a score "
                   f"({DEFAULT_WINDOW_S:g}); more than one, e.g. 1,0.5: the first runs, each "
                   "gets a DET curve and operating point from the same logits")
    p.add_argument("--long-window-s", type=non_negative,
                   help="0 for none; else a word's score is the lower of its score over the window "
                        "and over this many seconds (default: the model's own, the readout its "
                        "thresholds were chosen with; 1.25 s for the shipped model)")
    p.add_argument("--refractory-s", type=non_negative, default=DEFAULT_REFRACTORY_S,
                   help=f"after a detection, how long nothing fires ({DEFAULT_REFRACTORY_S:g})")
    p.add_argument("--peak-wait-s", type=non_negative, default=DEFAULT_PEAK_WAIT_S,
                   help=f"how long a detection may wait for its score's peak ({DEFAULT_PEAK_WAIT_S:g})")
    p.add_argument("--speech-cache", help="folder of rendered non-keyword sentences "
                   "(default ~/.cache/kws/speech)")
    p.add_argument("--det-png", default="det.png", help="where to draw the DET curve "
                   "(default det.png; '' for none)")
    p.add_argument("--choose-thresholds", metavar="JSON", help="also choose per-word thresholds "
                   "for the scored words: the highest recall within the limits (by default 1 "
                   "false alarm per keyword-free hour, 5%% substitutions) on these streams (use the "
                   "validation split and many seeds: the default's took 96, as a set chosen "
                   "on 24 raised twice its false alarms on other streams); write them to "
                   "JSON, for --threshold and kws export")
    p.add_argument("--false-alarm-limit", type=positive(float), metavar="PER_HOUR",
                   help=f"false alarms per keyword-free hour that the operating point and "
                        f"--choose-thresholds may spend ({MAX_FALSE_ALARMS_PER_HOUR:g}); a set "
                        f"chosen on validation streams raises more on others, so choose below "
                        f"the rate you can accept")
    p.add_argument("--false-alarm-margin", type=int, choices=range(len(CHOICE_GRID)),
                   metavar="STEPS", help="with --choose-thresholds: charge each set with the false "
                   "alarms it would raise with every threshold this many steps lower on the grid "
                   f"({', '.join(f'{t:g}' for t in CHOICE_GRID)}), so that the limit holds on "
                   f"other streams too ({FALSE_ALARM_MARGIN_STEPS}; 0 for none)")
    p.add_argument("--long-run-check", action="store_true", help="instead: check that memory "
                   "stays flat and detection does not degrade over --minutes (use >= 60)")
    p.add_argument("--compare-minutes", type=positive(float),
                   help=f"with --long-run-check: minutes compared at the start and the end "
                        f"({DEFAULT_COMPARE_MINUTES:g})")
    p.add_argument("--gain-db", type=gain_db, default=0.0, metavar="DB",
                   help="play the whole stream this many dB louder, or quieter if negative (clipped "
                        "at full scale): how detection copes with a quiet or a hot microphone (0)")
    p.add_argument("--band-hz", type=band_hz, metavar="LOW,HIGH",
                   help="play the whole stream through a band-pass filter (Butterworth, 4th order each "
                        "side), e.g. 300,3400 (a telephone) or 500,8000 (a small microphone that loses "
                        "the bass); 0 as LOW: no bass cut (default: the whole band)")
    p.add_argument("--dc-offset", type=dc_offset, default=0.0, metavar="FRACTION",
                   help="add this offset (a fraction of full scale, e.g. 0.01) to the whole stream: a "
                        "microphone or ADC that sits off zero (0)")
    p.add_argument("--room-rt60", type=room_rt60, metavar="SECONDS",
                   help="play the whole stream in a synthetic room whose reverberation falls 60 dB in SECONDS, "
                        "the talker at the critical distance (as much reverberant sound as direct), "
                        "e.g. 0.3 (a furnished living room) or 0.8 (a bare kitchen) (default: as recorded)")
    p.add_argument("--threads", type=positive(int), default=1, help="torch threads (1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=eval_stream)
