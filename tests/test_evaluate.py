"""Clip evaluation: consistent numbers, the 12-class protocol, hand-checkable accuracies, the
`kws eval` output formats and its one-line errors."""

import json
import sys

import numpy as np
import pytest
import torch

from conftest import tiny_model
import kws.evaluate
from kws.audio import Microphone, reverberate, synthetic_rir, through_band
from kws.cli import main
from kws.data import NOISE_DIR, load_clips, read_split
from kws.labels import BACKGROUND, CORE_WORDS, LABELS, WORDS
from kws.errors import KwsError
from kws.evaluate import LABELS_12, SILENCE, UNKNOWN, accuracy_report, clip_logits, evaluate, split_audio, to_12
from kws.model import MGRADE, footprint_bytes, load_model, preset

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, which are not JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} in JSON output")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def tiny_result(speech_commands):
    """A tiny model with varied answers, some right and some wrong, and its evaluation. Its
    decoder rows are swapped so that the labels it predicts are words the split holds."""
    model = tiny_model()
    with torch.no_grad():
        model.decoder.bias.zero_()  # else the bias alone decides: one label for every clip
        audio = load_clips(read_split(speech_commands.root, "testing"))
        predicted = list(dict.fromkeys(model.classify(torch.from_numpy(audio)).argmax(-1).tolist()))
        spoken = [LABELS.index(w) for w in dict.fromkeys(speech_commands.labels("testing"))]
        for p, w in zip(predicted, spoken):
            model.decoder.weight[[p, w]] = model.decoder.weight[[w, p]]
    result = evaluate(model, speech_commands.root, "testing")
    assert 0 < result["accuracy"] < 1 and len(np.flatnonzero(np.sum(result["confusion"], 0))) > 1
    return model, result


# ----------------------------------------------------------------------------- evaluate()

def test_per_word_counts_match_the_split_and_sum_to_the_clip_count(speech_commands, tiny_result):
    _, result = tiny_result
    truth = speech_commands.labels("testing")
    assert set(result["per_word"]) == set(WORDS)
    assert {w: r["n"] for w, r in result["per_word"].items()} == {w: truth.count(w) for w in WORDS}
    assert sum(r["n"] for r in result["per_word"].values()) == result["clips"] == len(truth)
    for r in result["per_word"].values():
        assert (r["accuracy"] is None) == (r["n"] == 0)
        assert r["accuracy"] is None or 0.0 <= r["accuracy"] <= 1.0


def test_accuracies_agree_with_the_confusion_matrix(tiny_result):
    _, result = tiny_result
    labels = result["labels"]
    confusion = np.array(result["confusion"])
    words = [labels.index(w) for w in WORDS]
    bg = labels.index(BACKGROUND)
    assert confusion[words].sum() == result["clips"]
    assert confusion[bg].sum() == result["silence_clips"] >= 1
    assert result["accuracy"] == pytest.approx(confusion[words, words].sum() / result["clips"])
    assert result["silence_accuracy"] == pytest.approx(confusion[bg, bg] / result["silence_clips"])
    assert result["words_as_background"] == confusion[words, bg].sum()
    assert (result["words_as_background"] + result["words_as_other_words"]
            == result["clips"] - confusion[words, words].sum())
    for w in WORDS:
        row = confusion[labels.index(w)]
        if row.sum():
            assert result["per_word"][w]["accuracy"] == pytest.approx(row[labels.index(w)] / row.sum())
    same_12 = sum(confusion[i, j] for i, t in enumerate(labels) for j, p in enumerate(labels) if to_12(t) == to_12(p))
    assert result["accuracy_12"] == pytest.approx(same_12 / confusion.sum())
    for key in ("accuracy", "accuracy_12", "silence_accuracy"):
        assert 0.0 <= result[key] <= 1.0


def test_footprint_and_parameters_are_the_models(tiny_result):
    model, result = tiny_result
    assert result["footprint_bytes"] == footprint_bytes(model)
    assert result["parameters"] == sum(p.numel() for p in model.parameters())


def test_rounding_effect_compares_gaussian_taps_with_integer_delays(tiny_result):
    model, result = tiny_result
    rounding = result["rounding"]
    assert 0.0 <= rounding["prediction_agreement"] <= 1.0
    assert 0.0 <= rounding["mean_abs_logit_change"] <= rounding["max_abs_logit_change"]
    assert not any(layer.delay.gaussian_at_inference for layer in model.layers)  # switched back


@pytest.mark.parametrize("mic, key, reported, as_recorded_by_it", [
    (Microphone(-40.0), "gain_db", -40.0, lambda audio: (audio * np.float32(0.01)).astype(np.float32)),
    (Microphone(band_hz=(300, 3400)), "band_hz", [300, 3400], lambda audio: through_band(audio, 300, 3400)),
    (Microphone(room_rt60_s=0.8), "room_rt60_s", 0.8,
     lambda audio: reverberate(audio, synthetic_rir(0.8, np.random.default_rng(0), reverberant_db=0.0))),
])
def test_clips_played_through_another_microphone_are_the_clips_it_would_record(
        speech_commands, tiny_result, mic, key, reported, as_recorded_by_it):
    model, as_recorded = tiny_result
    played = evaluate(model, speech_commands.root, "testing", rounding=False, mic=mic)
    assert played[key] == reported and as_recorded[key] in (0.0, None)
    audio, _ = split_audio(speech_commands.root, "testing")
    expected = clip_logits(model, as_recorded_by_it(audio)).argmax(-1)
    assert np.array_equal(np.sum(played["confusion"], 0), np.bincount(expected.numpy(), minlength=len(LABELS))
                          [[LABELS.index(w) for w in played["labels"]]])
    assert played["confusion"] != as_recorded["confusion"]  # this model hears the difference


@pytest.mark.parametrize("flag, value, refusal", [
    *[("--gain-db", v, "-60 to 40 dB") for v in ("loud", "-80", "41", "nan")],
    *[("--band-hz", v, "LOW,HIGH in Hz") for v in ("3400,300", "300", "-1,3400", "300,9000", "a,b")],
    *[("--room-rt60", v, "0.05 to 2 s") for v in ("0", "0.01", "2.5", "nan", "long")],
])
def test_kws_eval_with_another_microphone_it_cannot_play_exits_2_naming_the_range(
        speech_commands, tiny_model_path, capsys, flag, value, refusal):
    with pytest.raises(SystemExit) as stop:
        main(["eval", "--model", str(tiny_model_path), "--data", str(speech_commands.root), f"{flag}={value}"])
    assert stop.value.code == 2
    assert refusal in capsys.readouterr().err


def test_word_clips_missed_are_told_apart_as_no_word_or_another_word():
    truth = ["yes", "yes", "no", "up", "dog", BACKGROUND, BACKGROUND]
    predicted = ["yes", BACKGROUND, "yes", BACKGROUND, "cat", "no", BACKGROUND]
    report = accuracy_report(truth, predicted, LABELS)
    assert report["accuracy"] == pytest.approx(1 / 5)
    assert report["words_as_background"] == 2  # the second "yes" and "up"; not the noise heard as "no"
    assert report["words_as_other_words"] == 2  # "no" as "yes", "dog" as "cat"


def test_to_12_keeps_the_ten_core_words_and_maps_the_rest_to_unknown_or_silence():
    assert len(LABELS_12) == 12 and len(CORE_WORDS) == 10
    mapped = {label: to_12(label) for label in LABELS}
    assert all(mapped[w] == w for w in CORE_WORDS)
    others = [w for w in WORDS if w not in CORE_WORDS]
    assert len(others) == 25 and all(mapped[w] == UNKNOWN for w in others)
    assert mapped[BACKGROUND] == SILENCE
    assert set(mapped.values()) == set(LABELS_12)


@pytest.mark.parametrize("label", ["yes", "bed", BACKGROUND])
def test_a_model_that_always_says_one_label_scores_what_the_fixture_predicts(
        speech_commands, constant_model_path, label):
    result = evaluate(load_model(constant_model_path(label)), speech_commands.root, "testing")
    truth = speech_commands.labels("testing")
    n, silence = len(truth), result["silence_clips"]
    assert result["accuracy"] == pytest.approx(truth.count(label) / n)
    for word, r in result["per_word"].items():
        if r["n"]:
            assert r["accuracy"] == (1.0 if word == label else 0.0)
    # 12 classes: right on the clips whose 12-class label matches, and on silence if background.
    right_12 = sum(to_12(t) == to_12(label) for t in truth) + (silence if label == BACKGROUND else 0)
    assert result["accuracy_12"] == pytest.approx(right_12 / (n + silence))
    assert result["silence_accuracy"] == (1.0 if label == BACKGROUND else 0.0)
    assert result["rounding"]["prediction_agreement"] == 1.0


def test_the_validation_split_is_evaluated_on_its_own_clips(speech_commands, tiny_model_path):
    result = evaluate(load_model(tiny_model_path), speech_commands.root, "validation", rounding=False)
    assert result["split"] == "validation" and "rounding" not in result
    assert result["clips"] == len(speech_commands.splits["validation"])


def test_a_model_without_the_35_words_is_a_clear_error(speech_commands):
    model = MGRADE(preset("edge", ("yes", "no", BACKGROUND), n_layers=1, width=8, frontend_filters=8))
    with pytest.raises(KwsError, match="does not know these labels: up, down"):
        evaluate(model, speech_commands.root)


def test_several_models_are_evaluated_as_the_average_of_their_logits(speech_commands):
    first, second = tiny_model(seed=1), tiny_model(seed=2)
    audio, truth = split_audio(speech_commands.root, "testing")
    logits = [clip_logits(m, audio) for m in (first, second)]
    assert (logits[0].argmax(-1) != logits[1].argmax(-1)).any()  # else any one of them would pass
    average = ((logits[0] + logits[1]) / 2).argmax(-1).tolist()
    expected = accuracy_report(truth, [LABELS[i] for i in average], LABELS)
    result = evaluate([first, second], speech_commands.root, "testing")
    assert result["confusion"] == expected["confusion"] and result["accuracy"] == expected["accuracy"]
    assert result["models"] == 2 and "rounding" not in result  # the taps comparison is one model's
    assert result["footprint_bytes"] == footprint_bytes(first) + footprint_bytes(second)


def test_an_ensemble_of_models_with_other_labels_is_a_clear_error(speech_commands):
    reordered = MGRADE(preset("edge", LABELS[::-1], n_layers=1, width=8, frontend_filters=8))
    with pytest.raises(KwsError, match="same labels"):
        evaluate([tiny_model(), reordered], speech_commands.root)


# ----------------------------------------------------------------------------- kws eval

def test_kws_eval_with_several_models_reports_their_ensemble(speech_commands, tiny_model_path, tmp_path, capsys):
    from kws.model import save_model

    save_model(tiny_model(seed=3), tmp_path / "other.pt")
    code = main(["eval", "--model", str(tiny_model_path), str(tmp_path / "other.pt"),
                 "--data", str(speech_commands.root), "--json"])
    result = strict_json(capsys.readouterr().out)
    assert code == 0 and result["models"] == 2 and "rounding" not in result
    assert result["footprint_bytes"] == footprint_bytes(tiny_model()) + footprint_bytes(tiny_model(seed=3))

def test_kws_eval_json_prints_one_object_and_writes_a_confusion_png(
        speech_commands, tiny_model_path, tmp_path, capsys):
    png = tmp_path / "plots" / "confusion.png"  # the folder does not exist yet
    code = main(["eval", "--model", str(tiny_model_path), "--data", str(speech_commands.root),
                 "--json", "--confusion", str(png)])
    out = capsys.readouterr().out
    assert code == 0 and out.count("\n") == 1
    result = strict_json(out)
    assert {"accuracy", "per_word", "accuracy_12", "footprint_bytes"} <= result.keys()
    assert result["per_word"]["yes"] == {"accuracy": result["per_word"]["yes"]["accuracy"],
                                         "n": speech_commands.labels("testing").count("yes")}
    assert result["footprint_bytes"] == footprint_bytes(tiny_model())
    assert "confusion" not in result  # only with --with-confusion
    assert png.read_bytes().startswith(PNG_SIGNATURE)


def test_kws_eval_prints_a_readable_report(speech_commands, tiny_model_path, capsys):
    code = main(["eval", "--model", str(tiny_model_path), "--data", str(speech_commands.root), "--no-rounding"])
    out = capsys.readouterr().out
    assert code == 0
    assert "35-word accuracy" in out and "12-class protocol" in out and "inference footprint" in out
    assert "17 well-covered words" in out and "18 scarce words" in out
    assert "word clips heard as no word" in out and "as another word" in out
    assert f"n={speech_commands.labels('testing').count('yes')})" in out


def test_kws_eval_uses_kws_model_when_no_model_is_given(speech_commands, tiny_model_path, monkeypatch, capsys):
    monkeypatch.setenv("KWS_MODEL", str(tiny_model_path))
    assert main(["eval", "--data", str(speech_commands.root), "--json", "--no-rounding"]) == 0
    assert strict_json(capsys.readouterr().out)["footprint_bytes"] == footprint_bytes(tiny_model())


def expect_one_line_error(capsys, argv, *fragments):
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.startswith("kws: error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment in captured.err


def test_kws_eval_on_a_missing_folder_exits_2_naming_it(tiny_model_path, tmp_path, capsys):
    expect_one_line_error(capsys, ["eval", "--model", str(tiny_model_path), "--data", str(tmp_path / "absent")],
                          "absent")


def test_kws_eval_on_an_empty_split_exits_2_naming_the_split(make_speech_commands, tiny_model_path, capsys):
    fx = make_speech_commands(counts={"yes": (2, 0, 1)})
    expect_one_line_error(capsys, ["eval", "--model", str(tiny_model_path), "--data", str(fx.root),
                                   "--split", "validation"], "validation split", "empty")


def test_kws_eval_on_unreadable_audio_exits_2_naming_the_file(make_speech_commands, tiny_model_path, capsys):
    fx = make_speech_commands(counts={"yes": (1, 0, 2), "no": (1, 0, 1)})
    broken = fx.root / fx.splits["testing"][1]
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVE but not really")
    expect_one_line_error(capsys, ["eval", "--model", str(tiny_model_path), "--data", str(fx.root)],
                          broken.name, "cannot decode")


def test_kws_eval_without_noise_recordings_exits_2_saying_so(make_speech_commands, tiny_model_path, capsys):
    fx = make_speech_commands(counts={"yes": (1, 0, 2)})
    for path in fx.noise:
        path.unlink()
    expect_one_line_error(capsys, ["eval", "--model", str(tiny_model_path), "--data", str(fx.root)],
                          "no noise recordings", NOISE_DIR)


def test_kws_eval_with_a_missing_model_exits_2(speech_commands, tmp_path, capsys):
    expect_one_line_error(capsys, ["eval", "--model", str(tmp_path / "none.pt"), "--data", str(speech_commands.root)],
                          "none.pt")


@pytest.mark.parametrize("where", ["under a file", "a folder"])
def test_kws_eval_with_an_unwritable_confusion_path_exits_2_before_evaluating(
        speech_commands, tiny_model_path, tmp_path, capsys, monkeypatch, where):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    monkeypatch.setattr(kws.evaluate, "evaluate", lambda *a, **k: pytest.fail("evaluated first"))
    path = {"under a file": blocker / "c.png", "a folder": tmp_path}[where]
    expect_one_line_error(capsys, ["eval", "--model", str(tiny_model_path), "--data", str(speech_commands.root),
                                   "--no-rounding", "--confusion", str(path)], "--confusion")


def test_kws_eval_confusion_without_matplotlib_exits_2_naming_the_extra(
        speech_commands, tiny_model_path, tmp_path, monkeypatch, capsys):
    """matplotlib is the optional extra `plots`: without it, --confusion is a one-line error."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib(.pyplot)` now fails
    png = tmp_path / "confusion.png"
    expect_one_line_error(capsys, ["eval", "--model", str(tiny_model_path), "--data", str(speech_commands.root),
                                   "--no-rounding", "--confusion", str(png)],
                          "matplotlib", "pip install 'kws[plots]'")
    assert not png.exists()
