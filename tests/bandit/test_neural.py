"""The reward network: hand-written gradients and NeuralUCB widths against reference math."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tanbr.bandit.neural import History, RewardModel, RewardNet, sqrt_features
from tanbr.bandit.spaces import Box, Simplex


def torch_loss(
    net: RewardNet, z: np.ndarray, r: np.ndarray, w: np.ndarray | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The same regularised loss written with torch autograd: the reference."""
    params = [torch.tensor(p, requires_grad=True) for p in net.params]
    init = [torch.tensor(p) for p in net._init]
    h = torch.tensor(z)
    act = torch.relu if net.activation == "relu" else torch.tanh
    for layer in range(net.depth):
        h = act(h @ params[2 * layer].T + params[2 * layer + 1])
    out = h @ params[-2].T + params[-1]  # (B, V)
    target = torch.tensor(np.nan_to_num(r.reshape(len(z), -1)))
    weight = torch.ones_like(out) if w is None else torch.tensor(w)
    loss = torch.sum(weight * (out - target) ** 2) / len(z)
    loss = loss + net.weight_decay * sum(
        torch.sum((p - q) ** 2) for p, q in zip(params, init, strict=True)
    )
    loss.backward()  # type: ignore[no-untyped-call]
    return loss, [p.grad for p in params]  # type: ignore[misc]


def per_sample_gradients(net: RewardNet, z: np.ndarray) -> np.ndarray:
    """d f(z_n) / d theta for every row, flattened, shape (N, P), by torch autograd."""
    rows = []
    act = torch.relu if net.activation == "relu" else torch.tanh
    for zn in z:
        params = [torch.tensor(p, requires_grad=True) for p in net.params]
        h = torch.tensor(zn[None, :])
        for layer in range(net.depth):
            h = act(h @ params[2 * layer].T + params[2 * layer + 1])
        out = (h @ params[-2].T + params[-1]).sum()
        grads = torch.autograd.grad(out, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).numpy())
    return np.stack(rows)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_hand_gradients_match_autograd(activation: str, depth: int) -> None:
    rng = np.random.default_rng(depth)
    net = RewardNet(
        input_dim=5, rng=rng, hidden=7, depth=depth, activation=activation, weight_decay=0.01
    )
    for p in net.params:  # move away from the initial weights so the L2 term is non-zero
        p += rng.normal(0, 0.1, p.shape)
    z, r = rng.normal(size=(11, 5)), rng.uniform(size=11)
    loss, grads = net.loss_and_grads(z, r)
    ref_loss, ref_grads = torch_loss(net, z, r)
    assert loss == pytest.approx(float(ref_loss.detach()), rel=1e-10)
    for g, ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, ref.numpy(), rtol=1e-9, atol=1e-12)


def test_per_type_loss_and_gradients_match_autograd() -> None:
    """V outputs, per-(sample, type) weights, and NaN targets where the weight is 0."""
    rng = np.random.default_rng(7)
    net = RewardNet(input_dim=4, rng=rng, hidden=6, depth=2, outputs=3, weight_decay=0.01)
    for p in net.params:
        p += rng.normal(0, 0.1, p.shape)
    z, r = rng.normal(size=(9, 4)), rng.uniform(size=(9, 3))
    w = rng.uniform(size=(9, 3))
    w[2, 1] = w[5, 0] = 0.0
    r[2, 1] = r[5, 0] = np.nan
    loss, grads = net.loss_and_grads(z, r, w)
    ref_loss, ref_grads = torch_loss(net, z, r, w)
    assert loss == pytest.approx(float(ref_loss.detach()), rel=1e-10)
    for g, ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, ref.numpy(), rtol=1e-9, atol=1e-12)


def test_per_type_widths_use_one_weighted_inverse_per_type() -> None:
    """Z_v = lam I + sum_s w_sv g_s g_s^T with g = (h, 1), one inverse per type, kept by
    weighted Sherman-Morrison steps and rebuilt identically by refresh()."""
    rng = np.random.default_rng(8)
    net = RewardNet(input_dim=3, rng=rng, hidden=5, depth=2, outputs=3, lam=2.0)
    played = rng.normal(size=(10, 3))
    weights = np.ones((10, 3))
    weights[4:] = rng.uniform(size=(6, 3))  # equal weights first (one shared inverse), then not
    for z, w in zip(played, weights, strict=True):
        net.observe(z, w)
    _, acts, _ = net._forward(played)
    g = np.concatenate([acts[-1], np.ones((10, 1))], axis=1)
    cand = rng.normal(size=(4, 3))
    _, acts_c, _ = net._forward(cand)
    gc = np.concatenate([acts_c[-1], np.ones((4, 1))], axis=1)
    inverses = [np.linalg.inv(2.0 * np.eye(6) + (g * w[:, None]).T @ g) for w in weights.T]
    expected = np.stack(
        [np.sqrt(np.einsum("ni,ij,nj->n", gc, inv, gc)) for inv in inverses],
        axis=1,
    )  # fmt: skip
    np.testing.assert_allclose(net.predict_types(cand)[1], expected, rtol=1e-4)
    net.refresh(played, weights)
    np.testing.assert_allclose(net.predict_types(cand)[1], expected, rtol=1e-4)
    with pytest.raises(ValueError, match="outputs"):
        net.predict(cand)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_diagonal_width_is_the_quadratic_form_of_per_sample_gradients(activation: str) -> None:
    rng = np.random.default_rng(3)
    net = RewardNet(input_dim=4, rng=rng, hidden=6, depth=2, bonus="diagonal", lam=0.5,
                    activation=activation)  # fmt: skip
    played = rng.normal(size=(9, 4))
    for z in played[:5]:
        net.observe(z)
    candidates = rng.normal(size=(7, 4))
    g_played = per_sample_gradients(net, played[:5])
    diag = 0.5 + (g_played**2).sum(axis=0)  # Z = lam I + sum g g^T, kept diagonal
    g = per_sample_gradients(net, candidates)
    expected = np.sqrt((g**2 / diag).sum(axis=1))
    _, width = net.predict(candidates)  # scored in float32
    np.testing.assert_allclose(width, expected, rtol=1e-4)
    # refresh() recomputes the same statistics from the history in one pass
    net.refresh(played[:5])
    np.testing.assert_allclose(net.predict(candidates)[1], expected, rtol=1e-4)


def test_last_layer_width_uses_the_exact_inverse() -> None:
    rng = np.random.default_rng(4)
    net = RewardNet(input_dim=3, rng=rng, hidden=5, depth=2, bonus="last-layer", lam=2.0)
    played = rng.normal(size=(12, 3))
    for z in played:
        net.observe(z)
    _, acts, _ = net._forward(played)
    g = np.concatenate([acts[-1], np.ones((12, 1))], axis=1)
    precision = 2.0 * np.eye(6) + g.T @ g
    cand = rng.normal(size=(4, 3))
    _, acts_c, _ = net._forward(cand)
    gc = np.concatenate([acts_c[-1], np.ones((4, 1))], axis=1)
    expected = np.sqrt(np.einsum("ni,ij,nj->n", gc, np.linalg.inv(precision), gc))
    np.testing.assert_allclose(net.predict(cand)[1], expected, rtol=1e-4)
    net.refresh(played)
    np.testing.assert_allclose(net.predict(cand)[1], expected, rtol=1e-4)


def test_joint_rows_fit_the_weighted_sum_and_match_autograd() -> None:
    """A batch mixing per-type rows and slot-reward rows: a joint row's loss is
    (sum_v w_v f_v - r)^2, the others' sum_v w_v (f_v - r_v)^2."""
    rng = np.random.default_rng(11)
    net = RewardNet(input_dim=4, rng=rng, hidden=6, depth=2, outputs=3, weight_decay=0.01)
    for p in net.params:
        p += rng.normal(0, 0.1, p.shape)
    z, r = rng.normal(size=(8, 4)), rng.uniform(size=(8, 3))
    w = rng.dirichlet(np.ones(3), 8)
    joint = np.array([True, False, True, True, False, False, True, False])
    r[joint] = r[joint, :1]  # a slot reward stands in every column of its row
    loss, grads = net.loss_and_grads(z, r, w, joint)

    params = [torch.tensor(p, requires_grad=True) for p in net.params]
    h = torch.tensor(z)
    for layer in range(net.depth):
        h = torch.relu(h @ params[2 * layer].T + params[2 * layer + 1])
    out = h @ params[-2].T + params[-1]  # (B, V)
    wt, tt, jt = torch.tensor(w), torch.tensor(r), torch.tensor(joint)
    per_type = torch.sum(wt[~jt] * (out[~jt] - tt[~jt]) ** 2)
    summed = torch.sum(((wt[jt] * out[jt]).sum(1) - tt[jt, 0]) ** 2)
    ref = (per_type + summed) / len(z) + net.weight_decay * sum(
        torch.sum((p - torch.tensor(q)) ** 2) for p, q in zip(params, net._init, strict=True)
    )
    ref.backward()  # type: ignore[no-untyped-call]
    assert loss == pytest.approx(float(ref.detach()), rel=1e-10)
    for g, p in zip(grads, params, strict=True):
        np.testing.assert_allclose(g, p.grad.numpy(), rtol=1e-9, atol=1e-12)  # type: ignore[union-attr]


@pytest.mark.parametrize("seed", [0, 1])
def test_slot_rewards_alone_identify_the_types(seed: int) -> None:
    """Three types whose rewards rise with their own expert's coefficient, observed only
    as the mix-weighted slot reward (+-0.05 noise), 600 slots of random mixes and merges.
    Fitting the weighted sum recovers each type's reward; pulling every output towards the
    slot reward cannot tell the types apart."""

    def truth(a: np.ndarray) -> np.ndarray:
        return 0.2 + 0.6 * a  # (N, 3): type v's reward is 0.2 + 0.6 a_v

    errors = {}
    for fit in ("joint", "shared"):
        rng = np.random.default_rng(seed)
        model = RewardModel(
            space=Simplex(3), context_dim=3, rng=rng, head="per-type", encoding="action",
            slot_fit=fit,
        )  # fmt: skip
        for _ in range(600):
            x, a = rng.dirichlet(np.ones(3)), rng.dirichlet(np.ones(3))
            model.learn(x, a, float(x @ truth(a[None])[0] + rng.uniform(-0.05, 0.05)))
        test = rng.dirichlet(np.ones(3), 200)
        pred = model.net.mean_types(model.inputs(np.full(3, 1 / 3), test))  # (200, 3)
        errors[fit] = float(np.sqrt(np.mean((pred - truth(test)) ** 2)))
    assert errors["joint"] < 0.05  # 0.027 and 0.028; the per-type rewards spread 0.14
    assert errors["joint"] < 0.5 * errors["shared"]


def test_sqrt_inputs_stretch_the_faces_of_the_simplex() -> None:
    """The square-root features are 0 at the barycentre, of unit order, and put merges that
    differ by 0.05 next to a vertex 0.22 * 2 sqrt(d) apart; the network sees both encodings."""
    d = 4
    np.testing.assert_allclose(sqrt_features(np.full((1, d), 1 / d)), 0.0, atol=1e-12)
    near, at = np.array([[0.95, 0.05, 0, 0]]), np.array([[1.0, 0, 0, 0]])
    gap = np.abs(sqrt_features(near) - sqrt_features(at))[0, 1]
    assert gap == pytest.approx(np.sqrt(0.05) * 2 * np.sqrt(d))
    model = RewardModel(
        space=Simplex(d), context_dim=d, rng=np.random.default_rng(0), head="per-type",
        encoding="sqrt",
    )  # fmt: skip
    z = model.inputs(np.full(d, 1 / d), near)
    assert z.shape == (1, 2 * d)
    np.testing.assert_allclose(z[:, d:], sqrt_features(near))
    np.testing.assert_allclose(z[:, :d], Simplex(d).encode(near))
    with pytest.raises(ValueError, match="simplex"):
        RewardModel(space=Box(low=(0.0,), high=(1.0,)), context_dim=1,
                    rng=np.random.default_rng(0), head="per-type", encoding="sqrt")  # fmt: skip
    with pytest.raises(ValueError, match="per-type"):
        RewardModel(space=Simplex(d), context_dim=d, rng=np.random.default_rng(0),
                    encoding="sqrt")  # fmt: skip


def test_training_fits_a_smooth_function() -> None:
    """A few hundred warm-started steps drive the error well below the signal's spread."""
    rng = np.random.default_rng(5)
    model = RewardModel(space=Simplex(3), context_dim=3, rng=rng, train_steps=4)
    xs = rng.dirichlet(np.ones(3), 400)
    acts = rng.dirichlet(np.ones(3), 400)
    target = 0.2 + 0.6 * np.exp(-np.sum((acts - xs) ** 2, axis=1) / 0.2)
    for x, a, r in zip(xs, acts, target, strict=True):
        model.learn(x, a, float(r))
    pred = np.array([model.mean(x, a[None])[0] for x, a in zip(xs, acts, strict=True)])
    assert np.sqrt(np.mean((pred - target) ** 2)) < 0.25 * target.std()


def test_history_grows_and_keeps_order() -> None:
    h = History(2)
    for i in range(150):
        h.append(np.array([i, -i]), i / 150)
    assert len(h) == 150 and h.inputs.shape == (150, 2)
    np.testing.assert_array_equal(h.inputs[:, 0], np.arange(150))
    assert h.rewards[-1] == pytest.approx(149 / 150)


def test_bad_settings_are_named() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="bonus"):
        RewardNet(input_dim=2, rng=rng, bonus="full")
    with pytest.raises(ValueError, match="activation"):
        RewardNet(input_dim=2, rng=rng, activation="gelu")
    with pytest.raises(ValueError, match="lr"):
        RewardNet(input_dim=2, rng=rng, lr=-1.0)
    with pytest.raises(ValueError, match="hidden"):
        RewardNet(input_dim=2, rng=rng, hidden=0)
    with pytest.raises(ValueError, match="slot_fit"):
        RewardModel(space=Simplex(2), context_dim=2, rng=rng, slot_fit="mean")
