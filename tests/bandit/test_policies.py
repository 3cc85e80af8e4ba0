"""The contract every registered policy keeps (parametrised over the registry)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from tanbr.bandit import POLICIES, Box, Policy, Simplex, SparseSimplex, make_policy
from tanbr.bandit.spaces import Space

NAMES = sorted(POLICIES)
SPACES: list[Space] = [
    Simplex(4),
    Box(low=(0.0, -1.0, 0.5), high=(1.0, 1.0, 2.0)),
    SparseSimplex(5, 2),
]
#: Policies that keep their actions B-sparse; the others refuse a binding SparseSimplex.
SPARSE = {"tanbr-paper", "nucb", "nucb-anchored", "random", "fixed"}
#: Policies of merge coefficients, or anchored at the mix: no Box.
NO_BOX = {"plug-in", "tanbr-paper", "nucb", "nucb-anchored", "neural-grid-anchored"}


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


def supports(name: str, space: Space) -> bool:
    if isinstance(space, Box):
        return name not in NO_BOX
    if isinstance(space, SparseSimplex):
        return name in SPARSE
    return True


def cases() -> list[tuple[str, Space]]:
    return [(name, space) for name in NAMES for space in SPACES if supports(name, space)]


def test_registry_names() -> None:
    assert set(POLICIES) == {
        "tanbr",
        "tanbr-paper",
        "nucb",
        "nucb-anchored",
        "neural-grid",
        "neural-grid-anchored",
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
def test_per_type_feedback_is_accepted_and_checked(name: str, space: Space) -> None:
    """Every policy takes ``type_rewards`` (V = context_dim rewards, NaN where a type had no
    scored request), and rejects a malformed one with an error that names it."""
    policy = build(name, space)
    xs = contexts(space, 6, seed=8)
    for i, x in enumerate(xs):
        a = policy.select(x)
        per_type = np.full(space.dim, reward_of(a))
        per_type[i % space.dim] = np.nan
        policy.update(x, a, reward_of(a), type_rewards=per_type)
    x = xs[0]
    a = policy.select(x)
    good = np.full(space.dim, 0.5)
    for bad in (
        good[:-1],  # wrong shape
        np.append(good, 0.5),
        np.full(space.dim, np.nan),  # no finite entry
        np.where(np.arange(space.dim) == 0, np.inf, 0.5),
        np.where(np.arange(space.dim) == 0, -0.1, 0.5),  # outside [0, 1]
        np.where(np.arange(space.dim) == 0, 1.2, 0.5),
        "high",
    ):
        with pytest.raises(ValueError, match="type_rewards"):
            policy.update(x, a, 0.5, type_rewards=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", sorted(set(NAMES) - SPARSE))
def test_policies_that_cannot_stay_sparse_refuse_a_sparse_space(name: str) -> None:
    with pytest.raises(ValueError, match=r"SparseSimplex|cannot keep"):
        build(name, SparseSimplex(5, 2))
    # a cap that does not bind is the plain simplex
    build(name, SparseSimplex(4, 4))


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
    with pytest.raises(ValueError, match="Simplex, SparseSimplex or Box"):
        make_policy("hoo", space=[0, 1], context_dim=3, rng=rng)  # type: ignore[arg-type]


def test_plug_in_rejects_a_context_that_is_not_a_mix() -> None:
    policy = make_policy("plug-in", space=Simplex(3), context_dim=3, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="mix"):
        policy.select(np.array([0.5, -0.2, 0.7]))
    np.testing.assert_allclose(policy.select(np.array([2.0, 1.0, 1.0])), [0.5, 0.25, 0.25])
