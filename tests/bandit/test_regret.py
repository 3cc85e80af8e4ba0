"""Regret on the synthetic surfaces: Tanbr learns sublinearly and beats the baselines.

Every run is seeded (contexts, policy and reward noise from one seed), so these are
deterministic checks, not statistical trials. The full versions (every family at K = 2, 4, 6
and 8, T up to 2000, 5 seeds) are marked slow; a small version at K = 2 and K = 6 runs by
default.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from tanbr.bandit.simulate import loglog_slope, run_policy
from tanbr.bandit.surfaces import FAMILIES, Surface

BASELINES = ("neural-grid", "hoo", "linucb-grid", "egreedy-grid", "plug-in")
DIMS = (2, 4, 6, 8)


@functools.cache
def mean_curve(policy: str, family: str, dim: int, n_slots: int, seeds: int) -> np.ndarray:
    """Mean cumulative regret over seeds 0..seeds-1, shape (n_slots,); cached so that the
    slope and the ranking tests share Tanbr's runs."""
    surface = Surface(family=family, dim=dim)
    runs = [run_policy(policy, surface, n_slots=n_slots, seed=s).cumulative for s in range(seeds)]
    return np.asarray(np.mean(runs, axis=0))


@pytest.mark.parametrize(
    ("family", "dim"), [("multimodal", 2), ("ridge", 2), ("bump", 6), ("ridge", 6)]
)
def test_tanbr_learns_and_beats_the_baselines_small(family: str, dim: int) -> None:
    """T=500, 2 seeds: the quick version of the two slow tests below. K = 2 is where a fine
    grid is hardest to beat, K = 6 where the plug-in merge is."""
    tanbr = mean_curve("tanbr", family, dim, 500, 2)
    assert loglog_slope(tanbr, start=100) <= 0.75
    for name in BASELINES:
        other = mean_curve(name, family, dim, 500, 2)
        assert tanbr[-1] < other[-1], (name, tanbr[-1], other[-1])


@pytest.mark.slow
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("family", FAMILIES)
def test_tanbr_regret_is_sublinear(family: str, dim: int) -> None:
    """Log-log slope of the mean cumulative regret (5 seeds) between T=200 and T=2000 <= 0.75."""
    curve = mean_curve("tanbr", family, dim, 2000, 5)
    assert loglog_slope(curve, start=200) <= 0.75


@pytest.mark.slow
@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("family", FAMILIES)
def test_tanbr_beats_every_baseline_at_t1000(family: str, dim: int) -> None:
    """Mean cumulative regret at T=1000 over 5 seeds below every learning baseline and plug-in.

    Tanbr's value is read from the T=2000 runs of the slope test: the first 1000 slots of a
    seeded run do not depend on its length.
    """
    tanbr = mean_curve("tanbr", family, dim, 2000, 5)[999]
    for name in BASELINES:
        other = mean_curve(name, family, dim, 1000, 5)[-1]
        assert tanbr < other, (name, tanbr, other)
