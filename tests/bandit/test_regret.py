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
    the log-log slope of the mean cumulative regret from T = 100 on is below 1 (0.66 for
    tanbr, 0.83 for tanbr-paper). Past slot 100 both pay a nearly constant 0.009 per slot
    (the network's fitting error), so the slope keeps rising towards 1 with T; see
    docs/algorithm.md, section 9."""
    curve = mean_curve(policy, "bump", 2, 1000, 2)
    assert loglog_slope(curve, start=100) <= 0.85


#: Where the bench (docs/algorithm.md, section 10) measured Tanbr behind a baseline: K = 2
#: was never tuned on, and two cells at K = 4 and 6 are within the seeds' spread.
MISSES = {
    ("bump", 2): "nucb 9.2 against 11.8",
    ("multimodal", 2): "nucb 15.0 against 16.6",
    ("ridge", 2): "linucb-grid 33.3 against 77.9",
    ("shifted", 2): "neural-grid-anchored 14.6 against 65.2",
    ("plateau", 2): "neural-grid-anchored 7.3 against 11.1",
    ("multimodal", 4): "nucb-anchored 16.5 against 29.3 (Tanbr's seeds: 12 to 46)",
    ("ridge", 6): "nucb-anchored 24.7 against 26.1",
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
