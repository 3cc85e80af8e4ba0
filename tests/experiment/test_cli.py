"""End to end from the command line on the tiny default model (real data, real MiniLM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tanbr import cli
from tanbr.experiment.records import read_trace

pytestmark = pytest.mark.data

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.toml"
FAST = [
    "--set", "n_slots=4",
    "--set", "workload.slot_size=16",
    "--set", "oracle.n_candidates=2",
    "--set", "latency.batches=1",
    "--set", "latency.batch_size=4",
]  # fmt: skip


def _folder(out: Path) -> Path:
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return folder


def test_run_writes_a_complete_run_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policies = [
        "--policy", "tanbr", "--policy", "full-moe", "--policy", "slot-oracle",
        "--policy", "task-oracle",
    ]  # fmt: skip
    code = cli.main(["-q", "run", str(CONFIG), *FAST, *policies, "--out", str(tmp_path)])
    assert code == 0
    folder = _folder(tmp_path)
    names = {p.name for p in folder.iterdir()}
    assert {"config.toml", "trace.jsonl", "summary.json", "report.md"} <= names
    assert {"regret.png", "accuracy.png", "mix.png", "coeffs.png", "costs.png"} <= names
    records = list(read_trace(folder / "trace.jsonl"))
    assert len(records) == 4 * 4
    assert {r.policy for r in records} == {"tanbr", "full-moe", "slot-oracle", "task-oracle"}
    assert all(r.accuracy is not None and r.tv is not None for r in records)
    out = capsys.readouterr().out
    assert "policy" in out and f"run folder: {folder}" in out
    # the report command reads the folder back
    assert cli.main(["-q", "report", str(folder), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) == {"policies", "estimator_tv"}
    assert set(summary["policies"]["tanbr"]) == {
        "accuracy", "regret", "latency_p50_ms", "latency_p95_ms", "memory_bytes", "merge_ms",
    }  # fmt: skip
    merged, full = summary["policies"]["tanbr"], summary["policies"]["full-moe"]
    assert merged["memory_bytes"] < full["memory_bytes"]


def test_compare_json_is_exactly_the_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["-q", "compare", str(CONFIG), *FAST, "--set", "policies=['uniform', 'slot-oracle']"]
    assert cli.main([*args, "--json", "--no-plots", "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)  # exactly one JSON document
    assert set(summary) == {"policies", "estimator_tv"}
    assert set(summary["policies"]) == {"uniform", "slot-oracle"}


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", str(tmp_path / "missing.toml")]) == 2
    assert "tanbr: error: config file not found" in capsys.readouterr().err
    assert cli.main(["run", str(CONFIG), "--set", "workload.slotsize=3"]) == 2
    assert "did you mean workload.slot_size" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
