"""Per-domain losses and plain merges of the tiny language model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tanbr.model import validate_coeffs
from tanbr.model.lm import DOMAIN_NAMES, EvalSettings, evaluate_lm
from tanbr.model.lm.evaluate import specialisation


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_rows must be >= 0"):
        EvalSettings(max_rows=-1)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        EvalSettings(batch_size=0)


def test_specialisation_names_each_domains_top_expert() -> None:
    usage = {
        "a": {"b0": np.array([0.7, 0.2, 0.1]), "b1": np.array([0.2, 0.3, 0.5])},
        "b": {"b0": np.array([0.1, 0.8, 0.1]), "b1": np.array([0.2, 0.3, 0.5])},
    }
    out = specialisation(usage, ["b0", "b1"])
    assert out["top"]["b0"] == {"a": [0, 0.7], "b": [1, 0.8]}
    assert out["tv"] == {"b0": 0.6, "b1": 0.0}
    assert out["summary"].startswith("layer 0 (TV 0.60): a e0 0.70, b e1 0.80; layer 1")


def test_evaluate_reports_full_and_merged_losses(tiny_lm: Path) -> None:
    out = evaluate_lm(tiny_lm, settings=EvalSettings(max_rows=3, batch_size=8))
    assert out["domains"] == list(DOMAIN_NAMES)
    assert out["rows"]["scored"] == dict.fromkeys(DOMAIN_NAMES, 3)
    for name in ("full", "uniform", "usage_all", "own"):
        assert set(out["loss"][name]) == set(DOMAIN_NAMES)
        assert all(math.isfinite(v) and v > 0 for v in out["loss"][name].values())
    for d in DOMAIN_NAMES:
        best = out["loss"]["best"][d]
        candidates = [out["loss"]["uniform"][d], out["loss"]["usage_all"][d]]
        candidates += [out["cross"][m][d] for m in DOMAIN_NAMES]
        assert best["loss"] == pytest.approx(min(candidates), abs=1e-4)
        assert out["cross"][d][d] == out["loss"]["own"][d]
        assert out["perplexity"]["full"][d] == pytest.approx(
            math.exp(out["loss"]["full"][d]), rel=1e-3
        )
        for block in out["blocks"]:  # each usage is a plan's coeffs, as stored
            validate_coeffs(out["usage"][d][block], 8, block=block)
    assert all(d in out["specialisation"]["summary"] for d in DOMAIN_NAMES)
    assert out["needs_adaptation"] == (out["max_own_gap"] > out["adaptation_threshold"])


def test_evaluation_is_deterministic(tiny_lm: Path) -> None:
    first = evaluate_lm(tiny_lm, settings=EvalSettings(max_rows=2))
    again = evaluate_lm(tiny_lm, settings=EvalSettings(max_rows=2))
    assert first["loss"] == again["loss"]
