"""End to end from the command line on the tiny default model (real data, real MiniLM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tanbr import cli
from tanbr.experiment.records import read_trace
from tanbr.experiment.summary import PUBLIC_KEYS

pytestmark = pytest.mark.data

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.toml"
FAST = [
    "--set", "evaluation.memory=false",
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
    memory = ["--set", "evaluation.memory=true"]
    code = cli.main(["-q", "run", str(CONFIG), *FAST, *memory, *policies, "--out", str(tmp_path)])
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
    assert set(summary) == {"policies", "estimator_tv", "signature", "dtype", "wall_s"}
    assert set(summary["policies"]["tanbr"]) == set(PUBLIC_KEYS)
    merged, full = summary["policies"]["tanbr"], summary["policies"]["full-moe"]
    assert merged["param_bytes"] < full["param_bytes"]
    # measured in serving processes: the lean merged model holds less than the full MoE
    assert 0 < merged["model_rss_bytes"] < full["model_rss_bytes"]
    assert merged["rss_peak_bytes"] >= merged["rss_steady_bytes"] > merged["model_rss_bytes"]
    assert summary["policies"]["slot-oracle"]["regret"] == 0.0
    assert merged["estimator_ms_per_request"] > 0 and full["estimator_ms_per_request"] == 0


def test_compare_json_is_exactly_the_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["-q", "compare", str(CONFIG), *FAST, "--set", "policies=['uniform', 'slot-oracle']"]
    assert cli.main([*args, "--json", "--no-plots", "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)  # exactly one JSON document
    assert set(summary) == {"policies", "estimator_tv", "signature", "dtype", "wall_s"}
    assert set(summary["policies"]) == {"uniform", "slot-oracle"}


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", str(tmp_path / "missing.toml")]) == 2
    assert "tanbr: error: config file not found" in capsys.readouterr().err
    assert cli.main(["run", str(CONFIG), "--set", "workload.slotsize=3"]) == 2
    assert "did you mean workload.slot_size" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


def test_parallel_workers_give_the_same_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two worker processes reproduce the one-process run slot for slot (latency aside)."""
    args = [
        "-q", "compare", str(CONFIG), *FAST, "--no-plots", "--set", "seeds=[0, 1]",
        "--set", "policies=['tanbr', 'plug-in', 'uniform']",
    ]  # fmt: skip
    folders = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        code = cli.main([*args, "--set", f"evaluation.workers={workers}", "--out", str(out)])
        assert code == 0
        folders.append(_folder(out))
    capsys.readouterr()
    one, two = (list(read_trace(f / "trace.jsonl")) for f in folders)
    assert [(r.policy, r.seed, r.slot) for r in one] == [(r.policy, r.seed, r.slot) for r in two]
    for a, b in zip(one, two, strict=True):
        assert a.action == b.action and a.accuracy == b.accuracy and a.reward == b.reward
    summaries = [json.loads((f / "summary.json").read_text()) for f in folders]
    for name in ("tanbr", "plug-in", "uniform"):
        # one probe per seed and policy, run interleaved after the runs in both cases
        assert summaries[1]["policies"][name]["latency_p50_ms"] > 0
    assert cli.main([*args, "--set", "evaluation.workers=0", "--out", str(tmp_path)]) == 2
    assert "evaluation.workers must be >= 1" in capsys.readouterr().err


def test_label_free_all_the_way_on_an_unlabeled_request_trace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A trace of requests no pool knows carries no truth at all: with the proxy reward the
    policy still gets a reward every slot (agreement with the full MoE) and learns."""
    trace = tmp_path / "trace.jsonl"
    words = ["film", "Sitzung", "language", "stocks", "senator", "study", "sesión", "pizza"]
    with trace.open("w", encoding="utf-8") as f:
        for slot in range(3):
            for i, word in enumerate(words):
                f.write(json.dumps({"slot": slot, "text": f"a {word} request {slot}.{i}"}) + "\n")
    requests = f"workload.requests={json.dumps(str(trace))}"
    args = ["-q", "run", str(CONFIG), *FAST, "--policy", "tanbr", "--policy", "uniform",
            "--set", "reward.kind=proxy", "--set", "workload.kind=requests",
            "--set", requests, "--out", str(tmp_path)]  # fmt: skip
    assert cli.main(args) == 0
    records = list(read_trace(_folder(tmp_path) / "trace.jsonl"))
    assert {r.policy for r in records} == {"tanbr", "uniform"}  # no oracle without truth
    assert all(r.accuracy is None and r.reward is not None and r.n_scored > 0 for r in records)
    summary = json.loads((_folder(tmp_path) / "summary.json").read_text())
    assert summary["policies"]["tanbr"]["reward"] is not None
    capsys.readouterr()
    assert cli.main([*args[:-2], "--policy", "slot-oracle", "--out", str(tmp_path / "x")]) == 2
    assert "'slot-oracle' reads each slot's truth" in capsys.readouterr().err


def test_compare_with_task_aware_regmean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """parameterization.kind = task-regmean end to end: the bandit policies, plug-in and the
    slot oracle serve RegMean merges solved from their actions, charged as merges."""
    args = [
        "-q", "compare", str(CONFIG), *FAST,
        "--set", "parameterization.kind=task-regmean",
        "--set", "policies=['tanbr', 'plug-in', 'regmean', 'slot-oracle']",
    ]  # fmt: skip
    assert cli.main([*args, "--json", "--no-plots", "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    policies = summary["policies"]
    assert set(policies) == {"tanbr", "plug-in", "regmean", "slot-oracle"}
    assert all(0.0 <= p["accuracy"] <= 1.0 for p in policies.values())
    assert policies["plug-in"]["merge_ms"] > 0 and policies["tanbr"]["merge_ms"] > 0
    assert policies["regmean"]["merge_ms"] == 0.0  # a static merge: merged once
    records = list(read_trace(_folder(tmp_path) / "trace.jsonl"))
    assert all(r.coeffs is None and r.action is not None for r in records if r.policy == "tanbr")
    # grouped merges are refused with this parameterization
    grouped = [*args, "--set", "merge.experts=2", "--out", str(tmp_path / "g")]
    assert cli.main(grouped) != 0
    assert "task-regmean" in capsys.readouterr().err
