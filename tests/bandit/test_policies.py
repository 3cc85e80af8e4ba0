"""The contract every registered policy keeps (parametrised over the registry)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from tanbr.bandit import POLICIES, Box, Policy, Simplex, make_policy
from tanbr.bandit.spaces import Space

NAMES = sorted(POLICIES)
SPACES: list[Space] = [Simplex(4), Box(low=(0.0, -1.0, 0.5), high=(1.0, 1.0, 2.0))]


def build(name: str, space: Space, seed: int = 0) -> Policy:
    return make_policy(name, space=space, context_dim=space.dim, rng=np.random.default_rng(seed))


def contexts(space: Space, n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.ones(space.dim), n)


def reward_of(action: np.ndarray) -> float:
    """A deterministic reward in [0, 1] so that runs are comparable."""
    return float(np.clip(0.5 + 0.4 * np.sin(3.0 * action.sum() + action[0]), 0.0, 1.0))


def run(policy: Policy, xs: np.ndarray) -> list[np.ndarray]:
    out = []
    for x in xs:
        a = policy.select(x)
        policy.update(x, a, reward_of(a))
        out.append(a)
    return out


def cases() -> list[tuple[str, Space]]:
    return [
        (name, space)
        for name in NAMES
        for space in SPACES
        if not (name == "plug-in" and isinstance(space, Box))
    ]


def test_registry_names() -> None:
    assert set(POLICIES) == {
        "tanbr",
        "neural-grid",
        "hoo",
        "linucb-grid",
        "egreedy-grid",
        "random",
        "fixed",
        "plug-in",
    }


@pytest.mark.parametrize(("name", "space"), cases())
def test_actions_are_inside_the_space_and_updates_accept_them(name: str, space: Space) -> None:
    policy = build(name, space)
    assert policy.name == name
    for a in run(policy, contexts(space, 25)):
        assert a.shape == (space.dim,)
        assert space.contains(a)


@pytest.mark.parametrize(("name", "space"), cases())
def test_same_seed_same_actions(name: str, space: Space) -> None:
    xs = contexts(space, 20)
    first = run(build(name, space, seed=7), xs)
    second = run(build(name, space, seed=7), xs)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("name", "space"), cases())
def test_late_and_out_of_order_feedback(name: str, space: Space) -> None:
    """No hidden "last action": several selects, then updates in reverse order."""
    policy = build(name, space)
    run(policy, contexts(space, 5, seed=3))
    xs = contexts(space, 6, seed=4)
    actions = [policy.select(x) for x in xs]
    for x, a in reversed(list(zip(xs, actions, strict=True))):
        policy.update(x, a, reward_of(a))
    for a in run(policy, contexts(space, 5, seed=5)):
        assert space.contains(a)


@pytest.mark.parametrize(("name", "space"), cases())
def test_pickle_round_trip_continues_identically(name: str, space: Space) -> None:
    policy = build(name, space)
    run(policy, contexts(space, 15, seed=2))
    clone = pickle.loads(pickle.dumps(policy))
    xs = contexts(space, 10, seed=6)
    for a, b in zip(run(policy, xs), run(clone, xs), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("name", "space"), cases())
@pytest.mark.parametrize("reward", [float("nan"), float("inf"), -0.01, 1.01, "high", None, True])
def test_bad_rewards_are_rejected(name: str, space: Space, reward: object) -> None:
    policy = build(name, space)
    x = contexts(space, 1)[0]
    a = policy.select(x)
    with pytest.raises(ValueError, match="reward"):
        policy.update(x, a, reward)  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "space"), cases())
def test_bad_contexts_and_actions_are_rejected(name: str, space: Space) -> None:
    policy = build(name, space)
    x = contexts(space, 1)[0]
    a = policy.select(x)
    for bad in (np.append(x, 0.0), x[:-1], np.full(space.dim, np.nan), "mix"):
        with pytest.raises(ValueError, match="context"):
            policy.select(bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="context"):
            policy.update(bad, a, 0.5)  # type: ignore[arg-type]
    outside = np.full(space.dim, 5.0)
    for bad_action in (outside, a[:-1], np.full(space.dim, np.nan)):
        with pytest.raises(ValueError, match="action"):
            policy.update(x, bad_action, 0.5)


def test_plug_in_needs_the_task_simplex() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="plug-in"):
        make_policy("plug-in", space=Box(low=(0.0,), high=(1.0,)), context_dim=1, rng=rng)
    with pytest.raises(ValueError, match="plug-in"):
        make_policy("plug-in", space=Simplex(4), context_dim=3, rng=rng)
    policy = make_policy("plug-in", space=Simplex(3), context_dim=3, rng=rng)
    np.testing.assert_allclose(policy.select(np.array([0.2, 0.3, 0.5])), [0.2, 0.3, 0.5])


def test_fixed_defaults_to_the_uniform_merge() -> None:
    rng = np.random.default_rng(0)
    policy = make_policy("fixed", space=Simplex(5), context_dim=5, rng=rng)
    np.testing.assert_allclose(policy.select(np.full(5, 0.2)), np.full(5, 0.2))
    chosen = make_policy(
        "fixed", space=Simplex(2), context_dim=2, rng=rng, action=np.array([0.3, 0.7])
    )
    np.testing.assert_allclose(chosen.select(np.array([0.5, 0.5])), [0.3, 0.7])


def test_make_policy_names_bad_requests() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("router", space=Simplex(3), context_dim=3, rng=rng)
    with pytest.raises(ValueError, match="bad parameters"):
        make_policy("tanbr", space=Simplex(3), context_dim=3, rng=rng, temperature=1.0)
    with pytest.raises(ValueError, match="gamma"):
        make_policy("tanbr", space=Simplex(3), context_dim=3, rng=rng, gamma=-1.0)
    with pytest.raises(ValueError, match="context_dim"):
        make_policy("random", space=Simplex(3), context_dim=0, rng=rng)
    with pytest.raises(ValueError, match="rng"):
        make_policy("random", space=Simplex(3), context_dim=3, rng=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Simplex or a Box"):
        make_policy("hoo", space=[0, 1], context_dim=3, rng=rng)  # type: ignore[arg-type]


def test_plug_in_rejects_a_context_that_is_not_a_mix() -> None:
    policy = make_policy("plug-in", space=Simplex(3), context_dim=3, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="mix"):
        policy.select(np.array([0.5, -0.2, 0.7]))
    np.testing.assert_allclose(policy.select(np.array([2.0, 1.0, 1.0])), [0.5, 0.25, 0.25])
