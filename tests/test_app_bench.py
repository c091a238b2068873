"""`kws bench http` runs end to end on a small model and reports what the issue asks for (the
figures themselves are for the benchmark to print, not for a test to judge)."""

import argparse
import json

import pytest
from test_app import model_path  # noqa: F401 (a fixture)

from app import bench, hardening
from app.hardening import counts_text
from app.bench import register
from kws.errors import KwsError


def run_bench(capsys, *argv) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["http", *argv])
    return args.func(args), capsys.readouterr().out


def test_bench_http_reports_rate_latency_and_memory_as_json(model_path, capsys):  # noqa: F811
    code, out = run_bench(capsys, "--model", str(model_path), "--requests", "40", "--warmup", "5",
                          "--clients", "4", "--json")
    result = json.loads(out)
    assert code == 0 and result["failed"] == 0
    assert (result["requests"], result["clients"]) == (40, 4)
    assert result["requests_per_s"] > 0 and 0 < result["p50_ms"] <= result["p99_ms"]
    assert result["rss_after_bytes"] - result["rss_before_bytes"] == result["rss_growth_bytes"]
    assert 10 * 2**20 < result["rss_idle_bytes"] <= result["rss_before_bytes"] + 2**20  # idle, then warmed up
    assert result["server_cpu_ms_per_request"] > 0
    assert 1 <= result["mean_batch"] <= 4  # at most one clip per client in any batch


def test_bench_hardening_reports_slow_clients_crafted_files_and_the_fuzz(model_path, capsys):  # noqa: F811
    parser = argparse.ArgumentParser()
    hardening.register(parser.add_subparsers())
    args = parser.parse_args(["hardening", "--model", str(model_path), "--slow-clients", "3",
                              "--seconds", "2", "--crafted-seconds", "1", "--fuzz", "40", "--json"])
    code, result = args.func(args), json.loads(capsys.readouterr().out)
    assert code == 0
    crafted = list(result["crafted"].values())
    assert crafted[0]["statuses"] == {"422": 4}  # 640 kHz: refused from the header
    assert crafted[1]["statuses"] == crafted[2]["statuses"] == {"200": 4}  # decoded in blocks
    slow = result["slow"]
    assert slow["normal_statuses"] == {"200": slow["normal_requests"]} and slow["normal_max_s"] < 5
    assert sum(result["fuzz"]["statuses"].values()) == 40
    assert all(int(status) < 500 for status in result["fuzz"]["statuses"])


def test_status_counts_read_alike_whatever_the_type_of_their_keys():
    assert counts_text({422: 4, "408": 2}) == "408: 2, 422: 4"


@pytest.mark.parametrize("seconds", ["0.05", "100"])
def test_bench_http_refuses_a_clip_the_service_would_refuse_before_starting_it(capsys, seconds, monkeypatch):
    monkeypatch.setattr(bench, "Server", lambda *a: pytest.fail("the server started first"))
    with pytest.raises(KwsError, match="--clip-seconds must be from 0.1 to 60 s"):
        run_bench(capsys, "--clip-seconds", seconds)
