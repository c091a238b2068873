"""`kws eval-stream`: stream building, scoring, the DET picture and the command."""

import json
import struct
import zlib

import numpy as np
import pytest
import soundfile as sf

from kws.cli import main
from kws.data import read_noise, read_split
from kws.stream import Detection
from kws.stream_eval import (Placement, det_image, score, stream_slots, word_bounds, write_png)


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


def test_stream_slots_are_seeded_and_place_each_word_where_its_audio_is(dataset):
    clips, noise = read_split(dataset, "testing"), read_noise(dataset, "testing")
    a = list(stream_slots(clips, noise, 40.0, seed=3))
    b = list(stream_slots(clips, noise, 40.0, seed=3))
    c = list(stream_slots(clips, noise, 40.0, seed=4))
    audio = np.concatenate([s[0] for s in a])
    placements = [p for s in a for p in s[1]]
    assert len(audio) == 40 * 16000
    assert np.array_equal(audio, np.concatenate([s[0] for s in b]))
    assert not np.array_equal(audio, np.concatenate([s[0] for s in c]))
    assert len(placements) >= 4 and {p.label for p in placements} <= {"yes", "no", "up", "bed"}
    for p in placements:
        word = audio[int(p.start_s * 16000):int(p.end_s * 16000)]
        before = audio[int((p.start_s - 0.2) * 16000):int(p.start_s * 16000)]
        assert 0.35 < p.end_s - p.start_s < 0.45  # the 0.4-s tone
        assert np.sqrt(np.mean(word ** 2)) > 1.5 * np.sqrt(np.mean(before ** 2))  # SNR >= 5 dB


def test_score_counts_hits_false_accepts_and_latency():
    placements = [Placement("yes", 1.0, 1.5), Placement("no", 5.0, 5.4), Placement("up", 9.0, 9.3),
                  Placement("cat", 12.0, 12.5)]
    detections = [
        Detection(1.7, "yes", 0.9),  # hit, 200 ms after the word
        Detection(1.9, "yes", 0.9),  # a second detection of the same word: false accept
        Detection(5.3, "up", 0.9),  # wrong word: false accept, and "no" is missed
        Detection(9.6, "up", 0.9),  # hit, 300 ms
        Detection(20.0, "go", 0.9),  # nothing there: false accept
    ]
    s = score(detections, placements, words=["yes", "no", "up", "go"], seconds=3600)
    assert s["keywords"] == 3  # "cat" is speech that is not a keyword
    assert s["hits"] == 2 and s["recall"] == pytest.approx(2 / 3)
    assert s["false_accepts"] == 3 and s["false_accepts_per_hour"] == pytest.approx(3.0)
    assert s["latency_ms_median"] == pytest.approx(250)
    assert s["recall_per_word"] == {"yes": 1.0, "no": 0.0, "up": 1.0}
    late = score(detections, placements, ["yes", "no", "up"], 3600, window=(4.0, 3600))
    assert late["keywords"] == 2 and late["hits"] == 1 and late["false_accepts"] == 2


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


def test_det_image_draws_the_curve_and_the_operating_point():
    points = [{"threshold": t, "recall": r, "false_accepts_per_hour": f}
              for t, r, f in ((0.5, 0.99, 50.0), (0.8, 0.95, 5.0), (0.95, 0.8, 0.5))]
    image = det_image(points, {"recall": 0.95, "false_accepts_per_hour": 5.0})
    blue = (image[..., 2] > 150) & (image[..., 0] < 100)
    red = (image[..., 0] > 200) & (image[..., 1] < 100)
    assert blue.sum() > 100 and red.sum() > 20
    # Fewer false accepts lie further left: the curve's lowest-FA end is left of its highest.
    cols = np.flatnonzero(blue.any(axis=0))
    assert cols.max() - cols.min() > 150


def test_eval_stream_json_reports_the_issue_keys_and_writes_the_det_png(dataset, tiny_edge_model_path,
                                                                          tmp_path, capsys):
    png = tmp_path / "det.png"
    code = main(["eval-stream", "--model", str(tiny_edge_model_path), "--data", str(dataset),
                 "--minutes", "0.5", "--words", "yes,no,up", "--threshold", "0.05",
                 "--det-png", str(png), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("recall", "false_accepts_per_hour", "latency_ms_median", "latency_ms_p90",
                "clip_accuracy_carried", "clip_accuracy_reset", "det_curve"):
        assert key in result
    assert 0.0 <= result["recall"] <= 1.0 and result["false_accepts_per_hour"] >= 0
    assert result["clips"] == 12 and result["minutes"] == pytest.approx(0.5)
    recalls = [p["recall"] for p in result["det_curve"]]
    assert recalls == sorted(recalls, reverse=True)  # a higher threshold never finds more
    read_png(png.read_bytes())


def test_long_run_check_reports_memory_and_start_versus_end(dataset, tiny_edge_model_path, capsys):
    code = main(["eval-stream", "--model", str(tiny_edge_model_path), "--data", str(dataset),
                 "--minutes", "0.6", "--compare-minutes", "0.2", "--long-run-check",
                 "--threshold", "0.05", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == (0 if result["passed"] else 1)
    assert result["first"]["keywords"] == result["last"]["keywords"] > 0  # the same audio
    assert np.isfinite(result["state_max_last"]) and result["rss_growth_bytes"] >= 0


def test_eval_stream_refuses_a_missing_dataset_with_a_clear_error(tiny_edge_model_path, tmp_path,
                                                                   capsys):
    code = main(["eval-stream", "--model", str(tiny_edge_model_path), "--data", str(tmp_path / "none")])
    assert code == 2 and "no dataset folder" in capsys.readouterr().err
