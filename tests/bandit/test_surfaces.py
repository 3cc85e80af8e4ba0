"""Synthetic surfaces know their optimum; schedules produce valid mixes; the loop records regret."""

from __future__ import annotations

import numpy as np
import pytest

from tanbr.bandit import Simplex, make_policy
from tanbr.bandit.simulate import loglog_slope, run_policy, simulate
from tanbr.bandit.surfaces import (
    FAMILIES,
    HELD_OUT_FAMILIES,
    HIGH,
    LOW,
    REPORT_FAMILIES,
    REPORT_SEEDS,
    SCHEDULES,
    TUNING_FAMILIES,
    TUNING_SEEDS,
    Surface,
    make_mixes,
)


def entropy(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-12, 1.0)
    return np.asarray(-(p * np.log(p)).sum(axis=-1))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [2, 3, 5, 8])
def test_known_optimum_beats_every_other_action(family: str, k: int) -> None:
    rng = np.random.default_rng(k)
    surface = Surface(family=family, dim=k)
    xs = rng.dirichlet(np.ones(k), 12)
    best, values = surface.optimum(xs)
    for x, a, v in zip(xs, best, values, strict=True):
        assert Simplex(k).contains(a)
        assert float(surface.mean(x, a)) == pytest.approx(v)
        others = Simplex(k).sample(rng, 2000)
        # local perturbations too: the optimum is a true maximum, not just a good point
        near = np.clip(a + rng.normal(0, 0.02, (500, k)), 0, None)
        near /= near.sum(axis=1, keepdims=True)
        found = surface.mean(x, np.concatenate([others, near]))
        assert found.max() <= v + 1e-6
        assert found.min() >= LOW - 1e-12 and v <= HIGH + 1e-12


@pytest.mark.parametrize("family", FAMILIES)
def test_the_slot_reward_is_the_mix_weighted_sum_of_per_type_rewards(family: str) -> None:
    rng = np.random.default_rng(1)
    surface = Surface(family=family, dim=3, noise=0.1)
    x, a = np.array([0.2, 0.5, 0.3]), np.array([0.3, 0.3, 0.4])
    g = surface.type_means(a)
    assert g.shape == (3,) and float(surface.mean(x, a)) == pytest.approx(float(g @ x))
    draws = [surface.feedback(x, a, rng) for _ in range(4000)]
    slot = np.array([r for r, _ in draws])
    per_type = np.array([t for _, t in draws])  # (4000, 3)
    np.testing.assert_allclose(slot, per_type @ x)
    assert per_type.min() >= 0.0 and per_type.max() <= 1.0
    assert np.abs(per_type - g).max() <= 0.1 + 1e-12  # per-type noise, bounded
    np.testing.assert_allclose(per_type.mean(axis=0), g, atol=0.005)  # and unbiased
    assert np.std(per_type[:, 0] - per_type[:, 1]) > 0.05  # independent across types


@pytest.mark.parametrize("k", [2, 4, 8])
def test_best_action_is_a_non_linear_function_of_the_context(k: int) -> None:
    rng = np.random.default_rng(0)
    xs = rng.dirichlet(np.ones(k), 200)
    best, _ = Surface(family="bump", dim=k).optimum(xs)
    # not the context itself ...
    assert np.mean(np.linalg.norm(best - xs, axis=1)) > 0.05
    # ... and not any affine map of it: least squares leaves a clear residual
    design = np.concatenate([xs, np.ones((len(xs), 1))], axis=1)
    coef, *_ = np.linalg.lstsq(design, best, rcond=None)
    assert np.sqrt(np.mean((design @ coef - best) ** 2)) > 0.01


def test_the_families_optima_are_what_their_names_say() -> None:
    """bump sharpens the mix, flat flattens it, shifted moves it towards the last expert."""
    k = 6
    xs = np.random.default_rng(3).dirichlet(np.ones(k), 100)
    sharp, _ = Surface(family="bump", dim=k).optimum(xs)
    flat, _ = Surface(family="flat", dim=k).optimum(xs)
    shifted, _ = Surface(family="shifted", dim=k).optimum(xs)
    assert np.mean(entropy(sharp) - entropy(xs)) < -0.2
    assert np.mean(entropy(flat) - entropy(xs)) > 0.1
    assert np.mean(shifted[:, -1] - xs[:, -1]) > 0.2


def test_tuning_and_reporting_are_kept_apart() -> None:
    assert set(TUNING_FAMILIES) | set(REPORT_FAMILIES) == set(FAMILIES)
    assert set(TUNING_FAMILIES) - set(REPORT_FAMILIES)  # a family used only for tuning
    assert not set(HELD_OUT_FAMILIES) & set(TUNING_FAMILIES)
    assert set(HELD_OUT_FAMILIES) <= set(REPORT_FAMILIES)
    assert not set(TUNING_SEEDS) & set(REPORT_SEEDS) and min(TUNING_SEEDS) >= 100


def test_plug_in_and_uniform_are_suboptimal() -> None:
    surface = Surface(family="bump", dim=4)
    x = np.array([0.5, 0.3, 0.15, 0.05])
    best = surface.best_value(x)
    assert float(surface.mean(x, x)) < best - 0.02
    assert float(surface.mean(x, np.full(4, 0.25))) < float(surface.mean(x, x))


def test_static_surfaces_ignore_the_context() -> None:
    surface = Surface(family="multimodal", dim=4, contextual=False)
    a = np.array([0.1, 0.2, 0.3, 0.4])
    assert surface.mean(np.full(4, 0.25), a) == surface.mean(np.array([1.0, 0, 0, 0]), a)
    assert surface.name == "multimodal-static-4"


def test_more_experts_than_types() -> None:
    surface = Surface(family="bump", dim=12, types=4)
    a = Simplex(12).sample(np.random.default_rng(0), 5)
    assert surface.type_means(a).shape == (5, 4)
    own = surface.own_experts()
    np.testing.assert_allclose(own.sum(axis=1), 1.0)
    assert np.all((own > 0).sum(axis=1) == 3)


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
    expected = [surface.best_value(x) - float(surface.mean(x, np.full(3, 1 / 3))) for x in mixes]
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


def test_scalar_and_per_type_feedback_share_the_noise() -> None:
    """A policy that has no use for per-type rewards runs identically under both kinds of
    feedback; a per-type learner does not."""
    surface = Surface(family="bump", dim=3)
    scalar = run_policy("neural-grid", surface, n_slots=40, seed=2, feedback="scalar")
    typed = run_policy("neural-grid", surface, n_slots=40, seed=2, feedback="per-type")
    np.testing.assert_array_equal(scalar.actions, typed.actions)
    np.testing.assert_array_equal(scalar.rewards, typed.rewards)
    paper_s = run_policy("tanbr-paper", surface, n_slots=40, seed=2, feedback="scalar")
    paper_t = run_policy("tanbr-paper", surface, n_slots=40, seed=2, feedback="per-type")
    assert not np.array_equal(paper_s.actions, paper_t.actions)
    with pytest.raises(ValueError, match="feedback"):
        run_policy("random", surface, n_slots=3, seed=0, feedback="labels")


def test_loglog_slope() -> None:
    t = np.arange(1, 2001, dtype=float)
    assert loglog_slope(t) == pytest.approx(1.0)
    assert loglog_slope(np.sqrt(t)) == pytest.approx(0.5)
    assert loglog_slope(np.log(t + 1)) < 0.3
    assert loglog_slope(np.zeros(2000)) == 0.0
    with pytest.raises(ValueError, match="start"):
        loglog_slope(t, start=3000)
