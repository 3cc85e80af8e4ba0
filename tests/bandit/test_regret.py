"""Regret on the synthetic surfaces: Tanbr learns sublinearly and beats the baselines.

Every run is seeded (contexts, policy and reward noise from one seed), so these are
deterministic checks, not statistical trials. The full versions (T up to 2000, 5 seeds) are
marked slow; a small version runs by default.
"""

from __future__ import annotations

import numpy as np
import pytest

from tanbr.bandit.simulate import loglog_slope, run_policy
from tanbr.bandit.surfaces import FAMILIES, Surface

BASELINES = ("neural-grid", "hoo", "linucb-grid", "egreedy-grid", "plug-in")


def mean_curve(policy: str, family: str, dim: int, n_slots: int, seeds: int) -> np.ndarray:
    """Mean cumulative regret over seeds 0..seeds-1, shape (n_slots,)."""
    surface = Surface(family=family, dim=dim)
    runs = [run_policy(policy, surface, n_slots=n_slots, seed=s).cumulative for s in range(seeds)]
    return np.mean(runs, axis=0)


@pytest.mark.parametrize("family", ["multimodal", "ridge"])
def test_tanbr_learns_and_beats_the_baselines_small(family: str) -> None:
    """K=3, T=500, 2 seeds: the quick version of the two slow tests below."""
    tanbr = mean_curve("tanbr", family, 3, 500, 2)
    assert loglog_slope(tanbr, start=100) <= 0.75
    for name in BASELINES:
        other = mean_curve(name, family, 3, 500, 2)
        assert tanbr[-1] < other[-1], (name, tanbr[-1], other[-1])


@pytest.mark.slow
@pytest.mark.parametrize("dim", [2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_tanbr_regret_is_sublinear(family: str, dim: int) -> None:
    """Log-log slope of the mean cumulative regret between T=200 and T=2000 is <= 0.75."""
    curve = mean_curve("tanbr", family, dim, 2000, 3)
    assert loglog_slope(curve, start=200) <= 0.75


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_tanbr_beats_every_baseline_at_t1000(family: str) -> None:
    """K=4: mean cumulative regret at T=1000 over 5 seeds below every learning baseline."""
    tanbr = mean_curve("tanbr", family, 4, 1000, 5)[-1]
    for name in BASELINES:
        other = mean_curve(name, family, 4, 1000, 5)[-1]
        assert tanbr < other, (name, tanbr, other)
