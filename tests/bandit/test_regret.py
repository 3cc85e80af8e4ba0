"""Regret on the synthetic surfaces: Tanbr and the paper's Tanbr learn sublinearly, and Tanbr
beats the learning baselines.

Every run is seeded (contexts, policy and reward noise from one seed, the reporting seeds
0, 1, ...), so these are deterministic checks, not statistical trials. Defaults were chosen on
other seeds (100 and up) and families (see tanbr.bandit.surfaces). The full comparison (every
reporting family at K = 2, 4, 6 and 8, T = 1000, 5 seeds) is marked slow.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

from tanbr.bandit.simulate import loglog_slope, run_policy
from tanbr.bandit.surfaces import REPORT_FAMILIES, REPORT_SEEDS, Surface

LEARNERS = (
    "tanbr-paper",
    "nucb",
    "nucb-anchored",
    "neural-grid",
    "neural-grid-anchored",
    "hoo",
    "linucb-grid",
    "egreedy-grid",
)
DIMS = (2, 4, 6, 8)


@functools.cache
def mean_curve(
    policy: str, family: str, dim: int, n_slots: int, seeds: int, contextual: bool = True
) -> np.ndarray:
    """Mean cumulative regret over the first ``seeds`` reporting seeds, shape (n_slots,);
    cached so that tests share runs."""
    surface = Surface(family=family, dim=dim, contextual=contextual)
    runs = [
        run_policy(policy, surface, n_slots=n_slots, seed=s).cumulative
        for s in REPORT_SEEDS[:seeds]
    ]
    return np.asarray(np.mean(runs, axis=0))


@pytest.mark.parametrize("policy", ["tanbr", "tanbr-paper"])
def test_regret_is_sublinear_on_a_smooth_surface(policy: str) -> None:
    """The bump with its known optimum, two experts and two task types, T = 1000, two seeds:
    the log-log slope of the mean cumulative regret from T = 100 on is below 1 (0.69 for
    tanbr, 0.83 for tanbr-paper). Past slot 100 both pay a nearly constant 0.003-0.01 per slot
    (the network's fitting error), so the slope keeps rising towards 1 with T; see
    docs/algorithm.md, section 9."""
    curve = mean_curve(policy, "bump", 2, 1000, 2)
    assert loglog_slope(curve, start=100) <= 0.85


def test_forced_exploration_breaks_a_lock_in() -> None:
    """Two experts, the held-out shifted surface (each type's best merge leans towards a
    generalist expert, so the optimum is interior), 600 slots, reporting seeds 0-4. Without
    forced exploration the network's width cannot tell an interior merge it never tried from
    the vertices it did: three seeds stay near a vertex for long (cumulative regret 39 to 69).
    With it every seed escapes (7.6 to 16.7; mean 10.9 against 41.5)."""
    surface = Surface(family="shifted", dim=2)

    def regrets(explore: float) -> np.ndarray:
        return np.array([
            run_policy("tanbr", surface, n_slots=600, seed=s,
                       policy_params={"explore": explore}).cumulative[-1]
            for s in REPORT_SEEDS
        ])  # fmt: skip

    forced, greedy = regrets(0.2), regrets(0.0)
    assert forced.mean() < 0.5 * greedy.mean()
    assert forced.max() < 0.5 * greedy.max()


#: Where the bench (docs/algorithm.md, section 10) measured Tanbr behind a baseline.
MISSES = {
    ("plateau", 2): "neural-grid-anchored 7.3 against 8.0",
}


def cells() -> list[object]:
    out: list[object] = []
    for dim in DIMS:
        for family in REPORT_FAMILIES:
            miss = MISSES.get((family, dim))
            marks = [pytest.mark.xfail(reason=miss, strict=True)] if miss else []
            out.append(pytest.param(family, dim, marks=marks))
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("family", "dim"), cells())
def test_tanbr_beats_every_learning_baseline_at_t1000(family: str, dim: int) -> None:
    """Mean cumulative regret at T = 1000 over 5 seeds below every other learning policy."""
    tanbr = mean_curve("tanbr", family, dim, 1000, 5)[-1]
    for name in LEARNERS:
        other = mean_curve(name, family, dim, 1000, 5)[-1]
        assert tanbr < other, (name, tanbr, other)
