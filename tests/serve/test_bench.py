"""``tanbr bench serve`` end to end on the tiny model (two real server subprocesses)."""

from __future__ import annotations

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


def test_bench_serve_rejects_bad_arguments() -> None:
    for extra in (["--requests", "0"], ["--concurrency", "0"], ["--feedback", "2"]):
        assert main(["bench", "serve", *extra]) == 2
