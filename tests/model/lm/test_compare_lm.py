"""``tanbr compare --preset lm``: the preset, and a tiny run on ``lm-tiny`` from the command
line whose summary carries loss and perplexity beside the reward."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tanbr import cli
from tanbr.backend.registry import BackendSpec
from tanbr.experiment.config import load_config
from tanbr.model.lm import DOMAIN_NAMES

FAST = [
    "--set", "n_slots=6",
    "--set", "workload.slot_size=16",
    "--set", "workload.period=2",
    "--set", "workload.ramp=1",
    "--set", "estimator.head=8",
    "--set", "oracle.n_candidates=2",
    "--set", "oracle.rows_per_task=4",
    "--set", "evaluation.sample=8",
    "--set", "evaluation.workers=1",
    "--set", "evaluation.memory=false",
    "--set", "latency.batches=1",
    "--set", "latency.batch_size=4",
    "--set", "model.threads=1",
]  # fmt: skip


def test_the_lm_preset_parses() -> None:
    config = load_config(preset="lm")
    assert config.model.variant == "lm" and not config.model.path
    assert config.workload.kind == "drift"
    assert config.reward.kind == config.evaluation.metric == "log-likelihood"
    assert set(config.policies) >= {
        "tanbr", "tanbr-paper", "plug-in", "uniform", "frequency", "regmean", "fisher",
        "full-moe", "task-oracle", "slot-oracle",
    }  # fmt: skip


def test_lm_variant_names_resolve_to_the_checkpoint_and_its_tasks(
    tiny_lm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TANBR_CACHE", str(tiny_lm.parents[1]))
    spec = BackendSpec(variant="lm-tiny").resolved()
    assert spec.path == str(tiny_lm) and spec.tasks == str(tiny_lm / "tasks.jsonl")
    mine = BackendSpec(variant="lm-tiny", tasks="/x.jsonl").resolved()
    assert mine.tasks == "/x.jsonl"  # a task file of one's own is kept
    assert BackendSpec(variant="tiny").resolved() == BackendSpec(variant="tiny")


def test_compare_preset_lm_on_the_tiny_lm(
    tiny_lm: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TANBR_CACHE", str(tiny_lm.parents[1]))
    args = ["-q", "compare", "--preset", "lm", "--model", "lm-tiny", *FAST]
    assert cli.main([*args, "--json", "--no-plots", "--out", str(tmp_path)]) == 0
    policies = json.loads(capsys.readouterr().out)["policies"]
    assert set(policies) == set(load_config(preset="lm").policies)
    for name, row in policies.items():
        assert 0.0 < row["accuracy"] < 1.0, name
        if name != "task-oracle":  # its reward is scored after serving, under its last merge
            assert math.isclose(row["accuracy"], row["reward"], rel_tol=1e-9), name
        assert 0.0 < row["loss"] < math.log(512) + 1, name
        assert math.isclose(row["perplexity"], math.exp(row["loss"]))
        assert list(row["task_loss"]) == list(DOMAIN_NAMES)
        served = [v for v in row["task_loss"].values() if v is not None]
        assert served and min(served) <= row["loss"] <= max(served)
    assert policies["slot-oracle"]["regret"] == 0.0
    assert policies["tanbr"]["param_bytes"] < policies["full-moe"]["param_bytes"]
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    report = (run / "report.md").read_text()
    assert "Loss per task" in report and "| full-moe |" in report
