"""scripts/audio-bundle and scripts/gpu-train: the audio carried to a lent trainer comes back
under the same names, close to the originals, without the testing clips; the trainer's runs
leave their models, logs and run states."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from kws.data import read_split
from kws.model import load_model
from kws.speech import TRAINING_VOCABULARY, sentence_path
from conftest import SR, TINY_MODEL, word_sound

ROOT = Path(__file__).resolve().parents[1]


def script(*args, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHON": sys.executable, **(env or {})}
    return subprocess.run(list(args), capture_output=True, text=True, env=env, cwd=ROOT, **kwargs)


def write_synth(root: Path) -> list[str]:
    rng = np.random.default_rng(1)
    names = []
    for word in ("yes", "no", "up", "bed", "marvin"):
        (root / word).mkdir(parents=True)
        name = f"{word}/espeak-en_nohash_r150p50.wav"
        sf.write(root / name, word_sound(word, SR, rng), SR, subtype="PCM_16")
        names.append(name)
    return names


TINY_OPTIONS = " ".join(f"--set={k}={v}" for k, v in TINY_MODEL.items())


def pack(speech_commands, tmp_path, *options) -> tuple[Path, list[str]]:
    """The fixture's clips and a few synthetic ones packed into tmp_path/bundle (sentences, if
    asked for, rendered into the cache tmp_path/cache): the bundle and the synthetic names."""
    synth_names = write_synth(tmp_path / "synth")
    bundle = tmp_path / "bundle"
    packed = script(sys.executable, "scripts/audio-bundle", "pack", str(speech_commands.root),
                    str(tmp_path / "synth"), str(bundle), *options,
                    env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert packed.returncode == 0, packed.stderr
    return bundle, synth_names


def pack_and_unpack(speech_commands, tmp_path):
    bundle, synth_names = pack(speech_commands, tmp_path)
    unpacked = script(sys.executable, "scripts/audio-bundle", "unpack", str(bundle),
                      str(tmp_path / "data"), str(tmp_path / "synth_out"))
    assert unpacked.returncode == 0, unpacked.stderr
    return tmp_path / "data", tmp_path / "synth_out", synth_names


def relative_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.glob("*/*") if not p.parent.name.startswith("_")}


def test_a_bundle_carries_every_training_and_validation_clip_under_its_name_and_no_testing_clip(
        speech_commands, tmp_path):
    data, synth, synth_names = pack_and_unpack(speech_commands, tmp_path)
    assert relative_files(data) == set(speech_commands.splits["training"] + speech_commands.splits["validation"])
    assert relative_files(synth) == set(synth_names)
    for name in ("validation_list.txt", "testing_list.txt"):
        assert (data / name).read_bytes() == (speech_commands.root / name).read_bytes()
    for noise in speech_commands.noise:
        assert (data / "_background_noise_" / noise.name).read_bytes() == noise.read_bytes()
    for split in ("training", "validation"):
        assert [c.path.relative_to(data) for c in read_split(data, split)] == \
               [c.path.relative_to(speech_commands.root) for c in read_split(speech_commands.root, split)]


def test_unpacked_clips_have_their_lengths_and_stay_close_to_the_originals(speech_commands, tmp_path):
    data, _, _ = pack_and_unpack(speech_commands, tmp_path)
    for rel in speech_commands.splits["training"] + speech_commands.splits["validation"]:
        original, _ = sf.read(speech_commands.root / rel, dtype="float32")
        copy, rate = sf.read(data / rel, dtype="float32")
        assert rate == SR and len(copy) == len(original) == speech_commands.lengths[rel]
        # lossy, but each clip is its own, not a neighbour's: a shifted index gives errors near 1.4
        assert np.linalg.norm(copy - original) / np.linalg.norm(original) < 0.6, rel


def test_audio_bundle_on_missing_folders_exits_non_zero_naming_what_it_needs(tmp_path):
    packed = script(sys.executable, "scripts/audio-bundle", "pack", str(tmp_path / "nowhere"),
                    str(tmp_path), str(tmp_path / "bundle"))
    assert packed.returncode != 0 and "official layout" in packed.stderr and "Traceback" not in packed.stderr
    unpacked = script(sys.executable, "scripts/audio-bundle", "unpack", str(tmp_path / "nowhere"),
                      str(tmp_path / "data"), str(tmp_path / "synth"))
    assert unpacked.returncode != 0 and "audio-bundle pack" in unpacked.stderr and "Traceback" not in unpacked.stderr


def test_gpu_train_runs_each_line_and_leaves_its_model_log_and_run_state(speech_commands, tmp_path):
    bundle, _ = pack(speech_commands, tmp_path)
    common = f"--epochs 1 --examples-per-epoch 8 --warmup-steps 1 {TINY_OPTIONS}"
    runs = tmp_path / "runs.txt"
    runs.write_text(f"a 0 --batch-size 8 {common}\nb 1 --batch-size 4 {common}\n")
    out = tmp_path / "out"
    done = script("bash", "scripts/gpu-train", str(bundle), str(out), "600", str(runs), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("a", "b"):
        assert load_model(out / f"{name}.pt").cfg.width == TINY_MODEL["width"]
        assert '"best_validation_accuracy"' in (out / f"{name}.log").read_text()
        assert (out / f"{name}.run" / "last.pt").is_file()


def no_tts(tmp_path: Path) -> dict:
    """An environment whose espeak-ng and flite fail and whose sentence cache is empty, so that
    any sentence kws needs must come from a bundle."""
    fake = tmp_path / "no_tts"
    fake.mkdir()
    for name in ("espeak-ng", "flite"):
        (fake / name).write_text("#!/bin/sh\nexit 1\n")
        (fake / name).chmod(0o755)
    return {"PATH": f"{fake}:{os.environ['PATH']}", "XDG_CACHE_HOME": str(tmp_path / "empty_cache")}


def test_a_bundle_carries_the_training_sentences_into_the_cache_where_kws_reads_them(
        speech_commands, tmp_path):
    bundle, _ = pack(speech_commands, tmp_path, "--sentences", "3")
    rendered = tmp_path / "cache"
    there = tmp_path / "there"
    assert script(sys.executable, "scripts/audio-bundle", "unpack", str(bundle),
                  str(tmp_path / "data"), str(tmp_path / "synth_out"), "--sentences-out", str(there)
                  ).returncode == 0
    assert len(list(there.glob("*.wav"))) == 3
    for seed in range(3):
        original, _ = sf.read(sentence_path(seed, rendered / "kws" / "speech", TRAINING_VOCABULARY), dtype="float32")
        copy, _ = sf.read(sentence_path(seed, there, TRAINING_VOCABULARY), dtype="float32")
        assert len(copy) == len(original)
        assert np.linalg.norm(copy - original) / np.linalg.norm(original) < 0.6


def test_gpu_train_runs_sentence_negatives_from_the_bundle_without_a_tts_engine(speech_commands, tmp_path):
    bundle, _ = pack(speech_commands, tmp_path, "--sentences", "3")
    runs = tmp_path / "runs.txt"
    runs.write_text(f"s 0 --batch-size 8 --epochs 1 --examples-per-epoch 16 --warmup-steps 1 "
                    f"--sentence-negatives 0.5 --sentences 3 {TINY_OPTIONS}\n")
    out = tmp_path / "out"
    done = script("bash", "scripts/gpu-train", str(bundle), str(out), "600", str(runs),
                  env=no_tts(tmp_path), timeout=300)
    assert done.returncode == 0, (out / "s.log").read_text() if (out / "s.log").exists() else done.stderr
    assert load_model(out / "s.pt").cfg.width == TINY_MODEL["width"]
    assert not (tmp_path / "empty_cache").exists()  # the bundle's lossy copies stay out of the user's cache


def test_gpu_train_exits_non_zero_when_a_run_fails_and_its_log_says_why(speech_commands, tmp_path):
    bundle, _ = pack(speech_commands, tmp_path)
    runs = tmp_path / "runs.txt"
    runs.write_text("bad 0 --lr -1\n")
    done = script("bash", "scripts/gpu-train", str(bundle), str(tmp_path / "out"), "600", str(runs), timeout=300)
    assert done.returncode != 0
    assert "lr" in (tmp_path / "out" / "bad.log").read_text()


def test_gpu_train_without_its_four_arguments_exits_2_with_its_usage(tmp_path):
    done = script("bash", "scripts/gpu-train", str(tmp_path))
    assert done.returncode == 2 and "usage: scripts/gpu-train" in done.stderr
