"""The paper's Tanbr point by point: feasible actions, the split rule, per-type UCB vectors,
mix-weighted scoring, and late feedback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tanbr.bandit import Simplex, SparseSimplex, TanbrPaper, make_policy
from tanbr.bandit.simulate import simulate
from tanbr.bandit.surfaces import Surface, make_mixes
from tanbr.bandit.tanbr_paper import sample_in_cells
from tanbr.bandit.type_model import TypeRewardModel


def run(policy: TanbrPaper, surface: Surface, n_slots: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    mixes = make_mixes("stationary", dim=surface.n_types, n_slots=n_slots, rng=rng)
    simulate(policy, surface, mixes, rng=rng)


def test_actions_are_feasible_and_inside_the_played_leaf() -> None:
    """Ten experts, four task types, at most three non-zero coefficients."""
    rng = np.random.default_rng(0)
    surface = Surface(family="bump", dim=10, types=4)
    policy = TanbrPaper(space=Simplex(10), context_dim=4, rng=rng, max_nonzero=3)
    assert policy.feasible == SparseSimplex(10, 3)
    noise = np.random.default_rng(1)
    for x in make_mixes("stationary", dim=4, n_slots=250, rng=noise):
        a = policy.select(x)
        assert policy.feasible.contains(a) and abs(a.sum() - 1.0) < 1e-12
        assert np.count_nonzero(a) <= 3
        leaf = policy.node_of(a)
        assert policy.tree.is_leaf(leaf) and leaf in set(policy.nodes.tolist())
        assert policy.tree.contains(leaf, a)
        r, per_type = surface.feedback(x, a, noise)
        policy.update(x, a, r, type_rewards=per_type)
    assert policy.n_leaves > 8  # the tree grew
    # every candidate is feasible and inside its own cell
    for node, rep in zip(policy.nodes, policy.reps, strict=True):
        assert policy.feasible.contains(rep) and policy.tree.contains(int(node), rep)


def test_a_sparse_space_carries_its_own_cap() -> None:
    rng = np.random.default_rng(0)
    policy = make_policy("tanbr-paper", space=SparseSimplex(6, 2), context_dim=6, rng=rng)
    assert policy.max_nonzero == 2  # type: ignore[attr-defined]
    x = np.full(6, 1 / 6)
    for _ in range(30):
        a = policy.select(x)
        assert np.count_nonzero(a) <= 2
        policy.update(x, a, 0.5)
    with pytest.raises(ValueError, match="max_nonzero"):
        TanbrPaper(space=SparseSimplex(6, 2), context_dim=6, rng=rng, max_nonzero=3)
    # the paper's B = 8 does not bind on eight experts: the plain simplex
    assert TanbrPaper(space=Simplex(8), context_dim=8, rng=rng).feasible == Simplex(8)


def test_cells_without_a_sparse_vertex_hold_no_feasible_point() -> None:
    rng = np.random.default_rng(0)
    dense = np.full((1, 3, 3), 1 / 3) + np.eye(3)[None] * 0.1  # no zero anywhere
    dense /= dense.sum(axis=2, keepdims=True)
    corner = np.eye(3)[None]  # the whole simplex: its vertices are 1-sparse
    points, live = sample_in_cells(np.concatenate([dense, corner]), 1, 5, rng)
    assert live.tolist() == [False, True]
    assert np.all(np.isnan(points[0]))
    assert np.all(np.count_nonzero(points[1], axis=1) == 1)  # B = 1: vertices only


def test_the_split_threshold_grows_with_depth() -> None:
    rng = np.random.default_rng(0)
    policy = TanbrPaper(space=Simplex(3), context_dim=3, rng=rng, rho=0.5, split_scale=3.0)
    taus = [policy.threshold(h) for h in range(6)]
    assert taus == [3, 12, 48, 192, 768, 3072]  # ceil(3 * 0.5^(-2h))
    default = TanbrPaper(space=Simplex(8), context_dim=8, rng=rng)
    assert default.rho == pytest.approx(0.9)  # 2^(-1/7) = 0.906, clipped to the paper's range
    assert all(default.threshold(h + 1) >= default.threshold(h) for h in range(40))
    assert default.threshold(40) > 10 * default.threshold(5)
    # a leaf splits exactly when its count reaches its threshold
    x = np.full(3, 1 / 3)
    a = policy.select(x)
    for _ in range(3):
        assert policy.tree.n_leaves == 1
        policy.update(x, a, 0.5)
    assert policy.tree.n_leaves == 2 and policy.counts[0] == 3
    child = policy.node_of(a)  # the child that holds the played merge
    assert policy.tree.depth(child) == 1 and policy.tree.contains(child, a)
    for _ in range(11):
        policy.update(x, a, 0.5)
    assert policy.tree.is_leaf(child)
    policy.update(x, a, 0.5)  # the 12th selection at depth 1
    assert not policy.tree.is_leaf(child)


def last_layer_gradients(model: TypeRewardModel, actions: np.ndarray) -> np.ndarray:
    """d f_v / d (output layer) for every action and type by torch autograd: (N, V, P)."""
    net = model.net
    params = [torch.tensor(p, requires_grad=True) for p in net.params]
    rows = []
    for z in model.space.encode(actions):
        h = torch.tensor(z[None, :])
        for layer in range(net.depth):
            h = torch.relu(h @ params[2 * layer].T + params[2 * layer + 1])
        out = (h @ params[-2].T + params[-1])[0]  # (V,)
        per_type = []
        for v in range(net.outputs):
            gw, gb = torch.autograd.grad(out[v], params[-2:], retain_graph=True)
            per_type.append(torch.cat([gw.reshape(-1), gb]).numpy())
        rows.append(np.stack(per_type))
    return np.stack(rows)


def test_the_per_type_ucb_vector_is_neural_ucb_on_the_output_layer() -> None:
    """U_v = f_v + gamma sqrt(G_v^T Z^-1 G_v / m) with Z = lam I + sum_s sum_v w_sv G G^T / m
    over the whole output layer (no block structure assumed), on a tiny case."""
    rng = np.random.default_rng(4)
    space = Simplex(3)
    model = TypeRewardModel(space=space, types=2, rng=rng, hidden=5, gamma=0.7, lam=1.5,
                            train_steps=2)  # fmt: skip
    played = rng.dirichlet(np.ones(3), 6)
    per_type = rng.uniform(0.2, 0.8, (6, 2))
    per_type[3, 1] = np.nan  # type 1 had no scored request in slot 3
    for i, (a, r) in enumerate(zip(played, per_type, strict=True)):
        model.learn(np.array([0.5, 0.5]), a, 0.5, None if i == 5 else r)
    model.net.refresh(model.history.inputs, model.history.weights)  # features of the final weights
    # slot 5 had no per-type feedback: the slot reward counts for each type by its share
    np.testing.assert_allclose(model.history.weights[5], [0.5, 0.5])
    assert model.history.weights[3].tolist() == [1.0, 0.0]
    m = 5
    g_played = last_layer_gradients(model, played)  # (6, 2, P)
    w = model.history.weights  # (6, 2)
    z = 1.5 * np.eye(g_played.shape[2]) + np.einsum("sv,svp,svq->pq", w, g_played, g_played) / m
    cand = rng.dirichlet(np.ones(3), 5)
    g = last_layer_gradients(model, cand)  # (5, 2, P)
    width = np.sqrt(np.einsum("nvp,pq,nvq->nv", g, np.linalg.inv(z), g) / m)
    expected = model.mean(cand) + 0.7 * width
    np.testing.assert_allclose(model.ucb(cand), expected, rtol=1e-4, atol=1e-6)


def test_scoring_is_the_mix_weighted_ucb() -> None:
    """Given the candidates' UCB vectors, the played merge maximises psi . U."""
    rng = np.random.default_rng(5)
    policy = TanbrPaper(space=Simplex(3), context_dim=3, rng=rng)
    policy.reps = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    policy.ucb = np.array([[0.9, 0.1, 0.2], [0.2, 0.8, 0.1], [0.5, 0.5, 0.5]])
    assert policy.select(np.array([1.0, 0, 0])).tolist() == [1.0, 0, 0]
    assert policy.select(np.array([0, 1.0, 0])).tolist() == [0, 1.0, 0]
    assert policy.select(np.array([0, 0, 1.0])).tolist() == [0, 0, 1.0]
    assert policy.select(np.array([0.6, 0.4, 0])).tolist() == [1.0, 0, 0]  # 0.58, 0.44, 0.5
    assert policy.select(np.array([0.4, 0.3, 0.3])).tolist() == [0, 0, 1.0]  # 0.45, 0.35, 0.5


def test_it_learns_which_merge_serves_which_mix() -> None:
    """On a per-type surface where each type wants its own experts, the greedy choice
    follows the dominant type of the mix."""
    surface = Surface(family="bump", dim=3)
    policy = TanbrPaper(space=Simplex(3), context_dim=3, rng=np.random.default_rng(6))
    run(policy, surface, 600)
    for v in range(3):
        psi = np.full(3, 0.1)
        psi[v] = 0.8
        mean = policy.model.mean(policy.reps) @ psi
        best = policy.reps[int(np.argmax(mean))]
        assert int(np.argmax(best)) == v
        assert surface.best_value(psi) - float(surface.mean(psi, best)) < 0.03


def test_late_feedback_credits_the_leaf_that_holds_the_action() -> None:
    rng = np.random.default_rng(7)
    policy = TanbrPaper(space=Simplex(3), context_dim=3, rng=rng, split_scale=2.0, refine=0)
    x = np.array([0.2, 0.3, 0.5])
    a = policy.select(x)
    policy.reps = policy.reps + 0.0  # representatives may move before the feedback comes
    policy.reps[0] = np.array([1.0, 0.0, 0.0]) if a[0] < 0.9 else np.array([0.0, 1.0, 0.0])
    policy.update(x, a, 0.6)
    assert policy.counts[policy.tree.locate(a)] == 1


@pytest.mark.parametrize(
    ("param", "value"),
    [("rho", 1.0), ("rho", 0.0), ("split_scale", 0.0), ("samples", 0), ("max_nonzero", 0),
     ("ema", 1.5), ("gamma", -1.0), ("lam", 0.0), ("train_steps", -1), ("max_leaves", 0)],
)  # fmt: skip
def test_bad_hyperparameters_are_named(param: str, value: object) -> None:
    with pytest.raises(ValueError, match=param):
        TanbrPaper(space=Simplex(3), context_dim=3, rng=np.random.default_rng(0), **{param: value})  # type: ignore[arg-type]


def test_it_needs_merge_coefficients() -> None:
    from tanbr.bandit import Box

    with pytest.raises(ValueError, match="merge coefficients"):
        TanbrPaper(space=Box(low=(0.0,), high=(1.0,)), context_dim=1, rng=np.random.default_rng(0))
