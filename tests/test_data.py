"""The Speech Commands reader (splits, formats, lengths, errors), noise splitting, and the
seeded, class-balanced training batches."""

import collections

import numpy as np
import pytest
import soundfile as sf
import torch

from kws.audio import CLIP_SAMPLES, fit_length, load_audio
from kws.data import (NOISE_TRAIN_FRACTION, DataError, TrainingBatches, load_clips, read_noise,
                      read_split, spectral_edit, word_bounds, word_tail)
from kws.labels import BACKGROUND, LABELS

BG = LABELS.index(BACKGROUND)


def relative(clips, root):
    return sorted(str(c.path.relative_to(root)) for c in clips)


# ----------------------------------------------------------------------------- read_split

@pytest.mark.parametrize("split", ["training", "validation", "testing"])
def test_read_split_returns_the_listed_clips_and_training_is_the_rest(speech_commands, split):
    clips = read_split(speech_commands.root, split)
    assert relative(clips, speech_commands.root) == sorted(speech_commands.splits[split])
    assert all(c.label == c.path.parent.name for c in clips)


def test_the_three_splits_do_not_overlap_and_cover_every_clip(speech_commands):
    root = speech_commands.root
    seen = [p for split in ("training", "validation", "testing") for p in relative(read_split(root, split), root)]
    assert len(seen) == len(set(seen)) == len(speech_commands.lengths)


def test_wav_and_flac_clips_are_both_read(speech_commands):
    clips = read_split(speech_commands.root, "training")
    suffixes = {c.path.suffix for c in clips}
    assert suffixes == {".wav", ".flac"}
    audio = load_clips(clips)
    for clip, row in zip(clips, audio):
        written = sf.read(clip.path, dtype="float32")[0]
        np.testing.assert_array_equal(row, fit_length(written, CLIP_SAMPLES))


def test_a_folder_whose_testing_list_names_every_clip_reads_as_a_testing_split(make_speech_commands):
    fx = make_speech_commands(counts={"yes": (3, 0, 0), "stop": (2, 0, 0)})
    everything = sorted(fx.lengths)
    (fx.root / "testing_list.txt").write_text("\n".join(everything) + "\n")
    (fx.root / "validation_list.txt").unlink()
    assert relative(read_split(fx.root, "testing"), fx.root) == everything
    with pytest.raises(DataError, match="training split .* is empty"):
        read_split(fx.root, "training")


def test_list_files_with_windows_line_endings_and_spaces_in_names_are_read(make_speech_commands):
    fx = make_speech_commands(counts={"yes": (1, 1, 2)})
    spaced = fx.splits["testing"][0].replace("_nohash_", " take ")
    (fx.root / fx.splits["testing"][0]).rename(fx.root / spaced)
    testing = [spaced] + fx.splits["testing"][1:]
    (fx.root / "testing_list.txt").write_text("".join(f"{p}\r\n" for p in testing))
    assert relative(read_split(fx.root, "testing"), fx.root) == sorted(testing)
    assert spaced not in relative(read_split(fx.root, "training"), fx.root)


def test_an_unknown_split_is_a_data_error_naming_the_choices(speech_commands):
    with pytest.raises(DataError, match="unknown split 'train'.*training, validation, testing"):
        read_split(speech_commands.root, "train")


def test_a_missing_folder_is_a_data_error_naming_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="no dataset folder at .*nowhere"):
        read_split(missing, "testing")


def test_a_folder_without_clips_is_a_data_error(tmp_path):
    (tmp_path / "yes").mkdir()
    with pytest.raises(DataError, match="no clips"):
        read_split(tmp_path, "training")


def test_an_empty_split_is_a_data_error_naming_the_split(make_speech_commands):
    fx = make_speech_commands(counts={"yes": (2, 0, 1)})
    with pytest.raises(DataError, match="the validation split .* is empty"):
        read_split(fx.root, "validation")


# ----------------------------------------------------------------------------- load_clips

def test_load_clips_pads_short_clips_and_trims_long_ones_to_one_second(speech_commands):
    clips = read_split(speech_commands.root, "training")
    audio = load_clips(clips)
    assert audio.shape == (len(clips), CLIP_SAMPLES) and audio.dtype == np.float32
    lengths = [speech_commands.lengths[str(c.path.relative_to(speech_commands.root))] for c in clips]
    assert min(lengths) < CLIP_SAMPLES < max(lengths)  # the fixture has both kinds
    for row, n in zip(audio, lengths):
        if n < CLIP_SAMPLES:
            assert not row[n:].any() and row[:n].any()
        else:
            assert row[-100:].any()


def test_load_clips_resamples_other_rates_to_16khz(tmp_path):
    (tmp_path / "yes").mkdir()
    path = tmp_path / "yes" / "a_nohash_0.wav"
    sf.write(path, np.full(4000, 0.25, np.float32), 8000)  # 0.5 s at 8 kHz
    from kws.data import Clip

    (row,) = load_clips([Clip(path, "yes")])
    assert np.abs(row[1000:7000] - 0.25).max() < 0.01  # 0.5 s of signal at 16 kHz...
    assert not row[8100:].any()  # ...then padding


@pytest.mark.parametrize("content", [b"", b"not audio at all" * 10])
def test_unreadable_audio_is_a_data_error_naming_the_file(make_speech_commands, content):
    fx = make_speech_commands(counts={"yes": (2, 0, 0)})
    broken = fx.root / fx.splits["training"][1]
    broken.write_bytes(content)
    with pytest.raises(DataError, match=f"{broken.name}.*cannot decode"):
        load_clips(read_split(fx.root, "training"))


# ----------------------------------------------------------------------------- read_noise

def test_noise_training_part_is_the_first_80_percent_and_evaluation_the_rest(speech_commands):
    training = read_noise(speech_commands.root, "training")
    held_out = read_noise(speech_commands.root, "testing")
    assert len(training) == len(held_out) == len(speech_commands.noise)
    for path, train_part, test_part in zip(sorted(speech_commands.noise), training, held_out):
        whole = load_audio(path)
        assert len(train_part) == int(len(whole) * NOISE_TRAIN_FRACTION)
        np.testing.assert_array_equal(np.concatenate([train_part, test_part]), whole)


def test_validation_noise_is_the_held_out_part_too(speech_commands):
    for a, b in zip(read_noise(speech_commands.root, "validation"), read_noise(speech_commands.root, "testing")):
        np.testing.assert_array_equal(a, b)


def test_noise_with_an_unknown_split_is_a_data_error(speech_commands):
    with pytest.raises(DataError, match="unknown split"):
        read_noise(speech_commands.root, "test")


def test_a_missing_noise_folder_is_a_data_error(make_speech_commands):
    fx = make_speech_commands(counts={"yes": (1, 0, 0)})
    for path in fx.noise:
        path.unlink()
    with pytest.raises(DataError, match="no noise recordings"):
        read_noise(fx.root)


# ----------------------------------------------------------------------------- TrainingBatches

@pytest.fixture(scope="module")
def training_arrays(speech_commands):
    clips = read_split(speech_commands.root, "training")
    return {"audio": load_clips(clips), "labels": [LABELS.index(c.label) for c in clips],
            "noise": read_noise(speech_commands.root, "training")}


def batches(arrays, seed=0, synth=0, **kwargs):
    """TrainingBatches over the fixture's real clips; `synth` of them also count as synthetic."""
    audio, labels = arrays["audio"], arrays["labels"]
    return TrainingBatches(audio, labels, audio[:synth], labels[:synth], arrays["noise"],
                           len(LABELS), BG, seed=seed, **kwargs)


def test_same_seed_gives_identical_batches_and_another_seed_differs(training_arrays):
    a, b, c = (batches(training_arrays, seed=s, synth=3) for s in (7, 7, 8))
    for _ in range(3):
        (xa, ya, _), (xb, yb, _), (xc, _, _) = a.batch(6), b.batch(6), c.batch(6)
        assert np.array_equal(xa.numpy(), xb.numpy()) and ya.tolist() == yb.tolist()
    assert not np.array_equal(xa.numpy(), xc.numpy())


@pytest.mark.parametrize("context_s", [0.5, 0.25, 0.0, 1.5])
def test_batches_hold_context_then_one_second_within_unit_range(training_arrays, context_s):
    x, y, _ = batches(training_arrays, context_s=context_s).batch(24)
    assert x.shape == (24, int(context_s * 16000) + CLIP_SAMPLES)
    assert x.dtype.is_floating_point and y.shape == (24,)
    assert float(x.abs().max()) <= 1.0


def test_loud_clips_are_clipped_into_the_unit_range(training_arrays):
    loud = dict(training_arrays, audio=training_arrays["audio"] * 40)
    x, _, _ = batches(loud).batch(32)
    assert float(x.abs().max()) == 1.0


def test_drawn_labels_are_the_classes_present_plus_background(training_arrays):
    b = batches(training_arrays)
    drawn = set(b.batch(300)[1].tolist())
    assert drawn == set(training_arrays["labels"]) | {BG}


def test_sampling_is_class_balanced_not_proportional_to_clip_counts(training_arrays):
    labels = training_arrays["labels"]
    counts = collections.Counter(labels)
    scarce, common = min(counts, key=counts.get), max(counts, key=counts.get)
    assert counts[common] >= 6 * counts[scarce]  # the fixture is unbalanced
    n = 1200
    drawn = collections.Counter(batches(training_arrays, seed=3, background_weight=2.0).batch(n)[1].tolist())
    words = [c for c in drawn if c != BG]
    share = {c: drawn[c] / n for c in words}
    expected = 1 / (len(words) + 2)  # background is drawn twice as often as a word
    for c in words:  # tolerance: about 3.5 standard deviations of a share
        assert share[c] == pytest.approx(expected, abs=0.035), (LABELS[c], share)
    assert drawn[BG] / n == pytest.approx(2 * expected, abs=0.05)
    assert 0.75 < share[scarce] / share[common] < 1.33


def test_background_examples_are_labelled_background_and_hold_no_speech(training_arrays):
    """With silent clips, anything in a background example can only be added noise; a word
    example without speech would still be labelled with its word."""
    silent = dict(training_arrays, audio=np.zeros_like(training_arrays["audio"]))
    b = batches(silent, seed=5)
    x, y, _ = b.batch(200)
    assert (y == BG).any()
    # Background examples are noise alone, from near silence (-70 dB) up: audible here...
    quietest = 10 ** (-70 / 20) / 2
    assert all(float(row.square().mean().sqrt()) > quietest for row in x[y == BG])
    # ...while word examples of silent clips only get noise scaled to their (zero) speech.
    assert float(x[y != BG].abs().max()) < 1e-6


# ----------------------------------------------------------------------------- speech negatives

def test_speech_negatives_off_leave_the_seeded_batches_as_they_were(training_arrays):
    """Labels and example levels drawn by the code before speech negatives existed: turning the
    option off (the default) must not add or move a single random draw."""
    old_labels = [1, 35, 0, 0, 35, 35, 26, 35, 20, 35, 35, 35, 35, 35, 2, 35, 20, 2, 35, 1, 0, 26,
                  35, 2, 2, 2, 35, 35, 20, 1, 35, 0]
    old_rms = [0.217384, 0.021972, 0.141247, 0.241936, 0.000389, 0.006631, 0.056908, 0.001828,
               0.13257, 0.000317, 0.008128, 0.000524, 0.033476, 0.002714, 0.185098, 0.015062,
               0.305112, 0.061189, 0.020233, 0.332028, 0.052808, 0.09076, 0.000917, 0.095941,
               0.274113, 0.174886, 0.011487, 0.001532, 0.150266, 0.07461, 0.000823, 0.206238]
    default = batches(training_arrays, seed=11, synth=3, background_weight=6.0).batch(32)
    off = batches(training_arrays, seed=11, synth=3, background_weight=6.0, speech_negatives=0.0).batch(32)
    on = batches(training_arrays, seed=11, synth=3, background_weight=6.0, speech_negatives=0.6).batch(32)
    assert np.array_equal(default[0].numpy(), off[0].numpy()) and default[1].tolist() == off[1].tolist()
    assert off[1].tolist() == old_labels
    rms_off = off[0].double().square().mean(1).sqrt().tolist()
    assert rms_off == pytest.approx(old_rms, rel=1e-3, abs=2e-6)
    assert not np.array_equal(off[0].numpy(), on[0].numpy())  # the option does change batches


def tone_burst(start_s=0.3, end_s=0.7, n=CLIP_SAMPLES):
    """A 'clip' whose word is a loud tone from start_s to end_s, silence elsewhere."""
    clip = np.zeros(n, np.float32)
    a, b = int(start_s * 16000), int(end_s * 16000)
    clip[a:b] = 0.5 * np.sin(2 * np.pi * 440 * np.arange(b - a) / 16000)
    return clip


def test_word_bounds_lives_in_data_and_stream_eval_uses_the_same_function():
    import kws.stream_eval
    assert kws.stream_eval.word_bounds is word_bounds
    assert word_bounds(tone_burst(0.3, 0.7)) == (4800, 11200)


@pytest.mark.parametrize("fraction", [0.15, 0.3, 0.5, 0.999])
def test_word_tail_is_the_last_part_of_the_word_and_never_all_of_it(fraction):
    clip = tone_burst(0.3, 0.7)  # the word spans 6400 samples and ends at 11200
    tail = word_tail(clip, fraction)
    assert 1 <= len(tail) < 6400
    assert len(tail) == pytest.approx(fraction * 6400, abs=2)
    np.testing.assert_array_equal(tail, clip[11200 - len(tail):11200])  # it ends where the word does


def test_word_tail_of_a_clip_with_trailing_quiet_still_ends_at_the_word():
    clip = tone_burst(0.1, 0.4) + np.float32(1e-5)  # a quiet floor 90 dB under the word
    tail = word_tail(clip, 0.5)
    assert len(tail) == pytest.approx(0.5 * 4800, abs=2)
    np.testing.assert_array_equal(tail, clip[6400 - len(tail):6400])


def silent_noise_examples(fraction, seed=0, n=800, context_s=0.5, background_weight=9.0):
    """(audio, labels, word-free flags) of examples of one word (a tone burst at 0.3-0.7 s) with
    noise that is all zeros, so that anything in a background example is speech put there as a
    negative."""
    clips = np.stack([tone_burst(), tone_burst(0.25, 0.75)])
    b = TrainingBatches(clips, [0, 0], clips[:0], [], [np.zeros(3 * 16000, np.float32)], len(LABELS),
                        BG, seed=seed, background_weight=background_weight, context_s=context_s,
                        speech_negatives=fraction)
    return tuple(t.numpy() for t in b.batch(n))


def silent_noise_batches(fraction, seed=0, n=800, context_s=0.5):
    """The background examples of `silent_noise_examples`, and the context's length in samples."""
    x, y, _ = silent_noise_examples(fraction, seed, n, context_s)
    return x[y == BG], int(context_s * 16000)


def test_background_examples_hold_speech_only_at_the_end_of_the_context_or_the_start_of_the_target():
    x, ctx = silent_noise_batches(0.6, seed=4)
    loud = np.abs(x) > 1e-6
    with_speech = loud.any(axis=1)
    after_word = loud[:, :ctx].any(axis=1) & with_speech
    tail = loud[:, ctx:].any(axis=1) & with_speech
    assert not (after_word & tail).any()  # one kind or the other, never both
    # "After a word": the end of a clip in the context, nothing at all in the target second.
    assert after_word.sum() > 50 and not loud[after_word, ctx:].any()
    # "Word tail": the target starts with the tail (never more than half of the 0.4-0.5 s word,
    # so nothing after its first 0.25 s and never in its last half); the context is empty.
    assert tail.sum() > 50
    assert loud[tail, ctx:ctx + 40].any(axis=1).all()  # at the very start of the target
    assert not loud[tail, :ctx].any() and not loud[tail, ctx + 4000 + 160:].any()
    lengths = loud[tail, ctx:].sum(axis=1)
    assert lengths.min() >= 0.15 * 6400 - 160 and lengths.max() <= 0.5 * 8000 + 160
    # Roughly half of each kind.
    assert after_word.sum() / with_speech.sum() == pytest.approx(0.5, abs=0.1)


def test_only_background_examples_without_a_word_in_the_context_are_word_free():
    x, y, word_free = silent_noise_examples(0.6, seed=6, n=400, background_weight=4.0)
    ctx = 8000
    assert word_free.dtype == bool and not word_free[y != BG].any()
    # With silent noise, a background example whose context holds sound holds a clip's end.
    after_word = (y == BG) & (np.abs(x[:, :ctx]) > 1e-6).any(axis=1)
    assert after_word.sum() > 30
    np.testing.assert_array_equal(word_free[y == BG], ~after_word[y == BG])


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.6, 1.0])
def test_the_share_of_background_examples_with_speech_is_the_option(fraction):
    x, _ = silent_noise_batches(fraction, seed=9)
    share = float((np.abs(x) > 1e-6).any(axis=1).mean())
    assert len(x) > 600  # background weight 9 against one word
    # tolerance: about 4 standard deviations of a share of ~700 draws
    assert share == pytest.approx(fraction, abs=0.075)


def test_without_context_every_speech_negative_is_a_word_tail():
    x, ctx = silent_noise_batches(1.0, seed=2, n=200, context_s=0.0)
    assert ctx == 0 and x.shape[1] == CLIP_SAMPLES
    loud = np.abs(x) > 1e-6
    assert loud[:, :40].any(axis=1).all() and not loud[:, 4000 + 160:].any()


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_a_speech_negative_share_outside_0_to_1_is_a_data_error(training_arrays, bad):
    with pytest.raises(DataError, match="speech_negatives"):
        batches(training_arrays, speech_negatives=bad)


# ----------------------------------------------------------------------------- sentence negatives

SENTENCE_HZ, WORD_HZ, NEAR_MISS_HZ = 1000.0, 440.0, 2500.0


def two_seconds_of(hz: float) -> np.ndarray:
    return (0.2 * np.sin(2 * np.pi * hz * np.arange(32000) / 16000)).astype(np.float32)


def sentence_batches(sentence_negatives, speech_negatives=0.0, seed=0, n=800, background_weight=9.0,
                     near_misses=0.0):
    """Examples of one word (a 440-Hz tone burst) with all-zero noise, one 'sentence' (2 s of a
    1000-Hz tone) and one near-miss 'sentence' (2 s of 2500 Hz), so that every sound in an
    example says where it came from."""
    clips = np.stack([tone_burst(), tone_burst(0.25, 0.75)])
    b = TrainingBatches(clips, [0, 0], clips[:0], [], [np.zeros(3 * 16000, np.float32)], len(LABELS), BG,
                        seed=seed, background_weight=background_weight, speech_negatives=speech_negatives,
                        sentences=[two_seconds_of(SENTENCE_HZ)], sentence_negatives=sentence_negatives,
                        near_miss_sentences=[two_seconds_of(NEAR_MISS_HZ)], near_misses=near_misses)
    x, y, _ = b.batch(n)
    return x.numpy(), y.numpy()


def dominant_hz(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x))
    return float(np.argmax(spectrum) * 16000 / len(x))


@pytest.mark.parametrize("fraction", [0.3, 1.0])
def test_sentence_negatives_fill_their_share_of_background_examples_with_a_stretch_of_a_sentence(fraction):
    x, y = sentence_batches(fraction, seed=3)
    background = x[y == BG]
    heard = np.abs(background).max(axis=1) > 1e-6
    assert len(background) > 600
    assert heard.mean() == pytest.approx(fraction, abs=0.075)  # about 4 standard deviations
    for row in background[heard][:50]:
        assert dominant_hz(row) == pytest.approx(SENTENCE_HZ, abs=20)  # the sentence, not a word
        loud = row[np.abs(row) > 1e-6]
        dbfs = 20 * np.log10(np.sqrt(np.mean(loud ** 2)))
        assert -41 < dbfs < -14  # at -40 to -15 dBFS


def test_speech_and_sentence_negatives_split_the_background_examples_between_them():
    x, y = sentence_batches(0.5, speech_negatives=0.5, seed=6)
    background = x[y == BG]
    assert (np.abs(background).max(axis=1) > 1e-6).all()  # together they take every one
    hz = np.array([dominant_hz(row) for row in background])
    sentences = np.abs(hz - SENTENCE_HZ) < 20
    words = np.abs(hz - WORD_HZ) < 20  # a word's end or tail (a very short tail may read neither)
    assert sentences.mean() == pytest.approx(0.5, abs=0.075)
    assert words.mean() == pytest.approx(0.5, abs=0.075)


def test_with_sentence_negatives_a_fifth_of_the_words_follow_the_end_of_a_sentence():
    x, y = sentence_batches(0.5, seed=8, background_weight=1.0)
    ctx = 8000
    words = x[y != BG]
    after_talk = [row for row in words if np.abs(row[:ctx]).max() > 1e-6
                  and dominant_hz(row[:ctx]) == pytest.approx(SENTENCE_HZ, abs=20)]
    assert len(after_talk) / len(words) == pytest.approx(0.2, abs=0.07)
    for row in after_talk:  # the sentence's very end, right before the word's second
        assert np.abs(row[ctx - 40:ctx]).max() > 1e-6


@pytest.mark.parametrize("share", [0.3, 1.0])
def test_near_misses_take_their_share_of_the_sentence_negatives(share):
    x, y = sentence_batches(0.8, seed=4, near_misses=share)
    background = x[y == BG]
    heard = background[(np.abs(background) > 1e-6).sum(axis=1) > 1600]  # 0.1 s: enough to tell the tone
    hz = np.array([dominant_hz(row) for row in heard])
    near = np.abs(hz - NEAR_MISS_HZ) < 20
    assert len(heard) > 400 and (near | (np.abs(hz - SENTENCE_HZ) < 20)).all()
    assert near.mean() == pytest.approx(share, abs=0.08)


def test_near_miss_sentences_given_but_off_leave_the_seeded_batches_as_they_were():
    given = sentence_batches(0.5, seed=9, n=64)  # near-miss sentences given, near_misses 0
    clips = np.stack([tone_burst(), tone_burst(0.25, 0.75)])
    without = TrainingBatches(clips, [0, 0], clips[:0], [], [np.zeros(3 * 16000, np.float32)], len(LABELS), BG,
                              seed=9, background_weight=9.0, sentences=[two_seconds_of(SENTENCE_HZ)],
                              sentence_negatives=0.5)
    x, y, _ = without.batch(64)
    assert np.array_equal(given[0], x.numpy()) and given[1].tolist() == y.tolist()


def test_near_misses_without_near_miss_sentences_are_refused(training_arrays):
    with pytest.raises(DataError, match="needs near-miss sentences"):
        batches(training_arrays, sentences=[np.ones(100, np.float32)], sentence_negatives=0.5, near_misses=0.5)


def test_sentences_given_but_off_leave_the_seeded_batches_as_they_were(training_arrays):
    sentence = np.ones(16000, np.float32) * 0.1
    default = batches(training_arrays, seed=11, synth=3, background_weight=6.0, speech_negatives=0.6).batch(32)
    off = batches(training_arrays, seed=11, synth=3, background_weight=6.0, speech_negatives=0.6,
                  sentences=[sentence], sentence_negatives=0.0).batch(32)
    assert np.array_equal(default[0].numpy(), off[0].numpy()) and default[1].tolist() == off[1].tolist()


def test_speech_and_sentence_negatives_above_1_together_are_refused(training_arrays):
    with pytest.raises(DataError, match="together at most 1"):
        batches(training_arrays, speech_negatives=0.6, sentences=[np.ones(100, np.float32)],
                sentence_negatives=0.5)


def test_sentence_negatives_without_sentences_are_refused(training_arrays):
    with pytest.raises(DataError, match="needs sentences"):
        batches(training_arrays, sentence_negatives=0.5)


# ----------------------------------------------------------------------------- augmentations

def tone(freq: float, n: int = 16000) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * freq * np.arange(n) / 16000)).astype(np.float32)


def peak_hz(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x[2000:-2000] * np.hanning(len(x) - 4000)))
    return float(np.argmax(spectrum) * 16000 / (len(x) - 4000))


def test_spectral_edit_without_changes_gives_the_signal_back():
    x = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    np.testing.assert_allclose(spectral_edit(x), x, atol=1e-5)


@pytest.mark.parametrize("warp", [0.9, 1.1])
def test_vtlp_moves_a_tone_by_the_warp_factor_and_keeps_the_length(warp):
    x = tone(1000.0)
    y = spectral_edit(x, warp=warp)
    assert len(y) == len(x)
    assert peak_hz(y) == pytest.approx(1000 * warp, abs=20)


def test_a_frequency_mask_silences_its_band_only():
    x = np.random.default_rng(1).standard_normal(16000).astype(np.float32) * 0.1
    y = spectral_edit(x, band=(2000, 2500))
    spectrum = lambda s: np.abs(np.fft.rfft(s[2000:-2000])) ** 2
    hz = np.fft.rfftfreq(12000, 1 / 16000)
    inside, outside = (hz > 2100) & (hz < 2400), (hz > 3000) & (hz < 6000)
    assert spectrum(y)[inside].mean() < 0.01 * spectrum(x)[inside].mean()  # 20 dB down
    assert spectrum(y)[outside].mean() == pytest.approx(spectrum(x)[outside].mean(), rel=0.1)


def example_levels_db(b: TrainingBatches, n: int = 300) -> np.ndarray:
    x = b.batch(n)[0].double()
    return 10 * np.log10(x.square().mean(1).numpy() + 1e-20)


def test_quieter_and_louder_move_whole_examples_and_clip_at_full_scale(training_arrays):
    """A draw from -quieter_db to +louder_db moves each example's level: 30 dB quieter at most
    moves the median level down by about 15 dB; 40 dB louder drives examples into the
    converter's limit, which no sample passes."""
    options = dict(seed=9, synth=3)
    as_recorded = example_levels_db(batches(training_arrays, **options))
    quieter = example_levels_db(batches(training_arrays, quieter_db=30.0, **options))
    assert 10 < np.median(as_recorded) - np.median(quieter) < 20
    loud, _, _ = batches(training_arrays, louder_db=40.0, **options).batch(100)
    assert float(loud.abs().max()) == 1.0
    assert (loud.abs().amax(1) == 1.0).sum() > 10


@pytest.mark.parametrize("quieter, louder", [(-1.0, 0.0), (0.0, 61.0), (float("nan"), 0.0)])
def test_a_level_range_outside_0_to_60_db_is_a_data_error(training_arrays, quieter, louder):
    with pytest.raises(DataError, match="0 to 60 dB"):
        batches(training_arrays, quieter_db=quieter, louder_db=louder)


def largest_level_step_db(x: np.ndarray, frame: int = 800) -> float:
    """The largest difference in dB between the mean power before and after a frame boundary."""
    power = np.mean(x[: len(x) // frame * frame].reshape(-1, frame).astype(np.float64) ** 2, axis=1) + 1e-12
    return max(abs(10 * np.log10(power[:k].mean() / power[k:].mean())) for k in range(1, len(power)))


def test_noise_onsets_make_the_noise_start_or_stop_within_an_example(training_arrays):
    """Background examples are noise alone: steady without the option, with a step of 10-40 dB
    (measured in 50-ms frames, so a little less) at a random point with it."""
    options = dict(seed=6, background_weight=1000.0, context_s=0.5)
    steady, _, _ = batches(training_arrays, **options).batch(24)
    stepped, labels, _ = batches(training_arrays, noise_onsets=1.0, **options).batch(24)
    assert (labels == BG).all()
    steps = [largest_level_step_db(x) for x in stepped.numpy() if np.abs(x).max() > 1e-3]
    assert len(steps) > 12 and min(steps) > 6.0
    assert max(largest_level_step_db(x) for x in steady.numpy() if np.abs(x).max() > 1e-3) < 3.0


def noise_frequencies(noise_switches: float, seed: int) -> list[list[float]]:
    """The dominant frequency of each 50-ms frame of 64 background examples over two noise
    'recordings', tones of 300 and 3000 Hz, so that a frame says which one it holds."""
    t = np.arange(3 * 16000) / 16000
    noise = [np.sin(2 * np.pi * 300 * t).astype(np.float32), np.sin(2 * np.pi * 3000 * t).astype(np.float32)]
    clips = np.stack([tone_burst(), tone_burst()])
    b = TrainingBatches(clips, [0, 0], clips[:0], [], noise, len(LABELS), BG, seed=seed,
                        background_weight=1000.0, noise_switches=noise_switches)
    x, y, _ = b.batch(64)
    assert (y.numpy() == BG).all()
    return [[dominant_hz(f) for f in row.reshape(-1, 800) if np.abs(f).max() > 1e-4]
            for row in x.numpy() if np.abs(row).max() > 1e-3]


def test_noise_switches_make_the_noise_give_way_to_another_recording_once_within_an_example():
    def changes(freqs):
        return sum(abs(a - b) > 100 for a, b in zip(freqs, freqs[1:]))

    steady = [changes(f) for f in noise_frequencies(0.0, seed=2)]
    switched = [changes(f) for f in noise_frequencies(1.0, seed=2)]
    assert len(switched) > 40 and max(steady) == 0
    assert max(switched) == 1  # one switch: from one recording to the other, never back
    assert np.mean(switched) > 0.3  # about half switch to the other recording (else to another stretch)


@pytest.mark.parametrize("option", ["vtlp", "reverb", "masks", "noise_onsets", "noise_switches", "mic_response"])
def test_each_augmentation_is_off_by_default_and_changes_the_examples_when_on(training_arrays, option):
    plain_a, plain_b = batches(training_arrays, seed=4), batches(training_arrays, seed=4, **{option: 0.0})
    xa, ya, _ = plain_a.batch(16)
    xb, yb, _ = plain_b.batch(16)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)  # off: not even a draw
    xc, yc, _ = batches(training_arrays, seed=4, **{option: 1.0}).batch(16)
    assert xc.shape == xa.shape and not torch.equal(xc, xa)
    assert xc.abs().max() <= 1.0


def tone_levels_db(mic_response: float, seed: int = 3) -> np.ndarray:
    """(40-Hz level - 1-kHz level) in dB of 64 background examples of noise that holds both
    tones equally loud."""
    t = np.arange(3 * 16000) / 16000
    noise = [(np.sin(2 * np.pi * 40 * t) + np.sin(2 * np.pi * 1000 * t)).astype(np.float32)]
    clips = np.stack([tone_burst(), tone_burst()])
    b = TrainingBatches(clips, [0, 0], clips[:0], [], noise, len(LABELS), BG, seed=seed,
                        background_weight=1000.0, mic_response=mic_response)
    x, y, _ = b.batch(64)
    assert (y.numpy() == BG).all()
    spectrum = np.abs(np.fft.rfft(x.numpy() * np.hanning(x.shape[1]), axis=1))
    hz = np.fft.rfftfreq(x.shape[1], 1 / 16000)
    level = lambda f: 20 * np.log10(spectrum[:, np.argmin(np.abs(hz - f))])
    return level(40) - level(1000)


def test_a_random_microphone_loses_the_bass_and_colours_each_example_differently():
    flat, coloured = tone_levels_db(0.0), tone_levels_db(1.0)
    assert np.abs(flat).max() < 0.5  # no microphone: the two tones as loud as each other
    assert np.median(coloured) < -8  # corners at 50-600 Hz: 40 Hz always loses at least 5 dB
    assert coloured.std() > 3  # each example its own microphone


def test_a_masked_example_has_a_silent_span_in_its_target(training_arrays):
    x, _, _ = batches(training_arrays, seed=5, masks=1.0, context_s=0.5).batch(8)
    for example in x.numpy():
        target = example[8000:]
        zero_runs = np.diff(np.flatnonzero(np.r_[True, target != 0, True]))
        assert zero_runs.max() - 1 >= 160  # at least 10 ms of exact silence


@pytest.mark.parametrize("option", ["vtlp", "reverb", "masks", "noise_onsets", "noise_switches", "mic_response"])
def test_augmentation_shares_outside_0_to_1_are_refused(training_arrays, option):
    with pytest.raises(DataError, match=option):
        batches(training_arrays, **{option: 1.5})
