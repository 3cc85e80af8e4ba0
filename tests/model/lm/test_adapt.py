"""``tanbr adapt``: the normalisation layers (only) tuned under random merges of the tiny LM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tanbr import cli
from tanbr.backend.registry import BackendSpec, open_backend
from tanbr.model import load_checkpoint
from tanbr.model.adapt import ADAPT_FILE, AdaptSettings, PlanSampler, adapt, norm_parameters
from tanbr.model.lm import DOMAIN_NAMES


def test_norm_parameters_are_the_norm_vectors_only(tiny_lm: Path) -> None:
    model = load_checkpoint(tiny_lm).model
    norms = norm_parameters(model)
    # two per decoder layer (before attention, before the MoE block) and the final norm
    n_layers = model.config.num_hidden_layers
    assert len(norms) == 2 * n_layers + 1
    assert all("norm" in name and p.dim() == 1 for name, p in norms.items())
    assert not any("experts" in name or "gate" in name for name in norms)


def test_plan_sampler_draws_feasible_plans_of_both_kinds() -> None:
    rng = np.random.default_rng(0)
    profiles = {
        t: {b: rng.dirichlet(np.ones(8)) for b in ("layers.0.moe", "layers.1.moe")}
        for t in ("a", "b", "c")
    }
    sampler = PlanSampler(profiles, rng=np.random.default_rng(1), tasks_share=0.5, full_share=0.2)
    plans = [sampler.draw() for _ in range(200)]
    merges = [p for p in plans if p is not None]
    assert 20 < len(plans) - len(merges) < 60  # ~20% full MoE
    shared = 0
    for plan in merges:
        assert set(plan) == {"layers.0.moe", "layers.1.moe"}
        for c in plan.values():
            assert c.shape == (8,) and (c >= 0).all() and abs(c.sum() - 1) < 1e-12
        shared += np.array_equal(plan["layers.0.moe"], plan["layers.1.moe"])
    assert 0.3 < shared / len(merges) < 0.7  # expert-simplex draws share one vector


def test_adapt_tunes_only_the_norms_and_lowers_the_merged_loss(
    tiny_lm: Path, tmp_path: Path
) -> None:
    out = tmp_path / "adapted"
    settings = AdaptSettings(steps=30, batch_size=8, lr=2e-2, eval_plans=2, eval_rows=8)
    result = adapt(tiny_lm, tiny_lm / "tasks.jsonl", out, settings=settings)

    before = load_checkpoint(tiny_lm).model
    after = load_checkpoint(out).model  # the output folder loads as a checkpoint
    norms = set(norm_parameters(after))
    old, new = dict(before.named_parameters()), dict(after.named_parameters())
    assert set(old) == set(new)
    for name in old:
        if name in norms:
            continue
        assert torch.equal(old[name], new[name]), name  # bit for bit
    moved = [n for n in norms if not torch.equal(old[n], new[n])]
    assert len(moved) == len(norms)
    assert result.tuned == sorted(norms)

    assert result.after.train_sampled < result.before.train_sampled
    assert len(result.train_curve) == settings.steps
    data = json.loads((out / ADAPT_FILE).read_text())
    for when in ("before", "after"):
        assert list(data[when]["full"]) == list(DOMAIN_NAMES)
        assert set(data["gap"][when]) == {"uniform", "usage_all", "own", "sampled"}

    # served like any user's folder, on the task file written beside it
    spec = BackendSpec(path=str(out), tasks=str(out / "tasks.jsonl"))
    backend, _, test = open_backend(spec)
    assert backend.kind == "lm" and test.task_names == tuple(DOMAIN_NAMES)
    with pytest.raises(ValueError, match="exists and is not empty"):
        adapt(tiny_lm, tiny_lm / "tasks.jsonl", out, settings=settings)


def test_adapt_command(
    tiny_lm: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("TANBR_CACHE", str(tiny_lm.parents[1]))  # lm-tiny resolves to the fixture
    out = tmp_path / "cli-adapted"
    args = ["-q", "adapt", "--model", "lm-tiny", "--steps", "4", "--eval-rows", "4"]
    assert cli.main([*args, "--threads", "1", "--out", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["source"] == str(tiny_lm) and data["folder"] == str(out)
    assert data["settings"]["steps"] == 4 and len(data["train_curve"]) == 4
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    code = cli.main(["adapt", "--model", str(tiny_lm), "--tasks", str(tmp_path / "no.jsonl")])
    assert code == 2
    assert "task file not found" in capsys.readouterr().err
