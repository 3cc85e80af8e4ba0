"""The reward network of the neural policies and its NeuralUCB exploration width.

A small MLP ``f(z; theta)`` predicts the reward of an input ``z = (context, action)``
(encoded). Its uncertainty follows NeuralUCB (Zhou, Li and Gu, ICML 2020): the width of a
candidate is ``sqrt(g^T Z^-1 g)`` where ``g`` is a gradient feature of the network at ``z`` and
``Z = lam * I + sum_s g_s g_s^T`` over the inputs played so far. Two CPU-cheap choices of ``g``:

* ``"last-layer"``: ``g = (h_L(z), 1)``, the gradient with respect to the output layer only,
  with the exact (m+1) x (m+1) matrix ``Z`` kept inverted by Sherman-Morrison updates;
* ``"diagonal"``: ``g`` is the gradient with respect to *all* parameters and ``Z`` is kept
  diagonal, as in the reference NeuralUCB code. The quadratic form of a whole batch of
  candidates is computed layer by layer from back-propagated deltas, without materialising
  per-candidate gradients: for a weight matrix ``W_l`` the per-candidate gradient is the outer
  product ``delta_l h_{l-1}^T``, so ``sum (delta_l^2 h_{l-1}^2) / D_l`` is a matrix product.

With ``outputs = V > 1`` the network predicts one reward per task type (the per-type head):
the squared loss is weighted per (sample, type), so a type without feedback in a slot simply
does not count, and each type has its own last-layer ``Z_v = lam I + sum_s w_sv g_s g_s^T``
(the gradient of output v with respect to the output layer is ``(h, 1)`` in v's block, so the
full last-layer ``Z`` is block diagonal with these blocks). While every sample weighs every
type the same, the blocks are equal and one inverse serves them all.

Training is a few warm-started Adam steps per slot on a minibatch of the history, with the
newest sample always in the batch and an L2 pull towards the initial weights (NeuralUCB's
``m lam ||theta - theta_0||^2`` regulariser). The network is small enough that numpy with
hand-written back-propagation beats an autograd framework on a CPU by a wide margin (a torch op
on a 64 x 64 tensor costs more in dispatch than the arithmetic); the tests check the hand
gradients against torch autograd.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

from tanbr.bandit.base import check_int, check_positive
from tanbr.bandit.chart import is_anchored
from tanbr.bandit.spaces import Box, Space

BONUSES: tuple[str, ...] = ("last-layer", "diagonal")
ACTIVATIONS: tuple[str, ...] = ("relu", "tanh")
ENCODINGS: tuple[str, ...] = ("plain", "offset", "action", "sqrt")
#: How a per-type network learns from a slot reward without per-type rewards: ``"joint"``
#: fits the mix-weighted sum of its outputs to it, ``"shared"`` fits every output to it,
#: weighted by the type's share of the mix (the former rule).
SLOT_FITS: tuple[str, ...] = ("joint", "shared")
HEADS: tuple[str, ...] = ("scalar", "per-type")
_BLAS: list[Any] = []  # the threadpoolctl controller, created on first use


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run the enclosed numpy code on one BLAS thread.

    The policy's matrices are tiny (hundreds x 64); a multi-threaded BLAS gains nothing on
    them and, on a busy two-core machine, its threads wait on each other for milliseconds per
    product. Uses ``threadpoolctl`` when it is installed, else changes nothing.
    """
    if not _BLAS:
        try:
            from threadpoolctl import ThreadpoolController  # type: ignore[import-untyped]
        except ImportError:  # pragma: no cover - optional
            _BLAS.append(None)
        else:
            _BLAS.append(ThreadpoolController())
    controller = _BLAS[0]
    if controller is None:
        yield
        return
    with controller.limit(limits=1, user_api="blas"):
        yield


class RewardNet:
    """MLP reward model with NeuralUCB widths.

    Parameters
    ----------
    input_dim
        Length of the encoded input ``z``.
    rng
        Source of the initial weights and of the minibatches.
    hidden, depth
        Width and number of hidden layers.
    lr, weight_decay
        Adam step size; strength of the pull towards the initial weights.
    bonus
        ``"last-layer"`` or ``"diagonal"`` gradient features (see the module docstring).
    lam
        Prior precision of ``Z``: the width of a never-seen input is ``|g| / sqrt(lam)``.
    activation
        ``"relu"`` or ``"tanh"`` hidden units.
    outputs
        Number of predicted rewards V (1: one scalar reward; V: one per task type).
    """

    def __init__(
        self,
        *,
        input_dim: int,
        rng: np.random.Generator,
        hidden: int = 64,
        depth: int = 2,
        lr: float = 1e-2,
        weight_decay: float = 1e-4,
        bonus: str = "last-layer",
        lam: float = 1.0,
        activation: str = "relu",
        outputs: int = 1,
    ) -> None:
        self.input_dim = check_int("input_dim", input_dim, minimum=1)
        self.outputs = check_int("outputs", outputs, minimum=1)
        self.hidden = check_int("hidden", hidden, minimum=1)
        self.depth = check_int("depth", depth, minimum=1)
        self.lr = check_positive("lr", lr)
        self.weight_decay = check_positive("weight_decay", weight_decay, allow_zero=True)
        self.lam = check_positive("lam", lam)
        if bonus not in BONUSES:
            raise ValueError(f"bonus must be one of {BONUSES}, got {bonus!r}")
        self.bonus: str = bonus
        if bonus == "diagonal" and self.outputs > 1:
            raise ValueError(
                "bonus='diagonal' needs outputs=1; the per-type head uses 'last-layer'"
            )
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.rng = rng
        # --- parameters: [W_1, b_1, ..., W_L, b_L, w_out, b_out] ----------------------------
        # He-uniform init: keeps the pre-activations of unit order for both activations.
        sizes = [self.input_dim] + [self.hidden] * self.depth
        arrays: list[np.ndarray] = []
        for fan_in, fan_out in itertools.pairwise(sizes):
            bound = math.sqrt(6.0 / fan_in)
            arrays.append(rng.uniform(-bound, bound, size=(fan_out, fan_in)))
            arrays.append(np.zeros(fan_out))
        out_shape = (self.outputs, self.hidden)
        arrays.append(rng.uniform(-1.0, 1.0, size=out_shape) / math.sqrt(self.hidden))
        arrays.append(np.zeros(self.outputs))
        self.params = arrays
        self._init = [a.copy() for a in arrays]
        self._adam_m = [np.zeros_like(a) for a in arrays]
        self._adam_v = [np.zeros_like(a) for a in arrays]
        self._adam_t = 0
        self.n_observed = 0
        self._reset_precision()

    # --- inference ------------------------------------------------------------------------

    def predict(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predicted rewards and widths ``sqrt(g^T Z^-1 g)`` of inputs ``z`` (N, D): (N,), (N,).

        The scalar network's view (``outputs == 1``); see :meth:`predict_types` for V outputs.
        """
        mean, width = self.predict_types(z)
        return self._scalar(mean), self._scalar(width)

    def predict_types(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-output predictions and widths of inputs ``z`` (N, D): (N, V), (N, V).

        Scored in float32, see :meth:`_forward`.
        """
        z = np.atleast_2d(np.asarray(z, dtype=np.float32))
        last = self.bonus == "last-layer"
        slopes, acts, mean = self._forward(z, slopes=not last)
        if last:
            # g = (h, 1): g^T Z^-1 g = h^T A h + 2 h^T b + c for Z^-1 = [[A, b], [b^T, c]]
            h = acts[-1]  # (N, m)
            zinv = (self._zinv[:1] if self._shared else self._zinv).astype(np.float32)
            a, b, c = zinv[:, :-1, :-1], zinv[:, :-1, -1], zinv[:, -1, -1]  # (G, m, m), ...
            ha = h @ a  # (G, N, m), one BLAS product per type
            quad = np.einsum("gnk,nk->ng", ha, h) + 2.0 * h @ b.T + c  # (N, G)
            if self._shared:
                quad = np.broadcast_to(quad, (len(h), self.outputs))
        else:
            quad = self._diag_quadratic(slopes, acts)[:, None]
        return mean.astype(float), np.sqrt(np.maximum(quad, 0.0)).astype(float)

    def mean(self, z: np.ndarray) -> np.ndarray:
        """Predicted rewards of inputs ``z`` (N, D), shape (N,) (``outputs == 1``)."""
        return self._scalar(self.mean_types(z))

    def mean_types(self, z: np.ndarray) -> np.ndarray:
        """Per-output predictions of inputs ``z`` (N, D), shape (N, V)."""
        z = np.atleast_2d(np.asarray(z, dtype=np.float32))
        return self._forward(z, slopes=False)[2].astype(float)

    def _scalar(self, values: np.ndarray) -> np.ndarray:
        if self.outputs != 1:
            raise ValueError(f"this network has {self.outputs} outputs; use the *_types methods")
        return np.asarray(values[:, 0])

    # --- exploration statistics -----------------------------------------------------------

    def observe(self, z: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Add the gradient feature of one played input ``z`` (D,) to ``Z``, with per-output
        ``weights`` (V,) (default 1: every output observed once)."""
        z = np.asarray(z, dtype=float).reshape(1, -1)
        w = self._weights(weights, 1)[0]  # (V,)
        slopes, acts, _ = self._forward(z)
        if self.bonus == "last-layer":
            self._unshare_if(w)
            g = self._last_features(acts[-1])[0]  # (m+1,)
            zinv = self._zinv[:1] if self._shared else self._zinv  # (G, m+1, m+1)
            wg = w[:1] if self._shared else w  # (G,)
            zg = zinv @ g  # (G, m+1)
            denom = 1.0 + wg * (zg @ g)  # (G,)
            zinv -= (wg / denom)[:, None, None] * zg[:, :, None] * zg[:, None, :]
        else:
            for acc, sq in zip(self._diag, self._diag_squares(slopes, acts), strict=True):
                acc += sq
        self.n_observed += 1

    def refresh(self, z: np.ndarray, weights: np.ndarray | None = None) -> None:
        """Rebuild ``Z`` from all played inputs ``z`` (n, D), with their per-output ``weights``
        (n, V), using the current network weights.

        Gradient features drift as the network trains; NeuralUCB's rank-one updates keep
        features from old weights. Rebuilding now and then keeps the widths honest.
        """
        self._reset_precision()
        z = np.atleast_2d(np.asarray(z, dtype=float))
        if len(z) == 0:
            return
        w = self._weights(weights, len(z))  # (n, V)
        slopes, acts, _ = self._forward(z)
        if self.bonus == "last-layer":
            g = self._last_features(acts[-1])  # (n, m+1)
            self._shared = bool(np.all(w == w[:, :1]))
            cols = w[:, :1] if self._shared else w  # (n, G)
            eye = self.lam * np.eye(g.shape[1])
            self._zinv = np.stack([np.linalg.inv(eye + (g * c[:, None]).T @ g) for c in cols.T])
        else:
            for acc, sq in zip(self._diag, self._diag_squares(slopes, acts), strict=True):
                acc += sq
        self.n_observed = len(z)

    # --- training -------------------------------------------------------------------------

    def fit(
        self,
        z: np.ndarray,
        r: np.ndarray,
        *,
        steps: int,
        batch_size: int,
        weights: np.ndarray | None = None,
        joint: np.ndarray | None = None,
    ) -> float:
        """A few Adam steps on minibatches of ``(z (n, D), r (n,) or (n, V))`` with per-output
        ``weights`` (n, V) (default 1) and ``joint`` (n,) rows (see :meth:`loss_and_grads`);
        returns the last loss.

        Each minibatch holds the newest sample plus ``batch_size - 1`` drawn uniformly (with
        replacement) from the history, so the cost per call is bounded whatever ``n`` is.
        """
        n = len(z)
        loss = float("nan")
        if n == 0:
            return loss
        for _ in range(steps):
            idx = self.rng.integers(0, n, size=min(batch_size, n))
            idx[0] = n - 1
            w = None if weights is None else weights[idx]
            j = None if joint is None else joint[idx]
            loss, grads = self.loss_and_grads(z[idx], r[idx], w, j)
            self._adam_step(grads)
        return loss

    def loss_and_grads(
        self,
        z: np.ndarray,
        r: np.ndarray,
        weights: np.ndarray | None = None,
        joint: np.ndarray | None = None,
    ) -> tuple[float, list[np.ndarray]]:
        """Regularised squared loss on a batch ``(z (B, D), r (B,) or (B, V))`` and its
        gradients.

        ``sum_{b,v} w_bv (f_v(z_b) - r_bv)^2 / B + weight_decay * |theta - theta_0|^2``
        (``w = 1``: the mean squared error), back-propagated by hand (the tests check it
        against torch autograd). Targets whose weight is 0 may be NaN. A ``joint`` row b
        (a slot reward without per-type rewards) instead adds
        ``(sum_v w_bv f_v(z_b) - r_b0)^2 / B``: the weighted sum of the outputs, not each
        output, is fitted to its one target.
        """
        slopes, acts, out = self._forward(z)  # out (B, V)
        w = self.params
        n = len(z)
        wts = self._weights(weights, n)  # (B, V)
        target = np.asarray(r, dtype=float).reshape(n, -1)
        resid = np.where(wts > 0, out - np.where(wts > 0, target, 0.0), 0.0)  # (B, V)
        dout = 2.0 * wts * resid / n  # (B, V) d loss / d out
        if joint is None or not np.any(joint):
            loss = float(np.sum(wts * resid**2) / n)
        else:
            rows = np.asarray(joint, dtype=bool)  # (B,)
            summed = np.sum(wts * out, axis=1) - target[:, 0]  # (B,) for the joint rows
            loss = float((np.sum(wts[~rows] * resid[~rows] ** 2) + np.sum(summed[rows] ** 2)) / n)
            dout[rows] = 2.0 * wts[rows] * summed[rows, None] / n
        grads: list[np.ndarray] = [np.empty(0)] * len(w)
        grads[-2] = dout.T @ acts[-1]  # (V, m)
        grads[-1] = dout.sum(axis=0)  # (V,)
        delta = (dout @ w[-2]) * slopes[-1]  # (B, m)
        for layer in range(self.depth - 1, -1, -1):
            grads[2 * layer] = delta.T @ acts[layer]  # (m, fan_in)
            grads[2 * layer + 1] = delta.sum(axis=0)  # (m,)
            if layer:
                delta = (delta @ w[2 * layer]) * slopes[layer - 1]  # (B, m)
        if self.weight_decay:
            for i, (p, p0) in enumerate(zip(w, self._init, strict=True)):
                loss += self.weight_decay * float(np.sum((p - p0) ** 2))
                grads[i] = grads[i] + 2.0 * self.weight_decay * (p - p0)
        return loss, grads

    # --- internals ------------------------------------------------------------------------

    def _forward(
        self, z: np.ndarray, *, slopes: bool = True
    ) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        """Activation slopes (if asked) and activations of every hidden layer, and outputs.

        Computes in the dtype of ``z``: float32 for scoring candidates (twice the speed of
        float64 and far more precision than the rewards' noise), float64 for training.
        """
        w = [p.astype(z.dtype, copy=False) for p in self.params]
        slope: list[np.ndarray] = []
        acts: list[np.ndarray] = [z]  # h_0 = z, (N, D)
        h = z
        for layer in range(self.depth):
            a = h @ w[2 * layer].T + w[2 * layer + 1]  # (N, m)
            if self.activation == "relu":
                h = np.maximum(a, 0.0)
                if slopes:
                    slope.append((a > 0).astype(a.dtype))
            else:
                h = np.tanh(a)
                if slopes:
                    slope.append(1.0 - h * h)
            acts.append(h)
        out = h @ w[-2].T + w[-1]  # (N, V)
        return slope, acts, out

    @staticmethod
    def _last_features(h: np.ndarray) -> np.ndarray:
        return np.concatenate([h, np.ones((len(h), 1))], axis=1)  # (N, m+1)

    def _deltas(self, slopes: list[np.ndarray]) -> list[np.ndarray]:
        """d out / d pre-activation of every hidden layer, first to last, each (N, m)."""
        w = self.params
        delta = w[-2][0][None, :] * slopes[-1]  # (N, m), one output (diagonal widths)
        deltas = [delta]
        for layer in range(self.depth - 1, 0, -1):
            delta = (delta @ w[2 * layer]) * slopes[layer - 1]  # (N, m)
            deltas.append(delta)
        return deltas[::-1]

    def _diag_squares(self, slopes: list[np.ndarray], acts: list[np.ndarray]) -> list[np.ndarray]:
        """Squared gradients, summed over the batch, in parameter order (same shapes)."""
        deltas = self._deltas(slopes)
        out: list[np.ndarray] = []
        for layer, delta in enumerate(deltas):
            d2 = delta**2  # (N, m)
            out.append(d2.T @ acts[layer] ** 2)  # (m, fan_in)
            out.append(d2.sum(axis=0))  # (m,)
        out.append((acts[-1] ** 2).sum(axis=0)[None, :])  # (1, m)
        out.append(np.array([float(len(acts[-1]))]))  # (1,)
        return out

    def _diag_quadratic(self, slopes: list[np.ndarray], acts: list[np.ndarray]) -> np.ndarray:
        """``g^T D^-1 g`` for every input, shape (N,)."""
        deltas = self._deltas(slopes)
        inv = [1.0 / d for d in self._diag]
        quad = np.zeros(len(acts[0]))
        for layer, delta in enumerate(deltas):
            d2 = delta**2  # (N, m)
            quad += np.einsum("nf,nf->n", d2 @ inv[2 * layer], acts[layer] ** 2)
            quad += d2 @ inv[2 * layer + 1]
        quad += (acts[-1] ** 2) @ inv[-2][0] + inv[-1][0]
        return quad

    def _reset_precision(self) -> None:
        eye = np.eye(self.hidden + 1) / self.lam
        self._zinv = np.repeat(eye[None], self.outputs, axis=0)  # (V, m+1, m+1)
        self._shared = True  # every sample so far weighed every output the same
        self._diag = [np.full(p.shape, self.lam) for p in self.params]

    def _weights(self, weights: np.ndarray | None, n: int) -> np.ndarray:
        """Per-(sample, output) weights as an (n, V) array (default: all ones)."""
        if weights is None:
            return np.ones((n, self.outputs))
        return np.asarray(weights, dtype=float).reshape(n, self.outputs)

    def _unshare_if(self, w: np.ndarray) -> None:
        """Give every output its own ``Z^-1`` once a sample weighs the outputs differently."""
        if self._shared and not np.all(w == w[0]):
            self._zinv[1:] = self._zinv[0]
            self._shared = False

    def _adam_step(self, grads: list[np.ndarray]) -> None:
        beta1, beta2, eps = 0.9, 0.999, 1e-8
        self._adam_t += 1
        c1 = 1.0 - beta1**self._adam_t
        c2 = 1.0 - beta2**self._adam_t
        for p, g, m, v in zip(self.params, grads, self._adam_m, self._adam_v, strict=True):
            m *= beta1
            m += (1.0 - beta1) * g
            v *= beta2
            v += (1.0 - beta2) * g * g
            p -= self.lr * (m / c1) / (np.sqrt(v / c2) + eps)


def type_targets(
    context: np.ndarray, reward: float, type_rewards: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """What a per-type learner trains on: targets (V,) and weights (V,) for one slot.

    With per-type feedback each type with a reward is one observation of its own reward
    (weight 1) and a type without one (NaN) does not count (weight 0). Without it, the slot's
    scalar reward stands for every type, weighted by the type's share of the mix: the slot
    reward is the mix-weighted sum of the per-type rewards, so a type that hardly took part
    hardly explains it.
    """
    if type_rewards is not None:
        seen = ~np.isnan(type_rewards)
        return np.where(seen, type_rewards, 0.0), seen.astype(float)
    p = np.clip(np.asarray(context, dtype=float), 0.0, None)
    total = float(p.sum())
    weights = p / total if total > 0 else np.full(len(p), 1.0 / len(p))
    return np.full(len(p), float(reward)), weights


def check_slot_fit(slot_fit: str) -> str:
    """``slot_fit`` validated against :data:`SLOT_FITS`."""
    if slot_fit not in SLOT_FITS:
        raise ValueError(f"slot_fit must be one of {SLOT_FITS}, got {slot_fit!r}")
    return slot_fit


def sqrt_features(actions: np.ndarray) -> np.ndarray:
    """``(sqrt(a) - sqrt(1/d)) * 2 sqrt(d)`` of merges (N, d): their Hellinger embedding,
    0 at the barycentre and of unit order.

    On the simplex, ``sqrt`` stretches the neighbourhood of every face: coefficients 0 and
    0.05 are 0.22 apart under ``sqrt`` (before the scale). A network fed these can bend near a
    vertex, and its gradient features there (hence its NeuralUCB width) tell such merges
    apart.
    """
    a = np.clip(np.asarray(actions, dtype=float), 0.0, None)
    d = a.shape[-1]
    return np.asarray((np.sqrt(a) - math.sqrt(1.0 / d)) * 2.0 * math.sqrt(d))


def merge_inputs(space: Space, actions: np.ndarray, *, sqrt: bool) -> np.ndarray:
    """A network's inputs for merges alone (N, dim): ``space.encode(a)``, with ``sqrt`` their
    :func:`sqrt_features` beside it (N, 2 dim)."""
    a = np.atleast_2d(actions)
    if not sqrt:
        return np.asarray(space.encode(a))
    return np.concatenate([space.encode(a), sqrt_features(a)], axis=1)


class History:
    """Growing arrays of the played inputs, their targets and the targets' weights (one
    column per network output); amortised O(1) appends."""

    def __init__(self, input_dim: int, outputs: int = 1) -> None:
        self._z = np.zeros((64, input_dim))
        self._r = np.zeros((64, outputs))
        self._w = np.zeros((64, outputs))
        self._j = np.zeros(64, dtype=bool)
        self.n = 0

    def append(self, z: np.ndarray, r: Any, w: Any = 1.0, joint: bool = False) -> None:
        if self.n == len(self._r):
            self._z = np.concatenate([self._z, np.zeros_like(self._z)])
            self._r = np.concatenate([self._r, np.zeros_like(self._r)])
            self._w = np.concatenate([self._w, np.zeros_like(self._w)])
            self._j = np.concatenate([self._j, np.zeros_like(self._j)])
        self._z[self.n] = z
        self._r[self.n] = r
        self._w[self.n] = w
        self._j[self.n] = joint
        self.n += 1

    @property
    def inputs(self) -> np.ndarray:
        """Encoded inputs, shape (n, D)."""
        return self._z[: self.n]

    @property
    def rewards(self) -> np.ndarray:
        """Targets, shape (n,) for one output, else (n, V)."""
        r = self._r[: self.n]
        return r[:, 0] if r.shape[1] == 1 else r

    @property
    def weights(self) -> np.ndarray:
        """Weights of the targets, shape (n, V)."""
        return self._w[: self.n]

    @property
    def joint(self) -> np.ndarray:
        """Rows whose weighted sum of outputs fits one slot reward, shape (n,)."""
        return self._j[: self.n]

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Histories pickled before ``joint`` existed had none. (Keys are interned as pickle's
        default does, so a restored history pickles to the same bytes.)"""
        self.__dict__.update({sys.intern(k): v for k, v in state.items()})
        if "_j" not in state:
            self._j = np.zeros(len(self._r), dtype=bool)

    def __len__(self) -> int:
        return self.n


class RewardModel:
    """Everything a neural policy learns: the network, its history and when to train.

    Inputs are ``((x - 1/d) * d, space.encode(a))``: contexts are centred and scaled like
    mixes of ``d`` tasks, which keeps the network's inputs of unit order whatever K is. With
    ``encoding="offset"`` (actions on the task simplex of the context) the step
    ``(a - x) * d`` away from the plug-in merge is appended: a reward that peaks near the
    plug-in becomes a bump near the origin of these coordinates. ``encoding="action"`` feeds
    the action alone, as the paper's network does: with the per-type head the context then
    enters only through the scoring ``psi . f(a)``. ``encoding="sqrt"`` feeds the action and
    its :func:`sqrt_features` (merges on a simplex only): rewards that peak near a face of the
    simplex, as a type's reward near its own expert's vertex does, are then within reach of a
    small network, and so is telling apart the merges near a vertex it has played.

    ``prior > 0`` gives the network a prior mean ``m0(x, a) = -prior * |a - x|^2`` ("merges far
    from the plug-in are worse"): the network learns the residual ``r - m0`` and predicts
    ``m0 + f``. Without it an untrained network ranks candidates at random, and the first
    hundreds of slots cost more than the plug-in merge would.

    ``head="per-type"`` predicts one reward per task type (V = ``context_dim`` outputs) and
    scores a candidate by the mix-weighted sum ``psi . f`` (its width likewise ``psi . w``,
    ``psi`` the context normalised to a mix). It learns from the per-type feedback when the
    slot has it (:func:`type_targets`).

    Parameters
    ----------
    space, context_dim, rng
        As for the policies.
    train_steps, batch_size
        Adam steps per update and their minibatch size: the bounded training cost per slot.
    refresh_every
        Rebuild ``Z`` from the whole history with the current weights every this many updates
        (rank-one updates in between).
    encoding
        ``"plain"``, ``"offset"``, ``"action"`` or ``"sqrt"`` network inputs (see above).
    prior
        Curvature of the prior mean ``-prior * |a - x|^2`` (0: none).
    head
        ``"scalar"`` (one predicted reward) or ``"per-type"`` (see above).
    slot_fit
        How the per-type head learns from a slot reward alone (:data:`SLOT_FITS`): the slot
        reward is the mix-weighted sum of the per-type rewards, so ``"joint"`` fits
        ``psi . f(a)`` to it, which tells the types apart across slots with different mixes;
        ``"shared"`` pulls every output towards the slot reward.
    **net_params
        Passed to :class:`RewardNet` (hidden, depth, lr, weight_decay, bonus, lam,
        activation).
    """

    def __init__(
        self,
        *,
        space: Space,
        context_dim: int,
        rng: np.random.Generator,
        train_steps: int = 4,
        batch_size: int = 64,
        refresh_every: int = 32,
        encoding: str = "plain",
        prior: float = 0.0,
        head: str = "scalar",
        slot_fit: str = "joint",
        **net_params: Any,
    ) -> None:
        self.space = space
        self.context_dim = context_dim
        self.slot_fit = check_slot_fit(slot_fit)
        self.train_steps = check_int("train_steps", train_steps, minimum=0)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.refresh_every = check_int("refresh_every", refresh_every, minimum=1)
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        self.encoding = encoding
        self.prior = check_positive("prior", prior, allow_zero=True)
        if (encoding == "offset" or self.prior) and not is_anchored(space, context_dim):
            raise ValueError(
                f"encoding={encoding!r} and prior={prior!r} need the action space Simplex(K) "
                f"of the context's dimension K={context_dim}, got {space}"
            )
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if encoding in ("action", "sqrt") and (head != "per-type" or self.prior):
            raise ValueError(
                f"encoding={encoding!r} (no context in the input) needs head='per-type' and no "
                "prior: the context must enter somewhere, and the prior mean depends on it"
            )
        if encoding == "sqrt" and isinstance(space, Box):
            raise ValueError(f"encoding='sqrt' needs merges on a simplex, got {space}")
        self.head = head
        outputs = context_dim if head == "per-type" else 1
        width = {"plain": context_dim + space.dim, "offset": context_dim + 2 * space.dim,
                 "action": space.dim, "sqrt": 2 * space.dim}[encoding]  # fmt: skip
        self.net = RewardNet(input_dim=width, rng=rng, outputs=outputs, **net_params)
        self.history = History(width, outputs)

    def inputs(self, context: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Encoded network inputs for one context and ``actions`` (N, dim): (N, D)."""
        actions = np.atleast_2d(actions)
        if self.encoding in ("action", "sqrt"):
            return merge_inputs(self.space, actions, sqrt=self.encoding == "sqrt")
        k = self.context_dim
        xc = (context - 1.0 / k) * k  # (Dx,)
        parts = [np.broadcast_to(xc, (len(actions), k)), self.space.encode(actions)]
        if self.encoding == "offset":
            parts.append((actions - context) * k)  # (N, K) the step away from the plug-in
        return np.concatenate(parts, axis=1)

    def prior_mean(self, context: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """The prior mean ``-prior * |a - x|^2`` of ``actions`` (N, dim), shape (N,)."""
        if not self.prior:
            return np.zeros(len(np.atleast_2d(actions)))
        d = np.atleast_2d(actions) - context
        return np.asarray(-self.prior * np.sum(d * d, axis=1))

    def _mix(self, context: np.ndarray) -> np.ndarray:
        """The per-type head's scoring weights: the context as a mix (V,)."""
        return type_targets(context, 0.0, None)[1]

    def predict(self, context: np.ndarray, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predicted rewards and widths of ``actions`` (N, dim) for one context: (N,), (N,)."""
        with single_threaded_blas():
            mean, width = self.net.predict_types(self.inputs(context, actions))  # (N, V)
        if self.head == "per-type":
            psi = self._mix(context)
            return mean @ psi + self.prior_mean(context, actions), width @ psi
        return mean[:, 0] + self.prior_mean(context, actions), width[:, 0]

    def mean(self, context: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Predicted rewards of ``actions`` (N, dim) for one context, shape (N,)."""
        with single_threaded_blas():
            out = self.net.mean_types(self.inputs(context, actions))  # (N, V)
        score = out @ self._mix(context) if self.head == "per-type" else out[:, 0]
        return np.asarray(score + self.prior_mean(context, actions))

    def learn(
        self,
        context: np.ndarray,
        action: np.ndarray,
        reward: float,
        type_rewards: np.ndarray | None = None,
    ) -> None:
        """Record one slot's feedback and train a little (inputs already validated).

        The scalar head learns from ``reward``; the per-type head from ``type_rewards`` when
        given, else from ``reward`` weighted by the mix (:func:`type_targets`).
        """
        z = self.inputs(context, action[None, :])[0]
        m0 = float(self.prior_mean(context, action[None, :])[0])
        if self.head == "per-type":
            target, weight = type_targets(context, reward, type_rewards)
            joint = type_rewards is None and self.slot_fit == "joint"
            self.history.append(z, target - m0, weight, joint=joint)
        else:
            weight = np.ones(1)
            self.history.append(z, reward - m0, weight)
        with single_threaded_blas():
            if len(self.history) % self.refresh_every == 0:
                self.net.refresh(self.history.inputs, self.history.weights)
            else:
                self.net.observe(z, weight)
            self.net.fit(
                self.history.inputs,
                self.history.rewards,
                steps=self.train_steps,
                batch_size=self.batch_size,
                weights=self.history.weights,
                joint=self.history.joint,
            )
