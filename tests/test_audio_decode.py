"""Decoding is bounded whatever the file says: rate and channels checked on the header, audio
decoded and mixed down in blocks, a duration limit that holds even when the header does not know
the length, and samples beyond full scale clipped."""

import io
import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from app.hardening import encoded, silence_flac
from kws.audio import (MAX_CHANNELS, MAX_RATE, AudioError, Microphone, at_gain, decode, equalized, reverberate,
                       synthetic_rir, through_band)


def unknown_length(flac: bytes) -> bytes:
    """The FLAC as ffmpeg, sox or arecord write it to a pipe: STREAMINFO's total samples (36 bits
    from byte 21 on) and MD5 are zero, 'unknown'."""
    data = bytearray(flac)
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # the first block is STREAMINFO
    data[21] &= 0xF0
    data[22:26] = bytes(4)
    data[26:42] = bytes(16)
    return bytes(data)


def noise(seconds: float, rate=16000, channels=1, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal((round(seconds * rate), channels))).astype(np.float32)


def test_flac_of_unknown_length_decodes_whole():
    samples = noise(2.3, seed=1)
    data = unknown_length(encoded(samples, 16000, "FLAC"))
    assert sf.info(io.BytesIO(data)).frames > 2**62  # libsndfile reports "unknown" so
    audio, rate = decode(data, max_seconds=60)
    expected, _ = decode(encoded(samples, 16000, "FLAC"))
    assert rate == 16000 and len(audio) == len(samples)
    np.testing.assert_array_equal(audio, expected)


def test_flac_of_unknown_length_is_refused_once_it_passes_the_limit():
    data = unknown_length(encoded(noise(3.0), 16000, "FLAC"))
    with pytest.raises(AudioError, match="longer than the limit of 2 s"):
        decode(data, max_seconds=2)


def test_declared_length_over_the_limit_is_refused_from_the_header():
    with pytest.raises(AudioError, match="3.0 s long; the limit is 2 s"):
        decode(encoded(noise(3.0), 16000, "WAV"), max_seconds=2)


@pytest.mark.parametrize("rate,channels,fmt,words", [
    (640_000, 8, "FLAC", "640000 Hz"),  # the 335-KB FLAC that decoded to 1.35 GB
    (1, 1, "WAV", "1 Hz"),  # ten samples posing as a 10-s clip
    (16000, MAX_CHANNELS + 1, "WAV", "9 channels"),  # FLAC stops at 8
])
def test_rate_and_channels_out_of_bounds_are_refused_from_the_header(rate, channels, fmt, words):
    data = encoded(np.zeros((max(10, rate // 5), channels), np.float32), rate, fmt=fmt)
    with pytest.raises(AudioError, match=words):
        decode(data, max_seconds=60)


def test_multichannel_audio_is_mixed_down_in_blocks_with_bounded_memory():
    seconds, channels = 20, 8
    data = silence_flac(MAX_RATE, channels, seconds)
    tracemalloc.start()
    try:
        audio, rate = decode(data, max_seconds=60)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rate == MAX_RATE and len(audio) == seconds * MAX_RATE
    whole = seconds * MAX_RATE * channels * 4  # 123 MB: what decoding at once would hold
    assert peak < 2.2 * audio.nbytes + 4_000_000 < whole / 3, peak


def test_mixdown_averages_channels():
    samples = noise(0.5, channels=3, seed=2)
    audio, _ = decode(encoded(samples, 16000, "WAV", subtype="FLOAT"))
    np.testing.assert_allclose(audio, samples.mean(axis=1), atol=1e-7)


def test_samples_beyond_full_scale_are_clipped_not_propagated():
    samples = noise(1.0, channels=2, seed=3)
    samples[100] = 3e38  # float32's largest values: a mean over channels would overflow
    samples[200, 0] = -3e38
    audio, _ = decode(encoded(samples, 16000, "WAV", subtype="FLOAT"))
    assert np.isfinite(audio).all() and np.abs(audio).max() <= 1.0
    assert audio[100] == 1.0 and audio[200] == pytest.approx((samples[200, 1] - 1) / 2)


def test_a_file_longer_than_its_header_says_is_decoded_whole(monkeypatch):
    """Some headers only estimate the length (MP3): the decoder keeps what it reads."""
    samples = noise(1.0, seed=4)
    data = encoded(samples, 16000, "WAV", subtype="FLOAT")
    real_frames = sf.SoundFile.frames
    monkeypatch.setattr(sf.SoundFile, "frames", property(lambda f: real_frames.fget(f) // 3))
    audio, _ = decode(data)
    np.testing.assert_array_equal(audio, samples[:, 0])


def test_at_gain_moves_the_level_by_decibels_and_clips_at_full_scale():
    x = np.array([0.1, -0.5, 0.05], np.float32)
    np.testing.assert_allclose(at_gain(x, -20.0), x / 10, rtol=1e-6)
    np.testing.assert_allclose(at_gain(x, 20.0), [1.0, -1.0, 0.5], rtol=1e-6)
    assert at_gain(x, 6.0).dtype == np.float32


def test_equalized_audio_keeps_the_length_and_a_flat_response_gives_it_back():
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (3, 1000)).astype(np.float32)
    np.testing.assert_allclose(equalized(x, np.ones_like), x, atol=1e-6)
    quiet = equalized(x, lambda hz: np.full_like(hz, 0.1))
    assert quiet.shape == x.shape and quiet.dtype == np.float32
    np.testing.assert_allclose(quiet, x / 10, atol=1e-6)


@pytest.mark.parametrize("hz, expected_db", [(1000, 0.0), (300, -3.0), (3400, -3.0), (150, -24.1), (6800, -24.1)])
def test_a_band_passes_its_middle_and_falls_24_db_an_octave_beyond_its_corners(hz, expected_db):
    t = np.arange(32000) / 16000
    x = (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
    y = through_band(x, 300, 3400)
    middle = slice(4000, -4000)  # away from the ends, where the tone starts and stops
    db = 20 * np.log10(np.sqrt(np.mean(y[middle] ** 2)) / np.sqrt(np.mean(x[middle] ** 2)))
    assert db == pytest.approx(expected_db, abs=0.2)


@pytest.mark.parametrize("rt60", [0.1, 0.4, 0.8])
def test_a_synthetic_room_decays_60_db_in_its_rt60(rt60):
    rir = synthetic_rir(rt60, np.random.default_rng(2))
    tail = rir[1:] ** 2
    energy_left = np.cumsum(tail[::-1])[::-1]  # Schroeder's backward integral
    db = 10 * np.log10(energy_left / energy_left[0] + 1e-30)
    # The -5 to -25 dB part of the decay, extrapolated to -60 dB (T20, as ISO 3382 measures).
    t = np.arange(len(db)) / 16000
    fit = (db < -5) & (db > -25)
    slope = np.polyfit(t[fit], db[fit], 1)[0]
    assert -60 / slope == pytest.approx(rt60, rel=0.15)


def test_reverberation_keeps_the_level_and_smears_a_click_over_the_room():
    x = np.zeros(16000, np.float32)
    x[1000] = 1.0
    y = reverberate(x, synthetic_rir(0.5, np.random.default_rng(3)))
    assert len(y) == len(x) and np.sqrt(np.mean(y ** 2)) == pytest.approx(np.sqrt(np.mean(x ** 2)), rel=1e-4)
    assert np.abs(y[:1000]).max() < 1e-6  # causal: nothing before the click (FFT rounding aside)
    assert np.abs(y[1000 + 4000:1000 + 6000]).max() > 1e-4  # still ringing 250 ms later


def test_reverberation_treats_each_row_as_its_own_recording():
    rng = np.random.default_rng(4)
    rows = rng.standard_normal((3, 8000)).astype(np.float32) * np.array([[0.01], [0.1], [0.5]], np.float32)
    rir = synthetic_rir(0.3, np.random.default_rng(5))
    together = reverberate(rows, rir)
    for row, alone in zip(together, rows):
        np.testing.assert_allclose(row, reverberate(alone, rir), atol=1e-6)


@pytest.mark.parametrize("reverberant_db", [-6.0, 0.0, 6.0])
def test_a_room_holds_the_reverberant_sound_asked_for_against_the_direct(reverberant_db):
    rir = synthetic_rir(0.5, np.random.default_rng(6), reverberant_db=reverberant_db)
    assert rir[0] == 1.0
    assert 10 * np.log10(np.sum(rir[1:] ** 2)) == pytest.approx(reverberant_db, abs=1e-6)


def test_a_microphone_in_a_room_reverberates_then_filters_then_moves_the_level():
    x = np.random.default_rng(7).standard_normal(16000).astype(np.float32) * 0.05
    mic = Microphone(-10.0, (300, 3400), 0.6)
    expected = at_gain(through_band(reverberate(x, mic.room), 300, 3400), -10.0)
    np.testing.assert_allclose(mic.record(x), expected, atol=1e-7)
    assert np.array_equal(mic.room, Microphone(room_rt60_s=0.6).room)  # one room for every evaluation
    assert Microphone(room_rt60_s=0.3).room.shape == (int(0.3 * 16000),)
    assert Microphone().room is None and np.array_equal(Microphone().record(x), x)


def test_a_report_names_the_room_and_reads_back():
    mic = Microphone(-20.0, (300, 3400), 0.5)
    assert Microphone.of_report(mic.report()) == mic
    assert mic.describe() == ", in a room of RT60 0.5 s, played -20 dB, through 300-3400 Hz"
    assert Microphone.of_report({"gain_db": 0.0, "band_hz": None}) == Microphone()  # reports before rooms


def test_the_dc_blocker_removes_the_mean_so_far_the_same_in_any_chunking():
    from kws.audio import DcBlocker

    rng = np.random.default_rng(0)
    speech_like = 0.1 * rng.standard_normal(160000)
    offset = speech_like + 0.05
    whole = DcBlocker().process(offset)
    for chunk in (1, 777, 512):
        blocker = DcBlocker()
        got = np.concatenate([blocker.process(offset[i:i + chunk]) for i in range(0, len(offset), chunk)])
        assert np.abs(got - whole).max() < 1e-6
    assert whole[511] == pytest.approx(offset[511] - offset[:512].mean(), abs=1e-6)
    # a steady offset is gone from the first block on, and the rest passes
    assert np.abs(whole - DcBlocker().process(speech_like)).max() < 1e-6
    assert np.std(whole) == pytest.approx(0.1, rel=0.02)


def test_the_dc_blocker_becomes_the_first_order_filter_and_follows_an_offset_that_changes():
    from kws.audio import DC_TIME_CONSTANT_S, DcBlocker

    span = round(DC_TIME_CONSTANT_S * 16000)
    audio = 0.01 * np.random.default_rng(1).standard_normal(16000 * 45)
    audio[16000 * 10:] += 0.05  # the microphone warms up ten seconds in
    blocker = DcBlocker()
    out = np.concatenate([blocker.process(audio[i:i + 512]) for i in range(0, len(audio), 512)])
    # after its first span: y[n] = R (y[n-1] + x[n] - x[n-1])
    R, x, y = 1 - 1 / span, audio[span:], out[span:].astype(np.float64)
    assert np.abs(y[1:] - R * (y[:-1] + x[1:] - x[:-1])).max() < 1e-6
    assert abs(out[16000 * 10:16000 * 11].mean()) > 0.04  # a change passes at first ...
    assert abs(out[-16000:].mean()) < 0.001  # ... and is gone half a minute later
