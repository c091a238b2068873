"""`kws listen` on files: the same detections as the streaming path, any rate and layout,
clean Ctrl-C, clear errors. (The microphone path: test_listen_pulseaudio.py.)"""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from kws import default_model_path
from conftest import noisy_bursts
from kws.audio import SAMPLE_RATE, TRUNCATED_WAV, load_audio, resample
from kws.cli import main
from kws.labels import LABELS
from kws.listen import Resampler, Worker, play_file
from kws.model import load_model
from kws.stream import DEFAULT_THRESHOLD, detect

REPO = Path(__file__).resolve().parents[1]

# Clips from the shared testing split (speakers the model never trained on) that the shipped
# model scores above 0.99 and no other word above 0.2: these tests check the listening path,
# so they run at a threshold (END_TO_END_THRESHOLD) with a wide margin on both sides.
# `kws eval-stream` measures detection quality.
KEYWORD_CLIPS = ("yes/e0c782d5_nohash_1.flac", "down/0132a06d_nohash_1.flac",
                 "happy/b8c48ffb_nohash_1.flac", "zero/11379f4d_nohash_0.flac")
END_TO_END_THRESHOLD = "0.9"


def shared_data() -> Path:
    """The shared Speech Commands copy: $KWS_DATA, else ../shared/data/speech_commands."""
    env = os.environ.get("KWS_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data" / "speech_commands"


def keyword_audio() -> tuple[np.ndarray, list[str]]:
    """0.3 s of silence, then each keyword clip followed by 1.5 s of silence: (audio, words)."""
    missing = [c for c in KEYWORD_CLIPS if not (shared_data() / c).is_file()]
    if missing:
        pytest.skip(f"the shared Speech Commands copy is not at {shared_data()} (set KWS_DATA)")
    parts, words = [np.zeros(4800, np.float32)], []
    for clip in KEYWORD_CLIPS:
        parts += [load_audio(shared_data() / clip), np.zeros(24000, np.float32)]
        words.append(clip.split("/")[0])
    return np.concatenate(parts), words


@pytest.fixture(scope="module")
def shipped_model_path() -> Path:
    path = default_model_path()
    if not path.is_file():
        pytest.skip(f"the shipped model is not at {path} yet")
    return path


def run_listen(argv, capsys) -> tuple[int, list[dict], str]:
    code = main(["listen", *argv])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_streaming_resampler_equals_resampling_the_whole_signal(rate):
    x = np.random.default_rng(rate).standard_normal(rate + 777).astype(np.float32) * 0.1
    whole = resample(x, rate, 16000)
    for chunk in (50, 441, 1411, 10**6):
        r = Resampler(rate)
        pieces = [r.process(x[i:i + chunk]) for i in range(0, len(x), chunk)]
        out = np.concatenate(pieces + [r.flush()])
        assert out.shape == whole.shape
        assert np.abs(out - whole).max() < 1e-6


def test_fast_file_input_gives_the_streaming_paths_detections(tiny_edge_model_path, tmp_path, capsys):
    audio = noisy_bursts(6.0, seed=1)
    wav = tmp_path / "bursts.wav"
    sf.write(wav, audio, 16000, subtype="FLOAT")  # the exact samples
    code, lines, err = run_listen(["--model", str(tiny_edge_model_path), "--input", str(wav), "--fast",
                                   "--json", "--threshold", "0.05"], capsys)
    assert code == 0 and lines
    model = load_model(tiny_edge_model_path)
    for chunk in (160, 1000, len(audio)):
        expected = detect(model, audio, chunk_samples=chunk, threshold=0.05)
        assert [(d["label"], d["time_s"]) for d in lines] == \
               [(d.label, round(d.time_s, 3)) for d in expected]
        assert [d["score"] for d in lines] == pytest.approx([d.score for d in expected], abs=2e-4)
    assert "6.0 s of audio" in err and f"{len(lines)} detection{'' if len(lines) == 1 else 's'}," in err


def test_listen_names_the_words_it_listens_for(tiny_edge_model_path, tmp_path, capsys):
    wav = tmp_path / "quiet.wav"
    sf.write(wav, np.zeros(16000, np.float32), 16000)
    code, _, err = run_listen(["--model", str(tiny_edge_model_path), "--input", str(wav), "--fast",
                               "--words", "stop,yes"], capsys)
    assert code == 0 and "for yes, stop;" in err  # in the model's label order


def test_chunk_length_does_not_change_file_detections(tiny_edge_model_path, tmp_path, capsys):
    wav = tmp_path / "bursts.wav"
    sf.write(wav, noisy_bursts(5.0, seed=2), 16000, subtype="FLOAT")
    runs = [run_listen(["--model", str(tiny_edge_model_path), "--input", str(wav), "--fast", "--json",
                        "--threshold", "0.05", "--chunk-ms", ms], capsys)[1]
            for ms in ("10", "100")]
    assert runs[0] and [(d["label"], d["time_s"]) for d in runs[0]] == \
                      [(d["label"], d["time_s"]) for d in runs[1]]


def test_a_44k_stereo_file_gives_the_words_of_the_16k_mono_file(shipped_model_path, tmp_path,
                                                                 capsys):
    audio, words = keyword_audio()
    mono, stereo = tmp_path / "mono16k.wav", tmp_path / "stereo44k.wav"
    sf.write(mono, audio, 16000)
    up = resample(audio, 16000, 44100)
    sf.write(stereo, np.stack([up, up], axis=1), 44100)
    found = {}
    for name, path in (("mono", mono), ("stereo", stereo)):
        code, lines, _ = run_listen(["--model", str(shipped_model_path), "--input", str(path),
                                     "--fast", "--json", "--threshold", END_TO_END_THRESHOLD],
                                    capsys)
        assert code == 0
        found[name] = [d["label"] for d in lines]
    assert found["mono"] == words
    assert found["stereo"] == words


def test_listen_help_says_the_default_is_the_models_own_thresholds_then_the_real_constant(capsys):
    with pytest.raises(SystemExit):
        main(["listen", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "Default: the model's own per-word thresholds" in help_text
    assert f"{DEFAULT_THRESHOLD} for a word without one" in help_text


@pytest.mark.parametrize("clip", KEYWORD_CLIPS)
def test_a_file_holding_a_single_clip_is_reported_with_its_word(clip, shipped_model_path, capsys):
    if not (shared_data() / clip).is_file():
        pytest.skip(f"the shared Speech Commands copy is not at {shared_data()} (set KWS_DATA)")
    # At the default threshold: the word ends less than a second before the file does, so it
    # is heard only because the end of the file flushes the detector.
    code, lines, _ = run_listen(["--model", str(shipped_model_path), "--input",
                                 str(shared_data() / clip), "--fast", "--json"], capsys)
    assert code == 0
    assert [d["label"] for d in lines] == [clip.split("/")[0]]
    assert lines[0]["time_s"] <= sf.info(shared_data() / clip).duration + 1e-3


def test_ctrl_c_stops_a_real_time_stream_with_a_summary(tiny_edge_model_path, tmp_path):
    wav = tmp_path / "long.wav"
    sf.write(wav, noisy_bursts(60.0, seed=3), 16000)
    proc = subprocess.Popen([sys.executable, "-m", "kws.cli", "listen", "--model",
                             str(tiny_edge_model_path), "--input", str(wav), "--json",
                             "--threshold", "0.001"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        # Threshold 0.001: a detection every refractory period (1 s). Interrupt after the second.
        for _ in range(2):
            assert json.loads(proc.stdout.readline())["label"] in LABELS
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0
    summary = err.strip().splitlines()[-1]
    assert summary.startswith("kws listen:") and "dropped frames" in summary
    assert "real-time factor" in summary and "Traceback" not in err
    seconds = float(summary.split(":")[1].split("s of audio")[0])
    assert 1.0 <= seconds < 30  # stopped early: the file is 60 s long, played in real time


def exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's own errors
        return e.code


@pytest.mark.parametrize("argv, message", [
    (["--input", "/nonexistent/a.wav"], "no audio file at /nonexistent/a.wav"),
    (["--input", "WAV", "--device", "1"], "exclude each other"),
    (["--input", "WAV", "--rate", "44100"], "a file plays at its own"),
    (["--fast"], "--fast plays a file (--input)"),
    (["--input", "FOLDER"], "is not a regular file"),
    (["--input", "WAV", "--chunk-ms", "100000"], "at most 1000 ms"),
    (["--input", "WAV", "--chunk-ms", "0"], "above 0"),
    (["--threshold", "1.5", "--input", "WAV"], "threshold 1.5 is not a probability"),
    (["--threshold", "yes=high"], "give a probability"),
    (["--threshold", "0", "--input", "WAV"], "threshold 0 is not a probability in (0, 1]"),
    (["--list-devices", "--input", "WAV"], "it plays no file (--input)"),
    (["--model", "FOLDER", "--input", "WAV"], "is a folder, not a model file"),
    (["--threshold", "yes=0.9,yes=0.1", "--input", "WAV"], "gives yes more than one threshold"),
    (["--words", "yes,banana", "--input", "WAV"], "unknown word(s) 'banana'"),
    (["--input", "NOT_AUDIO"], "cannot read"),
    (["--input", "RATE_1K"], "sample rate 1000 Hz is not supported"),
    (["--input", "NO_SAMPLES"], "holds no audio samples"),
])
def test_bad_listen_options_give_one_clear_line_and_exit_2(argv, message, tiny_edge_model_path, capsys,
                                                           tmp_path):
    sf.write(tmp_path / "a.wav", np.zeros(1600, np.float32), 16000)
    (tmp_path / "b.wav").write_text("not audio")
    sf.write(tmp_path / "c.wav", np.zeros(1600, np.float32), 1000)
    sf.write(tmp_path / "d.wav", np.zeros(0, np.float32), 16000)
    argv = [{"WAV": str(tmp_path / "a.wav"), "NOT_AUDIO": str(tmp_path / "b.wav"), "RATE_1K": str(tmp_path / "c.wav"),
             "NO_SAMPLES": str(tmp_path / "d.wav"), "FOLDER": str(tmp_path)}.get(a, a) for a in argv]
    assert exit_code(["listen", "--model", str(tiny_edge_model_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_file_with_a_sample_that_is_not_a_number_keeps_what_came_before_and_exits_2_naming_it(
        tiny_edge_model_path, tmp_path, capsys, bad):
    audio = noisy_bursts(6.0, seed=1)
    audio[4 * SAMPLE_RATE] = bad  # a NaN would silence every detection after it: the state is poisoned
    wav = tmp_path / "bad.wav"
    sf.write(wav, audio, 16000, subtype="FLOAT")
    code, lines, err = run_listen(["--model", str(tiny_edge_model_path), "--input", str(wav), "--fast",
                                   "--json", "--threshold", "0.05", "--chunk-ms", "100"], capsys)
    before = detect(load_model(tiny_edge_model_path), audio[:4 * SAMPLE_RATE], threshold=0.05)
    assert code == 2 and lines and len(lines) == len(before)  # the four seconds before it, flushed
    last = err.strip().splitlines()[-1]
    assert "could not play" in last and "NaN or infinite" in last and "Traceback" not in err
    assert "4.0 s of audio" in err  # the summary comes first


@pytest.mark.parametrize("kind, reason", [("flac", ""), ("wav", TRUNCATED_WAV)])
def test_a_truncated_file_gives_what_it_holds_then_one_line_and_exit_2(kind, reason, tiny_edge_model_path,
                                                                        tmp_path, capsys):
    whole = tmp_path / f"whole.{kind}"
    sf.write(whole, noisy_bursts(6.0, seed=3), 16000)
    cut = tmp_path / f"cut.{kind}"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])  # the header still says 6 s
    code, _, err = run_listen(["--model", str(tiny_edge_model_path), "--input", str(cut), "--fast"], capsys)
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert f"could not play {cut} to its end: " in last and last.endswith(reason)
    assert "0.0 s of audio" not in err  # what the file held was played


def test_an_empty_file_is_named_as_empty(tiny_edge_model_path, tmp_path, capsys):
    empty = tmp_path / "empty.wav"
    empty.touch()
    code, _, err = run_listen(["--model", str(tiny_edge_model_path), "--input", str(empty)], capsys)
    assert code == 2 and err.strip() == f"kws: error: {empty} is empty (0 bytes): give an audio file"


def test_an_mp3_is_played_with_the_samples_it_decodes_to_at_once(tmp_path):
    mp3 = tmp_path / "bursts.mp3"
    sf.write(mp3, noisy_bursts(3.0, seed=4), 16000, format="MP3")
    blocks = queue.Queue()
    play_file(str(mp3), 0.032, True, blocks, threading.Event())
    played = []
    while (block := blocks.get()) is not None:
        played.append(block)
    played = np.concatenate(played)
    whole, _ = sf.read(mp3, dtype="float32")
    assert played.shape == whole.shape
    # soundfile seeks after every read, and libmpg123 decodes the frame after a seek without its
    # bit reservoir: 32-ms reads were 0.014 off
    assert np.abs(played - whole).max() < 1e-6


def test_a_file_played_in_real_time_hands_over_each_block_when_it_would_have_been_recorded(tmp_path):
    wav = tmp_path / "half.wav"
    sf.write(wav, np.zeros(SAMPLE_RATE // 2, np.float32), SAMPLE_RATE)
    blocks, start = queue.Queue(), time.monotonic()
    threading.Thread(target=play_file, args=(str(wav), 10.0, False, blocks, threading.Event())).start()
    first = blocks.get(timeout=10)
    assert len(first) == SAMPLE_RATE // 2
    assert time.monotonic() - start >= 0.45  # at its end, not at its start: a microphone cannot be early
    assert blocks.get(timeout=10) is None


class RecordingDetector:
    """Records the length of every chunk it is given; detects nothing."""

    def __init__(self):
        self.chunks = []

    def process(self, samples):
        self.chunks.append(len(samples))
        return []

    def flush(self):
        self.chunks.append("flush")
        return []


def test_a_worker_behind_takes_all_waiting_blocks_as_one_chunk():
    blocks = queue.Queue()
    for n in (512, 512, 300):
        blocks.put(np.zeros(n, np.float32))
    blocks.put(None)
    detector = RecordingDetector()
    worker = Worker(detector, SAMPLE_RATE, blocks, on_detections=lambda found: None)
    worker.run()
    assert worker.error is None and worker.finished.is_set()
    # Everything waiting at once, then the resampler's (empty) rest, then the detector's flush.
    assert detector.chunks == [1324, 0, "flush"]


def test_a_worker_keeping_up_takes_blocks_as_they_come():
    blocks = queue.Queue()
    detector = RecordingDetector()
    worker = Worker(detector, SAMPLE_RATE, blocks, on_detections=lambda found: None)
    thread = threading.Thread(target=worker.run)
    thread.start()
    for n in (512, 256):
        blocks.put(np.zeros(n, np.float32))
        deadline = time.monotonic() + 10
        while len(detector.chunks) < (1 if n == 512 else 2) and time.monotonic() < deadline:
            time.sleep(0.001)
    blocks.put(None)
    thread.join(10)
    assert detector.chunks == [512, 256, 0, "flush"]


def test_a_reader_that_stops_reading_ends_listen_quietly(tiny_edge_model_path, tmp_path):
    wav = tmp_path / "bursts.wav"
    sf.write(wav, noisy_bursts(6.0, seed=1), 16000, subtype="FLOAT")  # detections at 0.05
    command = [sys.executable, "-m", "kws.cli", "listen", "--model", str(tiny_edge_model_path),
               "--input", str(wav), "--fast", "--json", "--threshold", "0.05"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # as `| head -n0` would: the first detection finds no reader
    err = process.stderr.read()
    process.wait(timeout=120)
    process.stderr.close()
    assert process.returncode == 141 and "error" not in err and "Traceback" not in err, err
