"""`kws eval-stream`: stream building, scoring, the DET picture and the command."""

import json
import struct
import zlib

import numpy as np
import pytest
import soundfile as sf

import kws.stream_eval
from kws.audio import Microphone, reverberate, through_band
from kws.cli import main
from kws.data import read_noise, read_split
from conftest import tiny_model
from kws.stream import Detection, Detector
from kws.speech import (KEYWORD_SOUNDS, NEAR_MISS_VOCABULARY, SPEECH, TRAINING_VOCABULARY, VOCABULARY,
                        sentence, spoken, training_sentences)
from kws.labels import BACKGROUND, LABELS, WELL_COVERED, WORDS
from kws.stream_eval import (CHOICE_GRID, FALSE_ALARM_MARGIN_STEPS, Placement, StreamRun, Tally,
                             choose_thresholds, default_words, det_curve, det_image, json_text,
                             operating_point, score, stream_slots, word_bounds, write_png)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A tiny Speech Commands layout: tone 'words' of four labels, two noise recordings."""
    root = tmp_path_factory.mktemp("speech_commands")
    rng = np.random.default_rng(0)
    listed = []
    for k, word in enumerate(("yes", "no", "up", "bed")):
        (root / word).mkdir()
        for i in range(3):
            t = np.arange(16000) / 16000
            clip = np.zeros(16000, np.float32)
            on = (t > 0.3) & (t < 0.7)
            clip[on] = 0.3 * np.sin(2 * np.pi * (300 + 200 * k) * t[on])
            name = f"{word}/spk{i}_nohash_0.wav"
            sf.write(root / name, clip, 16000)
            listed.append(name)
    (root / "testing_list.txt").write_text("\n".join(listed) + "\n")
    (root / "validation_list.txt").write_text("")
    (root / "_background_noise_").mkdir()
    for name in ("white", "pink"):
        noise = rng.standard_normal(16000 * 30).astype(np.float32) * 0.1
        sf.write(root / "_background_noise_" / f"{name}.wav", noise, 16000)
    return root


def test_word_bounds_find_the_loud_part_of_a_clip():
    clip = np.zeros(16000, np.float32)
    clip[4800:11200] = np.sin(np.arange(6400) * 0.3)
    start, end = word_bounds(clip + 1e-4)
    assert abs(start - 4800) <= 160 and abs(end - 11200) <= 160


def test_stream_slots_are_seeded_and_place_each_word_and_sentence_where_its_audio_is(dataset,
                                                                                   tmp_path):
    clips, noise = read_split(dataset, "testing"), read_noise(dataset, "testing")
    a = list(stream_slots(clips, noise, 60.0, seed=3, split="testing", speech_cache=tmp_path))
    b = list(stream_slots(clips, noise, 60.0, seed=3, split="testing", speech_cache=tmp_path))
    c = list(stream_slots(clips, noise, 60.0, seed=4, split="testing", speech_cache=tmp_path))
    audio = np.concatenate([s[0] for s in a])
    placements = [p for s in a for p in s[1]]
    assert len(audio) == 60 * 16000
    assert np.array_equal(audio, np.concatenate([s[0] for s in b]))
    assert not np.array_equal(audio, np.concatenate([s[0] for s in c]))
    labels = [p.label for p in placements]
    assert labels.count(SPEECH) >= 1 and len(labels) - labels.count(SPEECH) >= 4
    assert set(labels) <= {"yes", "no", "up", "bed", SPEECH}
    for p in placements:
        word = audio[int(p.start_s * 16000):int(p.end_s * 16000)]
        before = audio[int((p.start_s - 0.2) * 16000):int(p.start_s * 16000)]
        if p.label != SPEECH:
            assert 0.35 < p.end_s - p.start_s < 0.45  # the 0.4-s tone
        assert rms(word) > 1.5 * rms(before)  # SNR >= 5 dB


def test_testing_streams_hold_other_sentences_than_validation_streams_of_the_same_seed(
        dataset, tmp_path, monkeypatch):
    drawn = []

    def spy(seed, cache):
        drawn.append(seed)
        return spoken(seed, cache)

    monkeypatch.setattr(kws.stream_eval, "spoken", spy)
    clips, noise = read_split(dataset, "testing"), read_noise(dataset, "testing")
    sentences, placed = {}, {}
    for split in ("validation", "testing"):
        drawn.clear()
        slots = list(stream_slots(clips, noise, 60.0, seed=3, split=split, speech_cache=tmp_path))
        sentences[split] = set(drawn)
        placed[split] = [(round(p.start_s, 2), p.label == SPEECH) for s in slots for p in s[1]]
    assert sentences["validation"] and not sentences["validation"] & sentences["testing"]
    # Only the sentences differ: which slot holds a word or a sentence is the seed's alone.
    assert [kind for _, kind in placed["validation"]] == [kind for _, kind in placed["testing"]]


def test_a_stream_played_quieter_is_the_same_stream_that_many_db_down(dataset, tmp_path):
    clips, noise = read_split(dataset, "testing"), read_noise(dataset, "testing")
    as_made = list(stream_slots(clips, noise, 30.0, seed=3, split="testing", speech_cache=tmp_path))
    quiet = list(stream_slots(clips, noise, 30.0, seed=3, split="testing", speech_cache=tmp_path, mic=Microphone(-20.0)))
    assert [s[1] for s in quiet] == [s[1] for s in as_made]  # the same words at the same times
    loud = np.concatenate([s[0] for s in as_made])
    assert np.abs(loud).max() < 1.0  # nothing clipped, so the quiet one is exactly a tenth
    np.testing.assert_allclose(np.concatenate([s[0] for s in quiet]), loud / 10, rtol=1e-6, atol=1e-9)


def test_a_stream_through_a_band_is_each_slot_of_the_same_stream_filtered_to_it(dataset, tmp_path):
    clips, noise = read_split(dataset, "testing"), read_noise(dataset, "testing")
    as_made = list(stream_slots(clips, noise, 30.0, seed=3, split="testing", speech_cache=tmp_path))
    banded = list(stream_slots(clips, noise, 30.0, seed=3, split="testing", speech_cache=tmp_path, mic=Microphone(band_hz=(500, 8000))))
    assert [s[1] for s in banded] == [s[1] for s in as_made]
    for (filtered, _), (original, _) in zip(banded, as_made):
        np.testing.assert_allclose(filtered, through_band(original, 500, 8000), atol=1e-6)
    assert rms(np.concatenate([s[0] for s in banded])) < rms(np.concatenate([s[0] for s in as_made]))


def test_a_stream_in_a_room_is_each_slot_of_the_same_stream_in_that_room(dataset, tmp_path):
    clips, noise = read_split(dataset, "testing"), read_noise(dataset, "testing")
    as_made = list(stream_slots(clips, noise, 30.0, seed=3, split="testing", speech_cache=tmp_path))
    mic = Microphone(room_rt60_s=0.5)
    in_room = list(stream_slots(clips, noise, 30.0, seed=3, split="testing", speech_cache=tmp_path, mic=mic))
    assert [s[1] for s in in_room] == [s[1] for s in as_made]
    for (heard, _), (original, _) in zip(in_room, as_made):
        np.testing.assert_allclose(heard, reverberate(original, mic.room), atol=1e-6)
        assert rms(heard) == pytest.approx(rms(original), rel=1e-3)  # the room keeps each slot's level


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def test_score_tells_hits_substitutions_misses_and_false_alarms_apart():
    placements = [Placement("yes", 1.0, 1.5), Placement("no", 5.0, 5.4), Placement("up", 9.0, 9.3),
                  Placement("cat", 12.0, 12.5), Placement(SPEECH, 15.0, 17.0),
                  Placement("go", 25.0, 25.5)]
    detections = [
        Detection(1.7, "yes", 0.9),  # hit, 200 ms after the word
        Detection(1.9, "yes", 0.9),  # again in the same window: an extra detection
        Detection(5.3, "up", 0.9),  # another word in "no"'s window: a substitution
        Detection(9.6, "up", 0.9),  # hit, 300 ms
        Detection(12.2, "yes", 0.9),  # in "cat"'s window, a word not among the chosen
        Detection(16.0, "go", 0.9),  # during the sentence: a false alarm on speech
        Detection(17.8, "go", 0.9),  # within a second after it: still caused by speech
        Detection(20.0, "go", 0.9),  # nothing there: a false alarm on noise
    ]  # "go" at 25 s is never detected: a miss
    s = score(detections, placements, words=["yes", "no", "up", "go"], seconds=3600).summary()
    assert (s["keywords"], s["hits"], s["substitutions"], s["misses"]) == (4, 2, 1, 1)
    assert s["recall"] == pytest.approx(0.5) and s["substitution_rate"] == pytest.approx(0.25)
    assert (s["false_alarms_speech"], s["false_alarms_noise"]) == (2, 1)
    keyword_free = 3600 - (1.5 + 1.4 + 1.3 + 1.5 + 1.5)  # each word's window: start to end + 1 s
    assert s["keyword_free_hours"] == pytest.approx(keyword_free / 3600)
    assert s["false_alarms_per_hour"] == pytest.approx(3 * 3600 / keyword_free)
    assert s["false_alarms_per_hour_speech"] == pytest.approx(2 * 3600 / 3.0)
    assert s["false_alarms_per_hour_noise"] == pytest.approx(3600 / (keyword_free - 3.0))
    assert s["extra_detections_in_word_windows"] == 1 and s["detections_on_other_words"] == 1
    assert s["latency_ms_median"] == pytest.approx(250)
    assert s["recall_per_word"] == {"go": 0.0, "no": 0.0, "up": 1.0, "yes": 1.0}
    late = score(detections, placements, ["yes", "no", "up"], 3600, window=(4.0, 3600)).summary()
    assert (late["keywords"], late["hits"], late["substitutions"]) == (2, 1, 1)


def test_a_word_heard_right_and_wrong_is_a_hit_with_an_extra_detection():
    placements = [Placement("no", 5.0, 5.4)]
    detections = [Detection(5.3, "go", 0.9), Detection(5.5, "no", 0.95)]
    s = score(detections, placements, ["no", "go"], 60).summary()
    assert (s["hits"], s["substitutions"], s["extra_detections_in_word_windows"]) == (1, 0, 1)


def test_streams_scored_together_pool_their_counts():
    placements = [Placement("yes", 1.0, 1.5), Placement("no", 5.0, 5.4)]
    one = score([Detection(1.7, "yes", 0.9), Detection(30.0, "no", 0.9)], placements,
                ["yes", "no"], 60)
    two = score([Detection(5.6, "no", 0.9)], placements, ["yes", "no"], 60)
    pooled = (one + two).summary()
    assert (pooled["keywords"], pooled["hits"], pooled["false_alarms"]) == (4, 2, 1)
    assert pooled["hours"] == pytest.approx(120 / 3600)
    assert pooled["latency_ms_median"] == pytest.approx(200)  # of 200 and 200 ms


def test_the_operating_point_is_the_best_recall_within_both_limits():
    points = [{"threshold": t, "recall": r, "substitution_rate": sub, "false_alarms_per_hour": fa}
              for t, r, sub, fa in ((0.5, 0.95, 0.08, 0.5), (0.7, 0.9, 0.04, 3.0),
                                    (0.8, 0.85, 0.04, 1.0), (0.9, 0.85, 0.02, 0.0),
                                    (0.95, 0.7, 0.01, 0.0))]
    assert operating_point(points)["threshold"] == 0.9  # 0.5: substitutions; 0.7: alarms
    assert operating_point(points, max_substitution_rate=0.1)["threshold"] == 0.5
    assert operating_point(points, max_false_alarms_per_hour=0.0,
                           max_substitution_rate=0.0) is None


class RecordedLogits:
    """A stand-in engine for replays, which read only recorded logits."""
    labels, stride, thresholds, long_window_s = LABELS, 160, {}, 0.0

    def start_state(self):
        return None


def held(segments) -> np.ndarray:
    """Per-step logits (100 a second) from (label, seconds) pairs: 8 for the label, 0 elsewhere."""
    steps = [LABELS.index(label) for label, s in segments for _ in range(round(100 * s))]
    return 8.0 * np.eye(len(LABELS), dtype=np.float32)[steps]


def close_call_stream(seconds: float | None = None) -> StreamRun:
    """Held 0.7 s of the 1-s window, a word's score peaks near 0.86; 0.75 s near 0.91; 0.85 s
    near 0.96. "yes" is spoken at 0.86; "no" is spoken at 0.96 and fires on keyword-free audio at
    0.91. `seconds`: the stream's length (default: its logits'), the rest keyword-free audio."""
    segments = [(BACKGROUND, 2.0), ("yes", 0.7), (BACKGROUND, 3.0), ("no", 0.85),
                (BACKGROUND, 3.0), ("no", 0.75), (BACKGROUND, 3.0)]
    placements = [Placement("yes", 2.0, 2.7), Placement("no", 5.7, 6.55)]
    logits = held(segments)
    return StreamRun([], placements, seconds or len(logits) / 100, logits, 0.0)


def test_chosen_thresholds_keep_each_words_hits_and_drop_its_false_alarms():
    # "yes" needs a low threshold; "no"'s must sit between its false alarm (0.91) and its spoken
    # 0.96 (a margin would refuse so close a call: the margin test below).
    run = close_call_stream()
    chosen = choose_thresholds(RecordedLogits(), [run], ["yes", "no"], 1.0, 1.0, 0.05,
                               false_alarm_margin=0)
    assert chosen["thresholds"] == {"yes": 0.8, "no": 0.95}
    assert chosen["recall"] == 1.0 and chosen["false_alarms_per_hour"] == 0
    assert chosen["recall_per_word"] == {"no": 1.0, "yes": 1.0}
    # With one global threshold no setting has both words and no false alarm.
    points = det_curve(RecordedLogits(), [run], ["yes", "no"], 1.0, 1.0, 0.05)
    assert max(p["recall"] for p in points if p["false_alarms_per_hour"] == 0) == 0.5


def hit_for_a_false_alarm_stream(seconds: float) -> StreamRun:
    """"yes" held 0.7 s (its score peaks near 0.86) is heard only at 0.8, where a word-like
    moment with no word in it fires too: one hit for one false alarm. "no" peaks near 0.96. The
    rest of the `seconds` counts as keyword-free audio."""
    segments = [(BACKGROUND, 2.0), ("yes", 0.7), (BACKGROUND, 3.0), ("yes", 0.7),
                (BACKGROUND, 3.0), ("no", 0.85), (BACKGROUND, 3.0)]
    placements = [Placement("yes", 2.0, 2.7), Placement("no", 8.7, 9.55)]
    return StreamRun([], placements, seconds, held(segments), 0.0)


def test_the_false_alarm_budget_the_prices_leave_is_spent_on_more_hits():
    # The move to "yes" 0.8 (one hit for one false alarm) is one no price of FALSE_ALARM_PRICES
    # takes (at 1 hit a false alarm it ties, and a tie keeps the higher threshold).
    def chosen_over(seconds):
        run = hit_for_a_false_alarm_stream(seconds)
        return choose_thresholds(RecordedLogits(), [run], ["yes", "no"], 1.0, 1.0, 0.05)

    two_hours = chosen_over(7200.0)  # one false alarm is 0.5 an hour: within the limit
    assert two_hours["thresholds"] == {"yes": 0.8, "no": 0.95}
    assert two_hours["recall"] == 1.0 and two_hours["false_alarms_per_hour"] == pytest.approx(0.5, rel=1e-3)
    one_hour = chosen_over(3600.0)  # just over 1 an hour: the move is refused
    assert one_hour["thresholds"] == {"yes": CHOICE_GRID[-1], "no": 0.95}
    assert one_hour["recall"] == 0.5 and one_hour["false_alarms_per_hour"] == 0


def test_a_looser_false_alarm_limit_buys_the_hit_that_costs_a_false_alarm():
    # One keyword-free hour: at 1 an hour the move to "yes" 0.8 (one hit for one false alarm,
    # just over 1 an hour) is refused; at 2 an hour it is taken.
    run = hit_for_a_false_alarm_stream(3600.0)
    loose = choose_thresholds(RecordedLogits(), [run], ["yes", "no"], 1.0, 1.0, 0.05,
                              max_false_alarms_per_hour=2.0)
    assert loose["thresholds"] == {"yes": 0.8, "no": 0.95} and loose["recall"] == 1.0
    assert 1.0 < loose["false_alarms_per_hour"] <= 2.0


def test_a_false_alarm_margin_charges_a_word_with_the_false_alarms_a_step_below_its_threshold():
    # "no" fires on keyword-free audio at 0.91 and is spoken at 0.96. Its threshold 0.95 raises
    # no false alarm, but one grid step lower (0.9) it would: with a margin of one step that set
    # is refused, and "no" is given up. "yes" (0.86, no false alarm at any threshold) keeps 0.8.
    run = close_call_stream()
    plain = choose_thresholds(RecordedLogits(), [run], ["yes", "no"], 1.0, 1.0, 0.05,
                              false_alarm_margin=0)
    assert plain["thresholds"]["no"] == 0.95 and plain["false_alarms_per_hour_charged"] == 0
    careful = choose_thresholds(RecordedLogits(), [run], ["yes", "no"], 1.0, 1.0, 0.05,
                                false_alarm_margin=1)
    assert careful["thresholds"]["yes"] == 0.8 and careful["thresholds"]["no"] > 0.96
    assert careful["recall"] == 0.5 and careful["false_alarm_margin"] == 1
    assert careful["false_alarms_per_hour"] == careful["false_alarms_per_hour_charged"] == 0
    # Over a long enough stream that one false alarm is within the limit, the margin lets
    # "no" keep 0.95, and reports the false alarm it was charged with beside the actual rate.
    careful = choose_thresholds(RecordedLogits(), [close_call_stream(7200.0)], ["yes", "no"], 1.0, 1.0, 0.05,
                                false_alarm_margin=1)
    assert careful["thresholds"] == {"yes": 0.8, "no": 0.95} and careful["recall"] == 1.0
    assert careful["false_alarms_per_hour"] == 0
    assert careful["false_alarms_per_hour_charged"] == pytest.approx(0.5, rel=1e-3)


def test_replays_compute_each_streams_readout_once_and_decide_it_at_every_threshold(monkeypatch):
    logits = held([(BACKGROUND, 2.0), ("yes", 0.85), (BACKGROUND, 3.0), ("no", 0.7), (BACKGROUND, 2.0)])
    placements = [Placement("yes", 2.0, 2.85), Placement("no", 5.85, 6.55)]
    runs = [StreamRun([], placements, len(logits) / 100, logits, 0.0) for _ in range(2)]
    computed = []
    stream_scores = Detector.stream_scores
    monkeypatch.setattr(Detector, "stream_scores",
                        lambda self, x: computed.append(self.window_steps) or stream_scores(self, x))
    points = det_curve(RecordedLogits(), runs, ["yes", "no"], 1.0, 1.0, 0.05)
    assert len(points) > 30 and computed == [100, 100]  # one readout per stream
    # Each point is what a fresh detector makes of the logits at its threshold.
    for p in points:
        detections = Detector(RecordedLogits(), threshold=p["threshold"], refractory_s=1.0,
                              peak_wait_s=0.05).process_logits(logits, last=True)
        summary = score(detections, placements, ["yes", "no"], len(logits) / 100).summary()
        assert {k: p[k] for k in ("recall", "substitution_rate", "false_alarms_per_hour")} == \
            {k: summary[k] for k in ("recall", "substitution_rate", "false_alarms_per_hour")}
    det_curve(RecordedLogits(), runs, ["yes", "no"], 0.5, 1.0, 0.05)  # another readout
    assert computed == [100, 100, 50, 50]


def test_no_thresholds_are_chosen_when_no_set_meets_the_limits():
    # a false alarm that outscores every threshold of the grid
    logits = held([(BACKGROUND, 2.0), ("yes", 1.0), (BACKGROUND, 3.0)])
    run = StreamRun([], [], len(logits) / 100, logits, 0.0)
    assert choose_thresholds(RecordedLogits(), [run], ["yes"], 1.0, 1.0, 0.05) is None


def test_sentences_hold_no_keyword_and_are_the_same_for_the_same_seed(tmp_path):
    assert not set(VOCABULARY) & set(WORDS)
    assert not set(VOCABULARY) & KEYWORD_SOUNDS
    assert sentence(5) == sentence(5) and sentence(5) != sentence(6)
    assert all(w in VOCABULARY for w in sentence(5).word.split())
    audio = spoken(5, tmp_path)
    assert 0.5 < len(audio) / 16000 < 6 and rms(audio) > 0.01
    assert np.array_equal(spoken(5, tmp_path), audio)  # read back from the cache
    assert len(list(tmp_path.iterdir())) == 1


def test_training_sentences_hold_no_keyword_and_no_word_of_the_streams_sentences(tmp_path):
    assert not set(TRAINING_VOCABULARY) & (set(WORDS) | KEYWORD_SOUNDS)
    assert not set(TRAINING_VOCABULARY) & set(VOCABULARY)  # what streams hold stays unheard
    audio = training_sentences(tmp_path, count=3)
    assert len(audio) == 3 and all(rms(a) > 0.01 for a in audio)
    for seed in range(3):
        assert all(w in TRAINING_VOCABULARY for w in sentence(seed, TRAINING_VOCABULARY).word.split())
    assert len(list(tmp_path.iterdir())) == 3
    assert all(np.array_equal(a, b) for a, b in zip(training_sentences(tmp_path, count=3), audio))


def test_near_miss_sentences_share_no_word_with_the_keywords_or_any_other_sentences(tmp_path):
    assert len(set(NEAR_MISS_VOCABULARY)) == len(NEAR_MISS_VOCABULARY)
    assert not set(NEAR_MISS_VOCABULARY) & (set(WORDS) | KEYWORD_SOUNDS)
    assert not set(NEAR_MISS_VOCABULARY) & (set(VOCABULARY) | set(TRAINING_VOCABULARY))
    audio = training_sentences(tmp_path, count=2, vocabulary=NEAR_MISS_VOCABULARY)
    assert len(audio) == 2 and all(rms(a) > 0.01 for a in audio)
    assert all(w in NEAR_MISS_VOCABULARY for w in sentence(1, NEAR_MISS_VOCABULARY).word.split())
    assert not np.array_equal(audio[0][:8000], training_sentences(tmp_path, count=1)[0][:8000])


def read_png(data: bytes) -> tuple[np.ndarray, dict]:
    """A minimal reader for what write_png writes: checks every CRC, returns pixels and text."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, text, size = 8, b"", {}, None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF
        if tag == b"IHDR":
            size = struct.unpack(">II", body[:8])
            assert body[8:] == bytes([8, 2, 0, 0, 0])
        elif tag == b"IDAT":
            idat += body
        elif tag == b"tEXt":
            key, value = body.split(b"\x00", 1)
            text[key.decode()] = value.decode("latin-1")
        pos += 12 + length
    w, h = size
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(h, w, 3), text


def test_png_writer_round_trips_pixels_and_description(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    write_png(tmp_path / "x.png", image, "hello")
    pixels, text = read_png((tmp_path / "x.png").read_bytes())
    assert np.array_equal(pixels, image) and text == {"Description": "hello"}


def test_det_image_draws_recall_substitutions_and_the_operating_point():
    points = [{"threshold": t, "recall": r, "substitution_rate": sub, "false_alarms_per_hour": f}
              for t, r, sub, f in ((0.5, 0.99, 0.3, 50.0), (0.8, 0.95, 0.1, 5.0),
                                   (0.95, 0.8, 0.02, 0.5))]
    image = det_image(points, {"recall": 0.95, "false_alarms_per_hour": 5.0})
    blue = (image[..., 2] > 150) & (image[..., 0] < 100)
    orange = (image[..., 0] > 200) & (image[..., 1] > 100) & (image[..., 2] < 60)
    red = (image[..., 0] > 200) & (image[..., 1] < 100)
    assert blue.sum() > 100 and orange.sum() > 100 and red.sum() > 20
    # Fewer false alarms lie further left: the curve's lowest-FA end is left of its highest.
    cols = np.flatnonzero(blue.any(axis=0))
    assert cols.max() - cols.min() > 150
    # Recall (near the top) lies above the substitution rate (near the bottom).
    assert np.flatnonzero(blue.any(axis=1)).mean() < np.flatnonzero(orange.any(axis=1)).mean()
    # Below the plot: the x axis's title (black) and a legend naming each colour.
    assert all(mask[-20:].any() for mask in (blue, orange, red))
    title = image[-40:-20]
    assert (title.sum(axis=2) == 0).sum() > 100  # black text


def reject_nan(constant):
    raise ValueError(f"{constant} is not JSON")


def test_rates_with_nothing_to_count_over_are_null_in_the_json():
    empty = Tally().summary()  # no keywords, no audio: every rate is undefined
    parsed = json.loads(json_text({"summary": empty, "points": [empty]}), parse_constant=reject_nan)
    assert parsed["summary"]["false_alarms_per_hour_speech"] is None
    assert parsed["points"][0]["latency_ms_median"] is None and parsed["summary"]["keywords"] == 0


def test_eval_stream_json_reports_the_issue_keys_and_writes_the_det_png(dataset, tiny_edge_model_path,
                                                                          tmp_path, capsys):
    png = tmp_path / "det.png"
    code = main(["eval-stream", "--model", str(tiny_edge_model_path), "--data", str(dataset),
                 "--minutes", "0.5", "--seed", "0,1", "--words", "yes,no,up", "--threshold",
                 "0.05", "--window-s", "1,0.5", "--speech-cache", str(tmp_path / "speech"),
                 "--det-png", str(png), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out, parse_constant=reject_nan)  # standard JSON
    for key in ("recall", "substitution_rate", "false_alarms_per_hour", "keyword_free_hours",
                "latency_ms_median", "latency_ms_p90", "false_alarms_per_hour_speech",
                "false_alarms_per_hour_noise", "false_accepts_per_hour", "clip_accuracy_carried",
                "clip_accuracy_reset", "det_curve", "operating_point"):
        assert key in result
    assert 0.0 <= result["recall"] <= 1.0 and result["false_alarms_per_hour"] >= 0
    assert result["hits"] + result["substitutions"] + result["misses"] == result["keywords"]
    assert 0 < result["keyword_free_hours"] < result["hours"] == pytest.approx(1 / 60)
    assert result["clips"] == 12 and result["minutes"] == pytest.approx(1.0)
    assert [s["seed"] for s in result["per_seed"]] == [0, 1]
    assert result["gain_db"] == 0.0
    assert [r["window_s"] for r in result["readouts"]] == [1.0, 0.5]
    assert result["det_curve"] == result["readouts"][0]["det_curve"]
    recalls = [p["recall"] for p in result["det_curve"]]
    assert recalls == sorted(recalls, reverse=True)  # a higher threshold never finds more
    # The replay at the run's own threshold gives the run's own figures.
    at_run = next(p for p in result["det_curve"] if p["threshold"] == 0.05)
    assert at_run["recall"] == result["recall"]
    assert at_run["false_alarms_per_hour"] == pytest.approx(result["false_alarms_per_hour"])
    assert any((tmp_path / "speech").iterdir())  # sentences were rendered into the cache
    read_png(png.read_bytes())


@pytest.mark.parametrize("flag, value, said, key, reported, bad, refusal", [
    ("--gain-db", "-20", "played -20 dB", "gain_db", -20.0, "-61", "-60 to 40 dB"),
    ("--band-hz", "300,3400", "through 300-3400 Hz", "band_hz", [300, 3400], "300,300", "LOW,HIGH in Hz"),
    ("--room-rt60", "0.5", "in a room of RT60 0.5 s", "room_rt60_s", 0.5, "3", "0.05 to 2 s"),
])
def test_eval_stream_through_another_microphone_says_so_and_reports_it(
        dataset, tiny_edge_model_path, tmp_path, capsys, flag, value, said, key, reported, bad, refusal):
    args = ["eval-stream", "--model", str(tiny_edge_model_path), "--data", str(dataset), "--minutes",
            "0.3", "--words", "yes,no,up", "--speech-cache", str(tmp_path), "--det-png", ""]
    assert main([*args, flag, value]) == 0
    assert said in capsys.readouterr().out
    assert main([*args, flag, value, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[key] == reported
    with pytest.raises(SystemExit) as stop:
        main([*args, f"{flag}={bad}"])
    assert stop.value.code == 2 and refusal in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--det-png", "--choose-thresholds"])
@pytest.mark.parametrize("where", ["under a file", "a folder"])
def test_eval_stream_with_an_output_it_cannot_write_exits_2_before_any_stream(
        dataset, tiny_edge_model_path, tmp_path, capsys, monkeypatch, flag, where):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    monkeypatch.setattr(kws.stream_eval, "evaluate", lambda *a, **k: pytest.fail("streams ran first"))
    path = {"under a file": blocker / "out", "a folder": tmp_path}[where]
    code = main(["eval-stream", "--model", str(tiny_edge_model_path), "--data", str(dataset), "--minutes", "0.3",
                 "--speech-cache", str(tmp_path), flag, str(path)])
    err = capsys.readouterr().err
    assert code == 2 and flag in err and err.count("\n") == 1 and "Traceback" not in err, err


def test_eval_stream_prints_each_error_type_for_a_reader(dataset, tiny_edge_model_path, tmp_path,
                                                         capsys):
    code = main(["eval-stream", "--model", str(tiny_edge_model_path), "--data", str(dataset),
                 "--minutes", "0.3", "--words", "yes,no,up", "--threshold", "0.05",
                 "--speech-cache", str(tmp_path), "--det-png", ""])
    out = capsys.readouterr().out
    assert code == 0
    for words in ("hits", "substitutions", "misses", "false alarms", "on speech", "on noise",
                  "latency after the word's end: ", "best within <= 1 false alarms/hour"):
        assert words in out, out


def test_chosen_thresholds_are_written_for_threshold_and_export_to_read(dataset, tiny_edge_model_path,
                                                                       tmp_path, capsys):
    chosen_file = tmp_path / "thresholds.json"
    args = ["eval-stream", "--model", str(tiny_edge_model_path), "--data", str(dataset),
            "--minutes", "0.3", "--words", "yes,no,up", "--speech-cache", str(tmp_path),
            "--det-png", "", "--json"]
    assert main(args + ["--choose-thresholds", str(chosen_file)]) == 0
    chosen = json.loads(capsys.readouterr().out)["chosen_thresholds"]
    record = json.loads(chosen_file.read_text())
    assert record["thresholds"] == chosen["thresholds"]
    assert set(record["thresholds"]) == {"yes", "no", "up"}
    assert set(record["thresholds"].values()) <= set(CHOICE_GRID)
    assert record["chosen_on"]["split"] == "testing" and record["chosen_on"]["seeds"] == [0]
    assert record["result"]["recall"] == chosen["recall"]
    assert record["result"]["false_alarm_margin"] == FALSE_ALARM_MARGIN_STEPS  # the default
    assert record["model"] == str(tiny_edge_model_path)
    # read back: the same streams at those thresholds give what the choice reported (the
    # actual rates, not the false alarms the margin charged)
    assert main(args + ["--threshold", str(chosen_file)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["threshold"] == record["thresholds"] or set(record["thresholds"].values()) == {result["threshold"]}
    assert result["recall"] == chosen["recall"]
    assert result["false_alarms_per_hour"] == pytest.approx(chosen["false_alarms_per_hour"])


def test_the_false_alarm_limit_and_margin_reach_the_operating_point_and_the_choice(
        dataset, tiny_edge_model_path, tmp_path, capsys, monkeypatch):
    seen = []
    choose, operating = kws.stream_eval.choose_thresholds, kws.stream_eval.operating_point
    monkeypatch.setattr(kws.stream_eval, "choose_thresholds", lambda *a, **k: seen.append(
        ("choice", k["max_false_alarms_per_hour"], k["false_alarm_margin"])) or choose(*a, **k))
    monkeypatch.setattr(kws.stream_eval, "operating_point", lambda points, limit: seen.append(
        ("operating point", limit)) or operating(points, limit))
    chosen_file = tmp_path / "chosen.json"
    code = main(["eval-stream", "--model", str(tiny_edge_model_path), "--data", str(dataset),
                 "--minutes", "0.3", "--words", "yes,no,up", "--speech-cache", str(tmp_path),
                 "--det-png", "", "--json", "--false-alarm-limit", "0.25",
                 "--false-alarm-margin", "2", "--choose-thresholds", str(chosen_file)])
    result = json.loads(capsys.readouterr().out)
    assert code in (0, 1) and seen == [("operating point", 0.25), ("choice", 0.25, 2)]
    assert result["limits"]["false_alarms_per_hour"] == 0.25
    if code == 0:
        record = json.loads(chosen_file.read_text())
        assert record["chosen_on"]["limits"]["false_alarms_per_hour"] == 0.25
        assert record["result"]["false_alarm_margin"] == 2


def test_a_false_alarm_margin_without_a_choice_is_refused_not_ignored(dataset, capsys):
    code = main(["eval-stream", "--data", str(dataset), "--false-alarm-margin", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "--choose-thresholds" in err and "Traceback" not in err


def test_a_false_alarm_limit_with_the_long_run_check_is_refused(dataset, tiny_edge_model_path, capsys):
    code = main(["eval-stream", "--model", str(tiny_edge_model_path), "--data", str(dataset),
                 "--long-run-check", "--false-alarm-limit", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "--false-alarm-limit" in err and "Traceback" not in err


def test_eval_stream_runs_the_models_own_long_window_and_records_it_with_the_choice(
        dataset, tiny_edge_model_path, tmp_path, capsys):
    (tmp_path / "t.json").write_text(json.dumps({"thresholds": {"yes": 0.9, "no": 0.9},
                                                 "chosen_on": {"long_window_s": 1.5}}))
    assert main(["export", str(tiny_edge_model_path), str(tmp_path / "long.pt"),
                 "--thresholds", str(tmp_path / "t.json")]) == 0
    args = ["eval-stream", "--model", str(tmp_path / "long.pt"), "--data", str(dataset),
            "--minutes", "0.3", "--speech-cache", str(tmp_path), "--det-png", "", "--json",
            "--threshold", "0.5", "--choose-thresholds", str(tmp_path / "chosen.json")]
    capsys.readouterr()
    main(args)
    assert json.loads(capsys.readouterr().out)["long_window_s"] == 1.5
    assert json.loads((tmp_path / "chosen.json").read_text())["chosen_on"]["long_window_s"] == 1.5
    main(args + ["--long-window-s", "0"])
    assert json.loads(capsys.readouterr().out)["long_window_s"] == 0.0


def test_long_run_check_reports_memory_and_start_versus_end(dataset, tiny_edge_model_path, capsys,
                                                            tmp_path):
    code = main(["eval-stream", "--model", str(tiny_edge_model_path), "--data", str(dataset),
                 "--minutes", "0.6", "--compare-minutes", "0.2", "--long-run-check",
                 "--speech-cache", str(tmp_path),
                 "--threshold", "0.05", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == (0 if result["passed"] else 1)
    assert result["first"]["keywords"] == result["last"]["keywords"] > 0  # the same audio
    assert np.isfinite(result["state_max_last"]) and result["rss_growth_bytes"] >= 0


def test_eval_stream_refuses_a_missing_dataset_with_a_clear_error(tiny_edge_model_path, tmp_path,
                                                                   capsys):
    code = main(["eval-stream", "--model", str(tiny_edge_model_path), "--data", str(tmp_path / "none")])
    assert code == 2 and "no dataset folder" in capsys.readouterr().err


def test_by_default_eval_stream_scores_the_words_the_listener_reports():
    model = tiny_model()
    assert default_words(model, None) == list(WELL_COVERED)  # a new checkpoint: no thresholds yet
    model.thresholds = {"yes": 0.9, "seven": 0.95}
    for threshold in (None, 0.5, {"marvin": 0.9}, {"yes": 0.8}):
        reported = Detector(model, threshold=threshold).thresholds
        assert sorted(default_words(model, threshold)) == sorted(reported)
    assert sorted(default_words(model, {"marvin": 0.9})) == ["marvin", "seven", "yes"]


@pytest.mark.parametrize("flag", ["--refractory-s", "--peak-wait-s", "--long-window-s"])
@pytest.mark.parametrize("value", ["-0.5", "inf", "soon"])
def test_eval_stream_refuses_a_time_that_is_not_zero_or_more_seconds(dataset, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as stop:
        main(["eval-stream", "--data", str(dataset), "--speech-cache", str(tmp_path), f"{flag}={value}"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and flag in err and "0 or more" in err


def test_compare_minutes_without_the_long_run_check_is_refused_not_ignored(dataset, tmp_path, capsys):
    code = main(["eval-stream", "--data", str(dataset), "--speech-cache", str(tmp_path), "--compare-minutes", "5"])
    err = capsys.readouterr().err
    assert code == 2 and "--compare-minutes is for --long-run-check" in err and err.count("\n") == 1
