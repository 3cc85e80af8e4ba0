"""Cross-check of our HOO against PyXAB's truncated HOO on the same non-contextual functions."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from tanbr.bandit import Box, make_policy
from tanbr.bandit.surfaces import HIGH, Surface

pyxab_hoo = pytest.importorskip("PyXAB.algos.HOO")

ROUNDS = 600
SEEDS = range(5)
NOISE = 0.1


def garland(s: float) -> float:
    """PyXAB's Garland function (many local maxima), squeezed into [0.1, 0.9]."""
    return 0.1 + 0.8 * s * (1 - s) * (4 - np.sqrt(abs(np.sin(60 * s))))


def static_bump(s: float) -> float:
    """Our non-contextual bump on Simplex(2), read along its edge ``a = (s, 1 - s)``."""
    surface = Surface(family="bump", dim=2, contextual=False)
    return float(surface.mean(np.full(2, 0.5), np.array([s, 1.0 - s])))


def f_max(f: Callable[[float], float]) -> float:
    return max(f(s) for s in np.linspace(0.0, 1.0, 200_001))


def regret_ours(f: Callable[[float], float], best: float, seed: int) -> float:
    policy = make_policy(
        "hoo", space=Box(low=(0.0,), high=(1.0,)), context_dim=1,
        rng=np.random.default_rng(seed), nu=1.0, rho=0.5, horizon=ROUNDS,
    )  # fmt: skip
    noise = np.random.default_rng(1000 + seed)
    total, x = 0.0, np.zeros(1)
    for _ in range(ROUNDS):
        a = policy.select(x)
        value = f(float(a[0]))
        policy.update(x, a, value + noise.uniform(-NOISE, NOISE))
        total += best - value
    return total


def regret_pyxab(f: Callable[[float], float], best: float, seed: int) -> float:
    algo = pyxab_hoo.T_HOO(nu=1.0, rho=0.5, rounds=ROUNDS, domain=[[0.0, 1.0]])
    noise = np.random.default_rng(1000 + seed)
    total = 0.0
    for t in range(1, ROUNDS + 1):
        point = algo.pull(t)
        value = f(float(point[0]))
        algo.receive_reward(t, value + noise.uniform(-NOISE, NOISE))
        total += best - value
    return total


@pytest.mark.parametrize("f", [static_bump, garland], ids=["bump", "garland"])
def test_hoo_matches_pyxab_within_25_percent(f: Callable[[float], float]) -> None:
    best = f_max(f)
    ours = np.mean([regret_ours(f, best, s) for s in SEEDS])
    theirs = np.mean([regret_pyxab(f, best, s) for s in SEEDS])
    assert abs(ours - theirs) <= 0.25 * theirs, (ours, theirs)
    # and both actually learn: far below a random policy's regret
    grid = np.linspace(0.0, 1.0, 1001)
    random_regret = ROUNDS * (best - np.mean([f(s) for s in grid]))
    assert ours < 0.5 * random_regret


def test_static_bump_peak_is_where_the_surface_says() -> None:
    surface = Surface(family="bump", dim=2, contextual=False)
    a_star = surface.best_action(np.full(2, 0.5))
    assert static_bump(float(a_star[0])) == pytest.approx(HIGH)
