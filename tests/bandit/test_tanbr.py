"""Tanbr's own mechanics: where the tree refines, how deep, how big, and late feedback."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from tanbr.bandit import Box, Simplex, Tanbr
from tanbr.bandit.chart import anchor_weights, to_chart
from tanbr.bandit.simulate import simulate
from tanbr.bandit.surfaces import Surface, make_mixes
from tanbr.bandit.tanbr import DEFAULT_SPLIT_VISITS, SEGMENT_SPLIT_VISITS


def trained(surface: Surface, n_slots: int, seed: int = 0, **params: object) -> Tanbr:
    rng = np.random.default_rng(seed)
    policy = Tanbr(space=Simplex(surface.dim), context_dim=surface.dim, rng=rng, **params)  # type: ignore[arg-type]
    mixes = make_mixes("stationary", dim=surface.dim, n_slots=n_slots, rng=rng)
    if not surface.contextual:  # the policy sees the surface's fixed mix
        mixes = np.tile(surface.static_context(), (n_slots, 1))
    simulate(policy, surface, mixes, rng=rng)
    return policy


def test_the_tree_refines_where_the_reward_is_high() -> None:
    """400 slots on a static bump, three seeds pooled: leaves whose centre is near-optimal
    (regret < 0.02) are deeper than poor ones (regret > 0.1) and crowd beyond their share of
    the volume. (One seed alone can settle on a near-optimal coarse cell: seed 0 does.)"""
    surface = Surface(family="bump", dim=3, contextual=False)
    x = surface.static_context()
    good_depths, bad_depths, good_share, good_count, total = [], [], 0.0, 0, 0
    for seed in range(3):
        tree = trained(surface, 400, seed=seed, chart="absolute").tree  # coordinates = actions
        leaves = tree.leaves()
        regret = surface.best_value(x) - surface.mean(x, tree.centers[leaves])
        good, bad = leaves[regret < 0.02], leaves[regret > 0.1]
        good_depths += tree.depths[good].tolist()
        bad_depths += tree.depths[bad].tolist()
        good_share += sum(tree.volume(int(n)) for n in good) / 3
        good_count += len(good)
        total += len(leaves)
    assert np.mean(good_depths) >= np.mean(bad_depths) + 2  # 9.8 against 6.5
    assert good_count / total > 1.5 * good_share


def test_depth_is_bounded_by_log_t_and_leaves_by_the_cap() -> None:
    surface = Surface(family="ridge", dim=3)
    policy = trained(surface, 300, split_visits=1, max_leaves=150)
    n = Simplex(3).intrinsic_dim
    assert policy.tree.depths.max() <= policy.init_depth + math.ceil(n / 2 * math.log2(301))
    assert policy.n_leaves <= 150


@pytest.mark.parametrize("chart", ["relative", "absolute"])
def test_late_feedback_credits_the_node_that_was_played(chart: str) -> None:
    rng = np.random.default_rng(0)
    policy = Tanbr(space=Simplex(3), context_dim=3, rng=rng, init_depth=2, chart=chart)
    x = np.array([0.2, 0.3, 0.5])
    a = policy.select(x)
    point = a if chart == "absolute" else to_chart(anchor_weights(x, policy.floor), a)
    leaf = policy.tree.locate(point)
    assert np.allclose(policy.tree.center(leaf), point)
    policy.tree.split(leaf)  # the cell split before the feedback came back
    policy.visits = np.concatenate([policy.visits, [0, 0]])
    policy.update(x, a, 0.7)
    assert policy.visits[leaf] == 1
    assert policy.visits[list(policy.tree.children(leaf) or ())].sum() == 0


def test_a_leaf_splits_once_its_width_is_below_its_cell_term() -> None:
    rng = np.random.default_rng(1)
    # width rule off (gamma * width never below nu * 0), visit rule after 3 plays
    policy = Tanbr(space=Simplex(3), context_dim=3, rng=rng, init_depth=0, nu=0.0, split_visits=3)
    x = np.full(3, 1 / 3)
    for visit in range(1, 4):
        policy.update(x, np.full(3, 1 / 3), 0.5)
        assert policy.tree.n_leaves == (1 if visit < 3 else 2)
    # width rule on: a huge cell term splits at the first visit
    eager = Tanbr(space=Simplex(3), context_dim=3, rng=rng, init_depth=0, nu=100.0)
    eager.update(x, np.full(3, 1 / 3), 0.5)
    assert eager.tree.n_leaves == 2


def test_it_learns_a_context_dependent_optimum() -> None:
    """The network generalises across contexts: on fresh mixes its greedy choice among the
    leaves beats the plug-in action a = x, which is close to but not the optimum."""
    surface = Surface(family="bump", dim=3)
    policy = trained(surface, 700, seed=2)
    xs = np.random.default_rng(9).dirichlet(np.ones(3), 100)
    candidates = policy.tree.centers[policy.tree.leaves()]
    greedy = [candidates[np.argmax(policy.model.mean(x, candidates))] for x in xs]
    best = surface.optimum(xs)[1]
    regret = np.mean(
        [b - float(surface.mean(x, a)) for x, a, b in zip(xs, greedy, best, strict=True)]
    )
    plug_in = np.mean([b - float(surface.mean(x, x)) for x, b in zip(xs, best, strict=True)])
    assert regret < 0.6 * plug_in


def test_sampled_representatives_and_boxes() -> None:
    rng = np.random.default_rng(3)
    box = Box(low=(0.0, 0.0), high=(2.0, 1.0))
    policy = Tanbr(space=box, context_dim=2, rng=rng, representative="sample")
    for _ in range(60):
        x = rng.dirichlet(np.ones(2))
        a = policy.select(x)
        assert box.contains(a)
        policy.update(x, a, float(np.exp(-np.sum((a - [1.5, 0.5]) ** 2))))
    assert policy.n_leaves > 2**policy.init_depth


def test_forced_exploration_rate_and_draws() -> None:
    """The chance of a uniform leaf is explore / (n sqrt(t + 1)), capped at 1; with it on,
    one context gets many different leaves, with it off always the best-scored one."""
    rng = np.random.default_rng(0)
    policy = Tanbr(space=Simplex(3), context_dim=3, rng=rng, explore=0.2)
    assert policy.explore_probability() == pytest.approx(0.2 / 2)
    for _ in range(99):
        policy.n_updates += 1
    assert policy.explore_probability() == pytest.approx(0.2 / (2 * 10))
    assert Tanbr(space=Simplex(3), context_dim=3, rng=rng, explore=50).explore_probability() == 1
    x = np.array([0.2, 0.3, 0.5])
    always = Tanbr(space=Simplex(3), context_dim=3, rng=rng, explore=50)
    never = Tanbr(space=Simplex(3), context_dim=3, rng=rng, explore=0)
    drawn = {tuple(np.round(always.select(x), 9)) for _ in range(80)}
    greedy = {tuple(np.round(never.select(x), 9)) for _ in range(80)}
    assert len(drawn) >= 12 and len(greedy) == 1  # 16 leaves at the start


@pytest.mark.parametrize(("k", "visits"), [(2, SEGMENT_SPLIT_VISITS), (3, DEFAULT_SPLIT_VISITS)])
def test_a_played_leaf_splits_after_the_visits_of_its_chart(k: int, visits: int) -> None:
    """With no cell term (nu = 0) a leaf splits on visits alone: 16 on a segment, 4 above."""
    rng = np.random.default_rng(0)
    policy = Tanbr(space=Simplex(k), context_dim=k, rng=rng, init_depth=0, nu=0.0, explore=0)
    assert policy.split_visits == visits
    x = np.full(k, 1.0 / k)
    for played in range(1, visits + 1):
        policy.update(x, policy.select(x), 0.5)
        assert policy.n_leaves == (2 if played == visits else 1)
    assert Tanbr(space=Simplex(2), context_dim=2, rng=rng, split_visits=3).split_visits == 3


def test_a_policy_saved_before_forced_exploration_loads_without_it() -> None:
    policy = Tanbr(space=Simplex(3), context_dim=3, rng=np.random.default_rng(0))
    saved = pickle.dumps(policy)  # a restored policy pickles to the same bytes (snapshots)
    assert pickle.dumps(pickle.loads(saved)) == saved
    del policy.__dict__["explore"]  # the attribute a policy pickled by an older version lacks
    loaded = pickle.loads(pickle.dumps(policy))
    assert loaded.explore == 0.0 and loaded.explore_probability() == 0.0
    assert Simplex(3).contains(loaded.select(np.array([0.2, 0.3, 0.5])))


@pytest.mark.parametrize(
    ("param", "value"),
    [("gamma", -1.0), ("nu", float("nan")), ("init_depth", -1), ("init_depth", 12),
     ("split_visits", 0), ("explore", -0.1),
     ("max_leaves", 1), ("representative", "vertex"), ("bonus", "full"), ("lr", 0.0)],
)  # fmt: skip
def test_bad_hyperparameters_are_named(param: str, value: object) -> None:
    with pytest.raises(ValueError, match=param):
        Tanbr(space=Simplex(3), context_dim=3, rng=np.random.default_rng(0), **{param: value})  # type: ignore[arg-type]
