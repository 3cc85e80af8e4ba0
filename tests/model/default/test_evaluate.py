"""eval-model: the report's structure and consistency, the probe, the CLI in process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tanbr import cli
from tanbr.model.default.evaluate import (
    METHODS,
    EvalSettings,
    candidate_plans,
    evaluate_model,
    fit_probe,
    paired_ratio,
    per_task_accuracy,
)


def test_per_task_accuracy_counts_joint_labels() -> None:
    pred = np.array([0, 1, 2, 2, 3])
    targets = np.array([0, 1, 1, 2, 0])
    tasks = np.array([0, 0, 1, 1, 1])
    assert per_task_accuracy(pred, targets, tasks, ("a", "b")) == {"a": 1.0, "b": 1.0 / 3.0}


def test_candidate_plans_are_on_the_simplex() -> None:
    rng = np.random.default_rng(0)
    task_plans = {
        "a": {"l0": np.array([0.7, 0.1, 0.2]), "l1": np.array([0.9, 0.05, 0.05])},
        "b": {"l0": np.array([0.1, 0.8, 0.1]), "l1": np.array([0.2, 0.7, 0.1])},
    }
    freq = {"l0": np.array([0.4, 0.45, 0.15]), "l1": np.array([0.55, 0.375, 0.075])}
    plans = candidate_plans(task_plans, freq, 6, rng)
    assert {"uniform", "frequency", "task:a", "task:b"} <= set(plans)
    assert len(plans) == 4 + 6
    for plan in plans.values():
        assert set(plan) == {"l0", "l1"}
        for c in plan.values():
            assert c.shape == (3,) and np.all(c >= 0) and abs(c.sum() - 1) < 1e-9


def test_probe_learns_a_separable_problem() -> None:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 16)) * 3
    y = rng.integers(0, 4, size=400)
    x = centers[y] + rng.normal(size=(400, 16))
    predict = fit_probe(x[:300], y[:300], x[300:350], y[300:350], 4)
    assert (predict(x[350:]) == y[350:]).mean() > 0.95


@pytest.mark.data
def test_report_is_complete_and_consistent(tiny_path: Path) -> None:
    report = evaluate_model(tiny_path, EvalSettings(n_candidates=2, latency_repeats=2))
    assert set(report) == {"tasks", "mean", "cross_merge", "latency"}
    tasks = list(report["tasks"])
    assert len(tasks) >= 6
    for row in [*report["tasks"].values(), report["mean"]]:
        assert set(row) == set(METHODS)
        assert all(0.0 <= v <= 1.0 for v in row.values())
    for method in METHODS:
        mean = np.mean([report["tasks"][t][method] for t in tasks])
        assert report["mean"][method] == pytest.approx(mean, abs=1e-3)
    assert set(report["cross_merge"]) == set(tasks)
    for t in tasks:
        assert report["cross_merge"][t][t] == report["tasks"][t]["oracle"]
    for key in ("end_to_end", "moe_layers"):
        assert set(report["latency"][key]) == {"full_ms", "merged_ms", "paired_ratio"}
        assert all(v > 0 for v in report["latency"][key].values())


def test_paired_ratio_cancels_load_that_hits_one_repeat() -> None:
    # the merged model takes 0.6 of the full one; load (3x) slowed both runs of repeat 2 and the
    # full run of repeat 3: the ratio of medians pairs a loaded full run with a quiet merged one
    full = [100.0, 300.0, 300.0]
    merged = [60.0, 180.0, 70.0]
    assert np.median(merged) / np.median(full) == pytest.approx(0.7 / 3.0)
    assert paired_ratio(full, merged) == 0.6
    with pytest.raises(ValueError, match="same number"):
        paired_ratio(full, merged[:2])
    with pytest.raises(ValueError, match="same number"):
        paired_ratio([], [])


@pytest.mark.data
def test_cli_prints_one_json_document(tiny_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["build-model", "--variant", "tiny", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and Path(out["path"]) == tiny_path
    args = ["eval-model", "--variant", "tiny", "--json", "--candidates", "0", "--repeats", "1"]
    assert cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"tasks", "mean", "cross_merge", "latency"}
    assert cli.main(["eval-model", "--variant", "nope"]) == 2
    assert "variant must be one of" in capsys.readouterr().err


@pytest.mark.data
def test_routing_diagnostics_add_up(tiny_path: Path) -> None:
    settings = EvalSettings(n_candidates=0, latency_repeats=1, routing=True)
    report = evaluate_model(tiny_path, settings)
    routing = report["routing"]
    blocks = routing["task_id_accuracy"]
    assert len(blocks) >= 1 and all(0.0 <= v <= 1.0 for v in blocks.values())
    assert routing["share_routed_home"] == list(blocks.values())[-1]
    share = routing["share_routed_home"]
    home, away = routing["full_moe_routed_home"], routing["full_moe_routed_away"]
    # the two groups partition the test requests: their weighted accuracy is the full MoE's
    from tanbr.model.default import DefaultModel
    from tanbr.model.default.evaluate import suite_of

    counts = suite_of(DefaultModel.load(tiny_path)).counts()
    tasks = report["tasks"]
    weights = [counts[t]["test"] for t in tasks]
    full = float(np.average([tasks[t]["full_moe"] for t in tasks], weights=weights))
    mixed = share * (home or 0.0) + (1.0 - share) * (away or 0.0)
    assert mixed == pytest.approx(full, abs=1e-3)  # per-task figures are rounded to 1e-4
    assert 0.0 <= routing["text_task_id_probe"] <= 1.0


@pytest.mark.data
def test_latency_in_bfloat16_says_so(tiny_path: Path) -> None:
    settings = EvalSettings(n_candidates=0, latency_repeats=1, latency_dtype="bfloat16")
    latency = evaluate_model(tiny_path, settings)["latency"]
    assert latency["dtype"] == "bfloat16"
    assert all(v > 0 for key in ("end_to_end", "moe_layers") for v in latency[key].values())
    with pytest.raises(ValueError, match="latency_dtype must be one of"):
        EvalSettings(latency_dtype="float8")
