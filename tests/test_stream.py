"""The streaming Detector: smoothing, thresholds, refractory period, chunking, long streams."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import noisy_bursts
from kws.audio import DcBlocker
from kws.labels import BACKGROUND, LABELS
from kws.errors import KwsError
from kws.model import MGRADE, load_model, preset
from kws.runtime import StreamEngine
from kws.stream import DEFAULT_THRESHOLD, Detector, detect, parse_threshold

STRIDE = 160
STEPS_PER_S = 100
BG = LABELS.index(BACKGROUND)


class ScriptedModel:
    """A stand-in engine whose per-step logits are spelled out by the audio itself: a step of
    160 samples whose value is k + 1 gives logit 8 for label k and 0 elsewhere, and silence (0)
    gives the background (the last label). It streams like the StreamEngine (unconsumed samples
    carried), so it exercises the Detector alone."""

    labels, stride = LABELS, STRIDE
    thresholds = {}  # no per-word thresholds of its own: DEFAULT_THRESHOLD for every word
    long_window_s = 0.0  # and no long window of its own

    def start_state(self):
        return [np.zeros(0, np.float32)]  # no memory: silence leaves nothing behind

    def stream(self, samples, state):
        audio = np.concatenate([state[0], samples])
        steps = len(audio) // STRIDE
        index = np.abs(audio[1: steps * STRIDE:STRIDE]).round().astype(int) - 1  # (see script)
        return 8.0 * np.eye(len(LABELS), dtype=np.float32)[index], [audio[steps * STRIDE:]]


def script(*segments) -> np.ndarray:
    """Audio for ScriptedModel from (label, seconds) pairs: each label's value with alternating
    signs, so that it passes the Detector's DC blocker (within 0.03) as speech would. The
    blocker's first sample is always 0 (the mean so far is that sample): ScriptedModel reads the
    second sample of each step."""
    values = np.concatenate([np.full(round(s * 16000), LABELS.index(label) + 1, np.float32)
                             for label, s in segments])
    return values * np.where(np.arange(len(values)) % 2, -1.0, 1.0).astype(np.float32)


def test_a_held_word_gives_one_detection_with_its_label_and_time():
    audio = script((BACKGROUND, 2.0), ("yes", 0.8), (BACKGROUND, 2.0))
    found = detect(ScriptedModel(), audio, threshold=0.8, peak_wait_s=0.2)
    assert [d.label for d in found] == ["yes"]
    # The score crosses 0.8 once about two thirds of the last second is "yes" (at 2.67 s) and
    # peaks when the window holds all 0.8 s of the word: reported by the end of the 0.2-s wait.
    assert 2.8 <= found[0].time_s <= 2.87 + 1e-9
    assert found[0].score == pytest.approx(peak_score(0.8))
    # With a shorter wait it is reported sooner, with the score reached by then.
    [early] = detect(ScriptedModel(), audio, threshold=0.8, peak_wait_s=0.05)
    assert early.time_s == pytest.approx(2.72) and 0.8 <= early.score < found[0].score


def peak_score(fraction: float) -> float:
    """ScriptedModel's word score when `fraction` of the 1-s window is the word, the rest
    background."""
    word, background, others = np.exp(8 * fraction), np.exp(8 * (1 - fraction)), len(LABELS) - 2
    return word / (word + background + others)


def test_nothing_fires_before_the_score_window_has_filled_once():
    # A fraction of a second of a word at the very start scores high over the few steps seen.
    assert detect(ScriptedModel(), script(("yes", 0.2), (BACKGROUND, 2.0)), threshold=0.8) == []
    found = detect(ScriptedModel(), script(("yes", 0.9), (BACKGROUND, 2.0)), threshold=0.8)
    # The window fills at 1.0 s with the score at its peak; it falls one step later.
    assert [d.label for d in found] == ["yes"] and found[0].time_s == pytest.approx(1.01)
    assert found[0].score == pytest.approx(peak_score(0.9))


def test_background_alone_gives_no_detection():
    assert detect(ScriptedModel(), script((BACKGROUND, 10.0)), threshold=0.5) == []


def test_words_limits_the_reported_labels():
    audio = script((BACKGROUND, 1.5), ("yes", 0.8), (BACKGROUND, 1.5), ("no", 0.8),
                   (BACKGROUND, 1.5))
    assert [d.label for d in detect(ScriptedModel(), audio, threshold=0.8)] == ["yes", "no"]
    assert [d.label for d in detect(ScriptedModel(), audio, threshold=0.8, words=["no"])] == ["no"]


def test_per_word_thresholds_apply_to_their_word_only():
    audio = script((BACKGROUND, 1.5), ("yes", 0.6), (BACKGROUND, 1.5), ("no", 0.6),
                   (BACKGROUND, 1.5))
    found = detect(ScriptedModel(), audio, threshold={"yes": 0.99, "no": 0.3})
    assert [d.label for d in found] == ["no"]


class TunedScriptedModel(ScriptedModel):
    thresholds = {"yes": 0.5}  # as a model file with per-word thresholds of its own carries them


def test_a_models_own_thresholds_are_the_default_and_a_given_threshold_overrides_them():
    # "yes" held 0.7 s of a 1-s window peaks near 0.86: under DEFAULT_THRESHOLD, over 0.5
    audio = script((BACKGROUND, 1.5), ("yes", 0.7), (BACKGROUND, 1.5), ("no", 0.7),
                   (BACKGROUND, 1.5))
    assert [d.label for d in detect(ScriptedModel(), audio)] == []
    assert [d.label for d in detect(TunedScriptedModel(), audio)] == ["yes"]
    assert Detector(TunedScriptedModel()).thresholds == {"yes": 0.5}
    assert Detector(TunedScriptedModel(), words=["yes", "no"]).thresholds["no"] == DEFAULT_THRESHOLD
    assert [d.label for d in detect(TunedScriptedModel(), audio, threshold=0.95)] == []
    # a per-word map overrides only the words it names
    assert [d.label for d in detect(TunedScriptedModel(), audio, threshold={"no": 0.5})] == ["yes", "no"]


def test_a_model_with_thresholds_of_its_own_reports_only_those_words_unless_asked_for_more():
    # each word held a whole second scores about 0.99; the model has no threshold of its own
    # for "no", so it is reported only when --words (or a per-word threshold) names it
    audio = script((BACKGROUND, 1.5), ("yes", 1.0), (BACKGROUND, 1.5), ("no", 1.0),
                   (BACKGROUND, 1.5))
    assert [d.label for d in detect(TunedScriptedModel(), audio)] == ["yes"]
    assert [d.label for d in detect(TunedScriptedModel(), audio, threshold=0.9)] == ["yes"]
    assert [d.label for d in detect(TunedScriptedModel(), audio, threshold=0.9,
                                    words=["yes", "no"])] == ["yes", "no"]
    assert [d.label for d in detect(ScriptedModel(), audio, threshold=0.9)] == ["yes", "no"]  # no set: every word


def test_a_thresholds_file_is_read_as_per_word_thresholds(tmp_path):
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"thresholds": {"yes": 0.9, "no": 0.75}, "command": "kws ..."}))
    assert parse_threshold(str(path)) == {"yes": 0.9, "no": 0.75}
    assert parse_threshold("0.8") == 0.8 and parse_threshold("yes=0.9") == {"yes": 0.9}
    # an empty item is skipped, as --words skips one
    assert parse_threshold("yes=0.5,,no=0.3,") == {"yes": 0.5, "no": 0.3}


@pytest.mark.parametrize("content, message", [
    (None, "cannot read thresholds"), ("{not json", "not a JSON file"),
    ('{"yes": 0.9}', "no per-word thresholds"), ('{"thresholds": {"yes": "high"}}', "no per-word thresholds")])
def test_a_missing_or_malformed_thresholds_file_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "thresholds.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(KwsError, match=message):
        parse_threshold(str(path))


def test_refractory_period_suppresses_a_second_word_right_after_a_detection():
    audio = script((BACKGROUND, 1.5), ("yes", 0.9), ("no", 0.9), (BACKGROUND, 3.0))
    short = detect(ScriptedModel(), audio, threshold=0.6, refractory_s=0.0)
    long = detect(ScriptedModel(), audio, threshold=0.6, refractory_s=3.0)
    assert [d.label for d in short] == ["yes", "no"]
    assert [d.label for d in long] == ["yes"]


def test_a_word_held_past_the_refractory_period_fires_once():
    # Still above threshold when the refractory period ends: it must fall below to re-arm.
    audio = script((BACKGROUND, 1.0), ("yes", 3.0), (BACKGROUND, 1.0))
    assert len(detect(ScriptedModel(), audio, threshold=0.8, refractory_s=0.2)) == 1


def test_smoothing_window_length_changes_when_a_word_is_confident_enough():
    audio = script((BACKGROUND, 2.0), ("yes", 0.4), (BACKGROUND, 2.0))
    assert detect(ScriptedModel(), audio, threshold=0.8, window_s=1.0) == []
    assert [d.label for d in detect(ScriptedModel(), audio, threshold=0.8, window_s=0.3)] == ["yes"]


def test_a_long_window_keeps_a_sustained_word_and_drops_a_brief_one():
    """With the 1-s window alone, 0.9 s and 0.7 s of a word both reach 0.8 (0.97 and 0.86);
    over 1.25 s the brief one scores 0.57, so with the long window only the sustained one fires."""
    sustained = script((BACKGROUND, 2.0), ("yes", 0.9), (BACKGROUND, 2.0))
    brief = script((BACKGROUND, 2.0), ("yes", 0.7), (BACKGROUND, 2.0))
    for audio in (sustained, brief):
        assert [d.label for d in detect(ScriptedModel(), audio, threshold=0.8)] == ["yes"]
    [found] = detect(ScriptedModel(), sustained, threshold=0.8, long_window_s=1.25, peak_wait_s=0.5)
    assert found.label == "yes" and found.score == pytest.approx(0.88, abs=0.01)
    assert detect(ScriptedModel(), brief, threshold=0.8, long_window_s=1.25) == []


def test_with_a_long_window_scores_are_the_lower_of_the_two_windows_softmax():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3, (400, len(LABELS))).astype(np.float32)
    detector, seen = Detector(ScriptedModel(), window_s=0.5, long_window_s=1.25), 0

    def softmax_of_mean(rows):
        mean = rows.astype(np.float64).mean(axis=0)
        return np.exp(mean - mean.max()) / np.exp(mean - mean.max()).sum()

    for n in [1, 7, 30, 2, 100, 60, 200]:
        detector.process_logits(logits[seen:seen + n])
        seen += n
        expected = np.minimum(softmax_of_mean(logits[max(0, seen - 50):seen]),
                              softmax_of_mean(logits[max(0, seen - 125):seen]))
        np.testing.assert_allclose(list(detector.scores.values()), expected, rtol=1e-9, atol=1e-12)


def test_scores_computed_once_and_decided_in_pieces_give_what_the_logits_give():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 3, (600, len(LABELS))).astype(np.float32)
    logits[200:300, LABELS.index("yes")] += 12.0
    logits[400:480, LABELS.index("no")] += 12.0
    settings = dict(threshold=0.6, window_s=0.5, long_window_s=1.25, peak_wait_s=0.2)
    expected = Detector(ScriptedModel(), **settings).process_logits(logits, last=True)
    assert [d.label for d in expected] == ["yes", "no"]

    # A detector part-way through a stream gives a stream's scores from its start ...
    detector, twin = Detector(ScriptedModel(), **settings), Detector(ScriptedModel(), **settings)
    detector.process_logits(logits[:250])
    twin.process_logits(logits[:250])
    scores = detector.stream_scores(logits)
    # ... and goes on as if it had not been asked.
    assert detector.process_logits(logits[250:], last=True) == twin.process_logits(logits[250:], last=True)
    assert detector.scores == twin.scores

    fresh, found, seen = Detector(ScriptedModel(), **settings), [], 0
    for n in [90, 1, 250, 259]:
        found += fresh.process_scores(scores[seen:seen + n], last=seen + n == len(scores))
        seen += n
    assert found == expected


def test_a_long_window_no_longer_than_the_window_is_a_user_error():
    with pytest.raises(KwsError, match="longer than the window"):
        Detector(ScriptedModel(), window_s=1.0, long_window_s=0.8)


class LongWindowScriptedModel(ScriptedModel):
    long_window_s = 1.25  # as a model file whose thresholds were chosen with a long window


def test_a_models_own_long_window_is_the_default_and_a_given_one_overrides_it():
    brief = script((BACKGROUND, 2.0), ("yes", 0.7), (BACKGROUND, 2.0))
    assert Detector(LongWindowScriptedModel()).long_window_s == 1.25
    assert detect(LongWindowScriptedModel(), brief, threshold=0.8) == []  # as with 1.25 given
    found = detect(LongWindowScriptedModel(), brief, threshold=0.8, long_window_s=0)
    assert [d.label for d in found] == ["yes"]
    with pytest.raises(KwsError, match=r"long window \(1.25 s, the model's own\)"):
        Detector(LongWindowScriptedModel(), window_s=1.5)


def rising_and_falling(word_logits: dict[str, list[float]], before: int = 10,
                       after: int = 10) -> np.ndarray:
    """Per-step logits: background, then each word's logit per step (others 0), then
    background. With a one-step window a word's score is e^a / (e^a + 35)."""
    steps = len(next(iter(word_logits.values())))
    logits = np.zeros((before + steps + after, len(LABELS)), np.float32)
    logits[:before, BG] = logits[before + steps:, BG] = 8.0
    for word, values in word_logits.items():
        logits[before:before + steps, LABELS.index(word)] = values
    return logits


def one_step_score(a: float) -> float:
    return np.exp(a) / (np.exp(a) + len(LABELS) - 1)


def test_a_detection_reports_the_peak_score_when_the_score_falls():
    logits = rising_and_falling({"yes": [5, 6, 7, 6, 5]})  # crosses 0.8 at 5, peaks at 7
    found = Detector(ScriptedModel(), threshold=0.8, window_s=0.01,
                     peak_wait_s=0.2).process_logits(logits)
    assert [d.label for d in found] == ["yes"]
    assert found[0].score == pytest.approx(one_step_score(7))
    assert found[0].time_s == pytest.approx(0.14)  # step 13, the first below the peak


def test_the_peak_wait_bounds_how_late_a_rising_score_is_reported():
    logits = rising_and_falling({"yes": [5, 6, 7, 6, 5]})
    at_crossing = Detector(ScriptedModel(), threshold=0.8, window_s=0.01, peak_wait_s=0.0)
    one_step = Detector(ScriptedModel(), threshold=0.8, window_s=0.01, peak_wait_s=0.01)
    [crossed] = at_crossing.process_logits(logits)
    [waited] = one_step.process_logits(logits)
    assert (crossed.time_s, crossed.score) == pytest.approx((0.11, one_step_score(5)))
    assert (waited.time_s, waited.score) == pytest.approx((0.12, one_step_score(6)))


def test_a_word_that_overtakes_the_candidate_before_its_report_is_the_one_reported():
    logits = rising_and_falling({"no": [5, 4], "off": [0, 7]})
    found = Detector(ScriptedModel(), threshold=0.8, window_s=0.01,
                     peak_wait_s=0.2).process_logits(logits)
    assert [(d.label, d.time_s) for d in found] == [("off", pytest.approx(0.13))]


def test_following_the_peak_does_not_depend_on_how_the_logits_are_split():
    logits = rising_and_falling({"yes": [5, 6, 7, 7, 7, 6], "go": [0, 0, 0, 0, 12, 0]})
    whole = Detector(ScriptedModel(), threshold=0.8, window_s=0.01,
                     peak_wait_s=0.2).process_logits(logits)
    detector, steps = Detector(ScriptedModel(), threshold=0.8, window_s=0.01, peak_wait_s=0.2), []
    for row in logits:
        steps += detector.process_logits(row[None])
    assert steps == whole and [d.label for d in whole] == ["go"]


def test_flush_reports_a_word_at_the_very_end_of_a_stream_dated_at_its_end():
    audio = script((BACKGROUND, 2.0), ("yes", 0.8))
    detector = Detector(ScriptedModel(), threshold=0.8, peak_wait_s=0.2)
    assert detector.process(audio) == []  # still rising when the audio ends
    [found] = detector.flush()
    assert (found.label, found.time_s) == ("yes", pytest.approx(2.8))
    assert found.score == pytest.approx(peak_score(0.8))
    assert detector.time_s == pytest.approx(2.8)


def test_a_stream_of_a_single_clip_is_reported_when_flushed():
    audio = script((BACKGROUND, 0.3), ("left", 0.6), (BACKGROUND, 0.1))  # 1 s in all
    assert [d.label for d in detect(ScriptedModel(), audio, threshold=0.6)] == ["left"]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=40).filter(lambda c: sum(c) > 800))
def test_detections_do_not_depend_on_chunk_sizes(chunks):
    audio = script((BACKGROUND, 0.7), ("up", 0.8), ("down", 0.9), (BACKGROUND, 1.2), ("up", 0.7),
                   (BACKGROUND, 0.5))
    expected = detect(ScriptedModel(), audio, chunk_samples=len(audio), threshold=0.7,
                      refractory_s=0.3)
    detector, found, start = Detector(ScriptedModel(), threshold=0.7, refractory_s=0.3), [], 0
    for i in range(0, 10_000):
        n = chunks[i % len(chunks)]
        found += detector.process(audio[start:start + n])
        start += n
        if start >= len(audio):
            break
    assert found == expected
    assert len(expected) == 3
    assert detector.time_s == pytest.approx(len(audio) / 16000)


def test_scores_and_time_follow_the_stream_and_reset_clears_them():
    detector = Detector(ScriptedModel())
    detector.process(script((BACKGROUND, 0.5), ("go", 1.0)))
    assert max(detector.scores, key=detector.scores.get) == "go"
    assert detector.time_s == pytest.approx(1.5)
    detector.reset()
    assert detector.time_s == 0.0
    assert max(detector.scores.values()) == 0.0
    found = detector.process(script(("go", 1.0))) + detector.flush()
    assert found == detect(ScriptedModel(), script(("go", 1.0)))


def test_unknown_words_and_bad_thresholds_are_user_errors():
    with pytest.raises(KwsError, match="unknown word"):
        Detector(ScriptedModel(), words=["yes", "banana"])
    with pytest.raises(KwsError, match="unknown word"):
        Detector(ScriptedModel(), threshold={"banana": 0.5})
    for bad in (1.5, 0.0, -0.1):
        with pytest.raises(KwsError, match=rf"threshold {bad:g} is not a probability in \(0, 1\]"):
            Detector(ScriptedModel(), threshold=bad)
    for bad in (1.5, 0.0):  # at 0 a word would be reported with a score of 0
        with pytest.raises(KwsError, match=rf"threshold for 'yes' is {bad}; thresholds are probabilities in \(0, 1\]"):
            Detector(ScriptedModel(), threshold={"yes": bad})
    with pytest.raises(KwsError, match="mono"):
        Detector(ScriptedModel()).process(np.zeros((10, 2), np.float32))


def test_a_threshold_for_an_unknown_word_names_the_threshold_even_where_it_names_the_words(tiny_model):
    engine = StreamEngine.from_model(tiny_model)
    engine.thresholds = {"yes": 0.9, "no": 0.9}  # a model with its own words: they come from the threshold too
    with pytest.raises(KwsError, match=r"^threshold: unknown word\(s\) 'banana'"):
        Detector(engine, threshold={"banana": 0.5})


def test_a_threshold_for_a_word_the_words_leave_out_is_refused_not_dropped(tiny_model):
    with pytest.raises(KwsError, match="names 'stop', which the words listened for leave out"):
        Detector(tiny_model, words=["yes"], threshold={"stop": 0.5})
    assert Detector(tiny_model, words=["yes", "stop"], threshold={"stop": 0.5}).thresholds["stop"] == 0.5


# ----------------------------------------------------------------------------- a real model

@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return MGRADE(preset("edge", LABELS, n_layers=2, width=16)).eval()


def test_scores_are_the_softmax_of_the_mean_of_the_last_window_of_logits():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (400, len(LABELS))).astype(np.float32)
    detector, seen = Detector(ScriptedModel(), window_s=0.5), 0
    for n in [1, 7, 30, 2, 100, 60, 200]:
        detector.process_logits(logits[seen:seen + n])
        seen += n
        mean = logits[max(0, seen - 50):seen].astype(np.float64).mean(axis=0)
        expected = np.exp(mean - mean.max()) / np.exp(mean - mean.max()).sum()
        np.testing.assert_allclose(list(detector.scores.values()), expected, rtol=1e-9, atol=1e-12)


def test_real_model_detections_equal_in_any_chunking(tiny_model):
    audio = noisy_bursts(4.0, seed=1)
    kwargs = dict(threshold=0.04, refractory_s=0.3)
    reference = detect(tiny_model, audio, chunk_samples=len(audio), **kwargs)
    assert reference, "the threshold must be low enough for the random model to fire"
    for chunk in (101, 512, 1600, 16000):
        found = detect(tiny_model, audio, chunk_samples=chunk, **kwargs)
        assert [(d.label, d.time_s) for d in found] == [(d.label, d.time_s) for d in reference]
        assert [d.score for d in found] == pytest.approx([d.score for d in reference], abs=1e-4)


def test_state_stays_bounded_and_detections_repeat_over_a_long_stream(tiny_model):
    # The same 20 s at the start and after 100 s of other audio: after the first 3
    # seconds (the score window and the state) nothing may remember how the stream got there.
    repeated = noisy_bursts(20.0, seed=2)
    audio = np.concatenate([repeated, noisy_bursts(100.0, seed=3), repeated])
    detector = Detector(tiny_model, threshold=0.04, refractory_s=0.3)
    found, peak = [], 0.0
    for start in range(0, len(audio), 16000):
        found += detector.process(audio[start:start + 16000])
        peak = max(peak, max(float(np.abs(s).max()) for s in detector.state.arrays()))
        assert all(np.isfinite(s).all() for s in detector.state.arrays())
    assert peak < 100.0
    end_offset = (len(audio) - len(repeated)) / 16000
    first = [(d.label, round(d.time_s, 2)) for d in found if 3.0 < d.time_s <= 20.0]
    last = [(d.label, round(d.time_s - end_offset, 2)) for d in found
            if d.time_s > end_offset + 3.0]
    assert first and first == last


def test_a_stream_starts_where_classify_does_after_context_silence(tiny_edge_model_path):
    """The detector's first logits are those of the model continuing from 0.5 s of silence,
    as every training clip came after some audio (on the audio without its DC offset); reset()
    returns there."""
    model = load_model(tiny_edge_model_path)
    audio = DcBlocker().process(noisy_bursts(1.0, seed=3))
    with torch.inference_mode():
        expected, _ = model.stream(torch.from_numpy(audio)[None], model.primed_state(1))
        from_zeros, _ = model.stream(torch.from_numpy(audio)[None], model.initial_state(1))
    assert not torch.allclose(expected, from_zeros, atol=1e-4)  # the start state matters
    detector = Detector(model)
    for _ in range(2):
        detector.process(noisy_bursts(1.0, seed=3))
        np.testing.assert_allclose(detector.last_logits, expected[0].numpy(), rtol=1e-5, atol=1e-5)
        detector.reset()


def test_a_microphone_off_zero_is_heard_as_one_at_zero_from_the_first_block(tiny_edge_model_path):
    model = load_model(tiny_edge_model_path)
    audio = noisy_bursts(10.0, seed=1)

    def logits(samples):  # in the blocks listen feeds
        detector, out = Detector(model), []
        for i in range(0, len(samples), 512):
            detector.process(samples[i:i + 512])
            out.append(detector.last_logits)
        return np.concatenate(out)

    at_zero = logits(audio)
    for offset in (0.01, -0.05):  # cheap ADCs and MEMS microphones sit this far off zero
        assert np.abs(logits(audio + offset) - at_zero).max() < 1e-4
