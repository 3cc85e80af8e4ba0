"""Synthetic surfaces know their optimum; schedules produce valid mixes; the loop records regret."""

from __future__ import annotations

import numpy as np
import pytest

from tanbr.bandit import Simplex, make_policy
from tanbr.bandit.simulate import loglog_slope, run_policy, simulate
from tanbr.bandit.surfaces import FAMILIES, HIGH, LOW, SCHEDULES, Surface, make_mixes, sharpen


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_known_optimum_beats_every_other_action(family: str, k: int) -> None:
    rng = np.random.default_rng(k)
    surface = Surface(family=family, dim=k)
    for x in rng.dirichlet(np.ones(k), 20):
        best = surface.best_action(x)
        assert Simplex(k).contains(best)
        assert float(surface.mean(x, best)) == pytest.approx(HIGH)
        others = Simplex(k).sample(rng, 2000)
        # local perturbations too: the optimum is a true maximum, not just a good point
        near = np.clip(best + rng.normal(0, 0.02, (500, k)), 0, None)
        near /= near.sum(axis=1, keepdims=True)
        values = surface.mean(x, np.concatenate([others, near]))
        assert values.max() <= HIGH + 1e-12
        assert values.min() >= LOW - 1e-12


@pytest.mark.parametrize("k", [2, 4, 8])
def test_best_action_is_a_non_linear_function_of_the_context(k: int) -> None:
    rng = np.random.default_rng(0)
    xs = rng.dirichlet(np.ones(k), 200)
    best = np.array([Surface(family="bump", dim=k).best_action(x) for x in xs])
    # not the context itself ...
    assert np.mean(np.linalg.norm(best - xs, axis=1)) > 0.05
    # ... and not any affine map of it: least squares leaves a clear residual
    design = np.concatenate([xs, np.ones((len(xs), 1))], axis=1)
    coef, *_ = np.linalg.lstsq(design, best, rcond=None)
    assert np.sqrt(np.mean((design @ coef - best) ** 2)) > 0.01
    np.testing.assert_allclose(best, sharpen(xs))


def test_plug_in_and_uniform_are_suboptimal() -> None:
    surface = Surface(family="bump", dim=4)
    x = np.array([0.5, 0.3, 0.15, 0.05])
    assert float(surface.mean(x, x)) < HIGH - 0.05
    assert float(surface.mean(x, np.full(4, 0.25))) < float(surface.mean(x, x))


@pytest.mark.parametrize("family", FAMILIES)
def test_rewards_are_bounded_and_unbiased(family: str) -> None:
    rng = np.random.default_rng(1)
    surface = Surface(family=family, dim=3, noise=0.1)
    x, a = np.array([0.2, 0.5, 0.3]), np.array([0.3, 0.3, 0.4])
    draws = np.array([surface.reward(x, a, rng) for _ in range(4000)])
    assert draws.min() >= 0.0 and draws.max() <= 1.0
    assert abs(draws - float(surface.mean(x, a))).max() <= 0.1 + 1e-12
    assert draws.mean() == pytest.approx(float(surface.mean(x, a)), abs=0.005)


def test_static_surfaces_ignore_the_context() -> None:
    surface = Surface(family="multimodal", dim=4, contextual=False)
    a = np.array([0.1, 0.2, 0.3, 0.4])
    assert surface.mean(np.full(4, 0.25), a) == surface.mean(np.array([1.0, 0, 0, 0]), a)
    assert surface.name == "multimodal-static-4"


def test_surface_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="family"):
        Surface(family="saddle", dim=3)
    with pytest.raises(ValueError, match="dim"):
        Surface(family="bump", dim=1)
    with pytest.raises(ValueError, match="noise"):
        Surface(family="bump", dim=3, noise=0.5)
    with pytest.raises(ValueError, match="context"):
        Surface(family="bump", dim=3).mean(np.ones(4) / 4, np.ones(3) / 3)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("k", [2, 4, 8])
def test_schedules_give_valid_mixes(name: str, k: int) -> None:
    mixes = make_mixes(name, dim=k, n_slots=500, rng=np.random.default_rng(k))
    assert mixes.shape == (500, k)
    assert np.all(mixes >= 0)
    np.testing.assert_allclose(mixes.sum(axis=1), 1.0)
    again = make_mixes(name, dim=k, n_slots=500, rng=np.random.default_rng(k))
    np.testing.assert_array_equal(mixes, again)


def test_schedules_have_their_shape() -> None:
    rng = np.random.default_rng(0)
    switch = make_mixes("switching", dim=4, n_slots=300, rng=rng, period=100, jitter=1e6)
    # piecewise constant: three segments, almost no movement inside a segment
    jumps = np.linalg.norm(np.diff(switch, axis=0), axis=1)
    assert np.sum(jumps > 0.05) <= 2 and np.all(jumps[:99] < 0.01)
    cycle = make_mixes("periodic", dim=3, n_slots=400, rng=rng, period=200)
    np.testing.assert_allclose(cycle[:200], cycle[200:])
    walk = make_mixes("random-walk", dim=4, n_slots=1000, rng=rng)
    assert np.median(np.linalg.norm(np.diff(walk, axis=0), axis=1)) < 0.1
    iid = make_mixes("stationary", dim=4, n_slots=4000, rng=rng)
    np.testing.assert_allclose(iid.mean(axis=0), 0.25, atol=0.01)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_mixes("bursty", dim=3, n_slots=3, rng=rng)
    with pytest.raises(ValueError, match="amplitude"):
        make_mixes("periodic", dim=3, n_slots=3, rng=rng, amplitude=1.5)


def test_simulate_records_pseudo_regret() -> None:
    surface = Surface(family="bump", dim=3)
    rng = np.random.default_rng(0)
    mixes = make_mixes("stationary", dim=3, n_slots=50, rng=rng)
    policy = make_policy("fixed", space=Simplex(3), context_dim=3, rng=rng)
    trace = simulate(policy, surface, mixes, rng=rng)
    expected = [HIGH - float(surface.mean(x, np.full(3, 1 / 3))) for x in mixes]
    np.testing.assert_allclose(trace.regret, expected)
    np.testing.assert_allclose(trace.cumulative, np.cumsum(expected))
    assert trace.actions.shape == (50, 3) and np.all(trace.select_ms >= 0)


def test_run_policy_uses_common_random_numbers() -> None:
    surface = Surface(family="ridge", dim=3)
    a = run_policy("plug-in", surface, n_slots=30, seed=4)
    b = run_policy("fixed", surface, n_slots=30, seed=4)
    # plug-in plays the context; same seed, same contexts for every policy
    np.testing.assert_allclose(
        a.actions, run_policy("plug-in", surface, n_slots=30, seed=4).actions
    )
    assert not np.allclose(a.regret, b.regret)
    assert np.all(a.rewards >= 0) and np.all(a.rewards <= 1)


def test_loglog_slope() -> None:
    t = np.arange(1, 2001, dtype=float)
    assert loglog_slope(t) == pytest.approx(1.0)
    assert loglog_slope(np.sqrt(t)) == pytest.approx(0.5)
    assert loglog_slope(np.log(t + 1)) < 0.3
    assert loglog_slope(np.zeros(2000)) == 0.0
    with pytest.raises(ValueError, match="start"):
        loglog_slope(t, start=3000)
