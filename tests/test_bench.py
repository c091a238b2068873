"""`kws bench stream`, `live` and `model`: a tiny run gives every key with sane values.
Timings themselves are never asserted (that is what the benchmarks are for)."""

import json

import pytest
import torch

from kws.cli import build_parser, main
from kws.labels import LABELS
from kws.model import load_model, preset, state_bytes
from kws.runtime import save_engine


def test_bench_stream_json_has_the_issue_keys_with_sane_values(tiny_edge_model_path, capsys):
    threads = torch.get_num_threads()
    try:
        code = main(["bench", "stream", "--model", str(tiny_edge_model_path), "--seconds", "1.5",
                     "--repeats", "1", "--rss-seconds", "1", "--json"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("rtf_10ms", "rtf_32ms", "rtf_100ms", "cpu_rtf_32ms", "rtf_32ms_torch_stream",
                "rtf_sliding_window_forward", "rtf_sliding_window_engine"):
        assert 0 < result[key] < 1000
    assert result["rtf_sliding_window"] == min(result["rtf_sliding_window_forward"],
                                               result["rtf_sliding_window_engine"])
    assert result["sliding_window_ratio"] == pytest.approx(
        result["rtf_sliding_window"] / result["rtf_100ms"])
    cfg = preset("edge", LABELS, n_layers=1, width=8)
    assert result["state_bytes"] == state_bytes(cfg)
    assert result["peak_rss_bytes"] > 10 * 2**20  # a Python process
    assert result["machine"]["threads"] == 1


def test_bench_stream_of_a_model_file_times_the_engine_alone(tiny_edge_model_path, tmp_path, capsys):
    save_engine(tmp_path / "m.npz", *load_model(tiny_edge_model_path).inference_arrays())
    assert main(["bench", "stream", "--model", str(tmp_path / "m.npz"), "--seconds", "1.5",
                 "--repeats", "1", "--rss-seconds", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "rtf_32ms_torch_stream" not in result and "rtf_sliding_window_forward" not in result
    assert result["rtf_sliding_window"] == result["rtf_sliding_window_engine"] > 0


def test_bench_live_plays_the_file_through_the_worker_beside_the_bench(tiny_edge_model_path, capsys):
    assert main(["bench", "live", "--model", str(tiny_edge_model_path), "--seconds", "1",
                 "--rate", "44100", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["audio_seconds"] == pytest.approx(1.0, abs=0.02)  # all of it, resampled
    assert 0 < result["rtf_live"] < 1000 and 0 < result["rtf_bench"] < 1000
    assert result["live_over_bench"] == pytest.approx(result["rtf_live"] / result["rtf_bench"])
    assert 0 < result["cpu_rtf_live"] < 1000 and 0 < result["cpu_rtf_bench"] < 1000
    assert 0 < result["rtf_paced"] < 1000 and 0 < result["rtf_spun"] < 1000
    assert 0 < result["cpu_rtf_spun"] <= result["rtf_spun"] * 1.5
    assert result["cpu_live_over_paced"] == pytest.approx(result["cpu_rtf_live"] / result["cpu_rtf_paced"])


def test_bench_model_json_times_training_and_inference_per_preset(capsys):
    threads = torch.get_num_threads()
    try:
        code = main(["bench", "model", "--presets", "edge", "--repeats", "1", "--batch", "2",
                     "--threads", "1", "--json"])
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    edge = result["presets"]["edge"]
    assert set(result["presets"]) == {"edge"}
    for key in ("train_seconds_per_clip", "offline_seconds_per_audio_second",
                "stream_32ms_seconds_per_audio_second"):
        assert 0 < edge[key] < 1000
    assert edge["parameters"] > 0 and edge["stride"] == 160
    assert set(edge["mingru_train_pass_seconds"]) == {"stepwise", "scan"}
    assert all(0 < t < 1000 for t in edge["mingru_train_pass_seconds"].values())


def test_bench_model_refuses_an_unknown_preset(capsys):
    assert main(["bench", "model", "--presets", "huge"]) == 2
    assert "unknown preset" in capsys.readouterr().err


@pytest.mark.parametrize("rate", ["7", "200000", "16000.5", "fast"])
def test_bench_live_refuses_a_rate_no_microphone_has_in_one_line(capsys, rate):
    with pytest.raises(SystemExit) as stop:
        main(["bench", "live", "--rate", rate])
    assert stop.value.code == 2 and "a sample rate from 4000 to 192000 Hz" in capsys.readouterr().err


def test_bench_has_subcommands_that_other_modules_can_extend(monkeypatch):
    import sys
    import types

    import kws.bench

    extra = types.ModuleType("kws_test_extra_bench")
    extra.register = lambda sub: sub.add_parser("extra").set_defaults(func=lambda a: 0)
    monkeypatch.setitem(sys.modules, "kws_test_extra_bench", extra)
    monkeypatch.setattr(kws.bench, "BENCH_MODULES", ("kws_test_extra_bench",))
    args = build_parser(["bench"]).parse_args(["bench", "extra"])
    assert args.func(args) == 0
    assert build_parser(["bench"]).parse_args(["bench", "stream"]).func is kws.bench.bench_stream
