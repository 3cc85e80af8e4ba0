"""Cross-check of our HOO against PyXAB's truncated HOO on the same non-contextual functions."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from tanbr.bandit import Box, make_policy
from tanbr.bandit.surfaces import Surface

pyxab_hoo = pytest.importorskip("PyXAB.algos.HOO")

SEEDS = range(5)
NOISE = 0.1
Function = Callable[[np.ndarray], np.ndarray]


def garland(s: np.ndarray) -> np.ndarray:
    """PyXAB's Garland function (many local maxima), squeezed into [0.1, 0.9]."""
    return np.asarray(0.1 + 0.8 * s * (1 - s) * (4 - np.sqrt(np.abs(np.sin(60 * s)))))


def static_bump(s: np.ndarray) -> np.ndarray:
    """Our non-contextual bump on Simplex(2), read along its edge ``a = (s, 1 - s)``."""
    surface = Surface(family="bump", dim=2, contextual=False)
    s = np.atleast_1d(s)
    return surface.mean(np.full(2, 0.5), np.stack([s, 1.0 - s], axis=1))


GRID = np.linspace(0.0, 1.0, 200_001)


def regret_ours(f: Function, rounds: int, seed: int) -> float:
    policy = make_policy(
        "hoo", space=Box(low=(0.0,), high=(1.0,)), context_dim=1,
        rng=np.random.default_rng(seed), nu=1.0, rho=0.5, horizon=rounds,
    )  # fmt: skip
    best = float(f(GRID).max())
    noise = np.random.default_rng(1000 + seed)
    total, x = 0.0, np.zeros(1)
    for _ in range(rounds):
        a = policy.select(x)
        value = float(f(a)[0])
        policy.update(x, a, value + noise.uniform(-NOISE, NOISE))
        total += best - value
    return total


def regret_pyxab(f: Function, rounds: int, seed: int) -> float:
    algo = pyxab_hoo.T_HOO(nu=1.0, rho=0.5, rounds=rounds, domain=[[0.0, 1.0]])
    best = float(f(GRID).max())
    noise = np.random.default_rng(1000 + seed)
    total = 0.0
    for t in range(1, rounds + 1):
        point = algo.pull(t)
        value = float(f(np.array(point))[0])
        algo.receive_reward(t, value + noise.uniform(-NOISE, NOISE))
        total += best - value
    return total


def check_agreement(f: Function, rounds: int) -> None:
    ours = np.mean([regret_ours(f, rounds, s) for s in SEEDS])
    theirs = np.mean([regret_pyxab(f, rounds, s) for s in SEEDS])
    assert abs(ours - theirs) <= 0.25 * theirs, (ours, theirs)
    # and both learn: clearly below the regret of a uniformly random point
    random_regret = rounds * (f(GRID).max() - f(GRID).mean())
    assert ours < 0.8 * random_regret, (ours, random_regret)


@pytest.mark.parametrize("f", [static_bump, garland], ids=["bump", "garland"])
def test_hoo_matches_pyxab_within_25_percent(f: Function) -> None:
    check_agreement(f, rounds=300)


@pytest.mark.slow
@pytest.mark.parametrize("f", [static_bump, garland], ids=["bump", "garland"])
def test_hoo_matches_pyxab_within_25_percent_long(f: Function) -> None:
    check_agreement(f, rounds=1500)


def test_static_bump_peak_is_where_the_surface_says() -> None:
    surface = Surface(family="bump", dim=2, contextual=False)
    a_star = surface.best_action(np.full(2, 0.5))
    best = surface.best_value(np.full(2, 0.5))
    assert float(static_bump(a_star[:1])[0]) == pytest.approx(best)
    assert float(static_bump(GRID).max()) == pytest.approx(best)
