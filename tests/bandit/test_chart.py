"""The context-anchored chart, and Tanbr and its reward model on it."""

from __future__ import annotations

import numpy as np
import pytest

from tanbr.bandit import Box, Simplex, Tanbr
from tanbr.bandit.chart import anchor_weights, to_action, to_chart
from tanbr.bandit.neural import RewardModel
from tanbr.bandit.simulate import run_policy
from tanbr.bandit.surfaces import Surface

X = np.array([0.6, 0.3, 0.1, 0.0])


def test_the_chart_is_a_bijection_of_the_simplex_anchored_at_the_mix() -> None:
    w = anchor_weights(X, 0.02)
    assert np.allclose(w, X + 0.02)
    r = np.random.default_rng(0).dirichlet(np.ones(4), 50)  # (50, 4)
    b = to_action(w, r)
    assert np.allclose(b.sum(axis=1), 1.0) and np.all(b >= 0)
    assert np.allclose(to_chart(w, b), r)
    # the centre is the plug-in merge (up to the floor), the vertices stay the vertices
    assert np.allclose(to_action(w, np.full((1, 4), 0.25))[0], (X + 0.02) / 1.08)
    assert np.allclose(to_action(w, np.eye(4)), np.eye(4))
    # projective: the image of a segment is the segment between the images
    mid = to_action(w, (r[:1] + r[1:2]) / 2)[0]
    ends = b[:2]
    t = np.linalg.lstsq((ends[1] - ends[0])[:, None], mid - ends[0], rcond=None)[0]
    assert 0.0 < t[0] < 1.0 and np.allclose(ends[0] + t[0] * (ends[1] - ends[0]), mid)


@pytest.mark.parametrize("context", [[0.5, 0.7, -0.2, 0.0], [0.0, 0.0, 0.0, 0.0]])
def test_the_chart_needs_a_mix(context: list[float]) -> None:
    with pytest.raises(ValueError, match="mix"):
        anchor_weights(np.array(context), 0.02)
    policy = Tanbr(space=Simplex(4), context_dim=4, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="mix"):
        policy.select(np.array(context))


def test_the_default_chart_follows_the_space() -> None:
    rng = np.random.default_rng(0)
    assert Tanbr(space=Simplex(4), context_dim=4, rng=rng).chart == "relative"
    assert Tanbr(space=Simplex(5), context_dim=4, rng=rng).chart == "absolute"
    assert Tanbr(space=Box(low=(0.0,) * 4, high=(1.0,) * 4), context_dim=4, rng=rng).chart == (
        "absolute"
    )
    with pytest.raises(ValueError, match="chart"):
        Tanbr(space=Simplex(5), context_dim=4, rng=rng, chart="relative")
    with pytest.raises(ValueError, match="chart"):
        Tanbr(space=Simplex(4), context_dim=4, rng=rng, chart="polar")
    with pytest.raises(ValueError, match="floor"):
        Tanbr(space=Simplex(4), context_dim=4, rng=rng, floor=0.0)


def test_relative_tanbr_plays_mapped_leaf_centres_and_credits_them_back() -> None:
    rng = np.random.default_rng(1)
    policy = Tanbr(space=Simplex(4), context_dim=4, rng=rng)
    for _ in range(40):
        x = rng.dirichlet(np.ones(4))
        a = policy.select(x)
        w = anchor_weights(x, policy.floor)
        candidates = to_action(w, policy.tree.centers[policy.tree.leaves()])
        assert np.min(np.abs(candidates - a).max(axis=1)) <= 1e-12
        node = policy.tree.locate(to_chart(w, a))
        before = policy.visits[node]
        policy.update(x, a, 0.5)
        assert policy.visits[node] == before + 1


def test_the_prior_mean_and_the_offset_encoding() -> None:
    rng = np.random.default_rng(2)
    model = RewardModel(space=Simplex(4), context_dim=4, rng=rng, encoding="offset", prior=3.0)
    actions = rng.dirichlet(np.ones(4), 7)  # (7, 4)
    z = model.inputs(X, actions)
    assert z.shape == (7, 12)
    assert np.allclose(z[:, 8:], (actions - X) * 4)
    prior = -3.0 * np.sum((actions - X) ** 2, axis=1)
    assert np.allclose(model.prior_mean(X, actions), prior)
    assert np.allclose(model.mean(X, actions), model.net.mean(z) + prior)
    # the network learns the residual of the prior
    model.learn(X, actions[0], 0.5)
    assert model.history.rewards[0] == pytest.approx(0.5 - prior[0])
    with pytest.raises(ValueError, match="prior"):
        RewardModel(space=Simplex(5), context_dim=4, rng=rng, prior=1.0)
    with pytest.raises(ValueError, match="encoding"):
        RewardModel(space=Simplex(4), context_dim=4, rng=rng, encoding="polar")


def test_the_relative_chart_starts_near_the_plug_in_merge() -> None:
    """The first 150 slots at K=6: the absolute chart explores far from every good merge,
    the relative chart stays near the plug-in merge and costs less (2.6 against 4.5)."""
    surface = Surface(family="bump", dim=6)
    rel = run_policy("tanbr", surface, n_slots=150, seed=0).cumulative[-1]
    absolute = run_policy(
        "tanbr", surface, n_slots=150, seed=0, policy_params={"chart": "absolute"}
    ).cumulative[-1]
    assert rel < 0.7 * absolute, (rel, absolute)
