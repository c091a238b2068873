"""The Speech Commands reader (splits, formats, lengths, errors), noise splitting, and the
seeded, class-balanced training batches."""

import collections

import numpy as np
import pytest
import soundfile as sf

from kws.audio import CLIP_SAMPLES, fit_length, load_audio
from kws.data import (BACKGROUND, LABELS, NOISE_TRAIN_FRACTION, DataError, TrainingBatches,
                      load_clips, read_noise, read_split)

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
        (xa, ya), (xb, yb), (xc, yc) = a.batch(6), b.batch(6), c.batch(6)
        assert np.array_equal(xa.numpy(), xb.numpy()) and ya.tolist() == yb.tolist()
    assert not np.array_equal(xa.numpy(), xc.numpy())


@pytest.mark.parametrize("context_s", [0.5, 0.25, 0.0, 1.5])
def test_batches_hold_context_then_one_second_within_unit_range(training_arrays, context_s):
    x, y = batches(training_arrays, context_s=context_s).batch(24)
    assert x.shape == (24, int(context_s * 16000) + CLIP_SAMPLES)
    assert x.dtype.is_floating_point and y.shape == (24,)
    assert float(x.abs().max()) <= 1.0


def test_loud_clips_are_clipped_into_the_unit_range(training_arrays):
    loud = dict(training_arrays, audio=training_arrays["audio"] * 40)
    x, _ = batches(loud).batch(32)
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
    x, y = b.batch(200)
    assert (y == BG).any()
    # Background examples are noise alone, from near silence (-70 dB) up: audible here...
    quietest = 10 ** (-70 / 20) / 2
    assert all(float(row.square().mean().sqrt()) > quietest for row in x[y == BG])
    # ...while word examples of silent clips only get noise scaled to their (zero) speech.
    assert float(x[y != BG].abs().max()) < 1e-6
