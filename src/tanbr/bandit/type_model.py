"""The paper's reward network: input the merge coefficients x, output one reward per task type.

``f(x; theta)`` is an MLP (width 64, depth 2) from the encoded merge to a V-vector, the
predicted reward of each task type under that merge. The context does not enter the network:
the slot's score of a merge is the inner product of its UCB vector with the mix ``psi``,

    U_v(x) = f_v(x) + gamma * sqrt(phi^T Z_v^-1 phi),     score(x) = psi . U(x)

with NeuralUCB's normalised gradient feature ``phi = g / sqrt(m)`` (m the width) and
``Z_v = lam I + sum_s w_sv phi_s phi_s^T`` over the played merges (``w_sv`` = 1 when type v
had feedback in slot s). ``g`` is the gradient of output v with respect to the output layer,
``(h_L(x), 1)``: the last-layer choice of NeuralUCB, exact and cheap (see
docs/algorithm.md, section 10). Because ``U`` does not depend on the context, a policy can
compute it once per update for all its candidates and score them at decision time with one
(N, V) @ (V,) product.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tanbr.bandit.base import check_int, check_positive
from tanbr.bandit.neural import (
    History,
    RewardNet,
    check_slot_fit,
    merge_inputs,
    single_threaded_blas,
    type_targets,
)
from tanbr.bandit.spaces import Simplex, SparseSimplex


class TypeRewardModel:
    """V-output reward network over merges, with per-type NeuralUCB vectors.

    Parameters
    ----------
    space
        The merges' simplex (its ``encode`` gives the network input).
    types
        V, the number of task types (the context's length).
    gamma, lam
        NeuralUCB's exploration coefficient and prior precision in its own normalisation
        (``phi = g / sqrt(m)``); the paper's values are 1 and 1.
    train_steps
        J, the Adam steps on minibatches of the history after every update.
    batch_size, refresh_every, hidden, depth, lr, weight_decay, slot_fit
        As for :class:`~tanbr.bandit.neural.RewardModel`.
    encoding
        ``"action"`` (the paper's network input, the default) or ``"sqrt"`` (the action and
        its :func:`~tanbr.bandit.neural.sqrt_features`, as Tanbr's network has).
    """

    def __init__(
        self,
        *,
        space: Simplex | SparseSimplex,
        types: int,
        rng: np.random.Generator,
        gamma: float = 1.0,
        lam: float = 1.0,
        train_steps: int = 8,
        batch_size: int = 64,
        refresh_every: int = 32,
        hidden: int = 64,
        depth: int = 2,
        slot_fit: str = "joint",
        encoding: str = "action",
        **net_params: Any,
    ) -> None:
        self.space = space
        self.types = check_int("types", types, minimum=1)
        self.slot_fit = check_slot_fit(slot_fit)
        if encoding not in ("action", "sqrt"):
            raise ValueError(f"encoding must be 'action' or 'sqrt', got {encoding!r}")
        self.encoding = encoding
        width = space.dim * (2 if encoding == "sqrt" else 1)
        self.gamma = check_positive("gamma", gamma, allow_zero=True)
        self.lam = check_positive("lam", lam)
        self.train_steps = check_int("train_steps", train_steps, minimum=0)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.refresh_every = check_int("refresh_every", refresh_every, minimum=1)
        hidden = check_int("hidden", hidden, minimum=1)
        # NeuralUCB's sqrt(phi^T (lam I + sum phi phi^T)^-1 phi) with phi = g / sqrt(m) is
        # sqrt(g^T (m lam I + sum g g^T)^-1 g): the network's unnormalised form at m * lam.
        self.net = RewardNet(
            input_dim=width, rng=rng, hidden=hidden, depth=depth, lam=self.lam * hidden,
            bonus="last-layer", outputs=self.types, **net_params,
        )  # fmt: skip
        self.history = History(width, self.types)

    def encode(self, actions: np.ndarray) -> np.ndarray:
        """Network inputs of merges (N, K): (N, D)."""
        return merge_inputs(self.space, actions, sqrt=self.encoding == "sqrt")

    def ucb(self, actions: np.ndarray) -> np.ndarray:
        """The UCB vectors ``f(x) + gamma * width(x)`` of merges (N, K): (N, V)."""
        with single_threaded_blas():
            mean, width = self.net.predict_types(self.encode(actions))
        return np.asarray(mean + self.gamma * width)

    def mean(self, actions: np.ndarray) -> np.ndarray:
        """Predicted per-type rewards of merges (N, K): (N, V)."""
        with single_threaded_blas():
            return self.net.mean_types(self.encode(actions))

    def learn(
        self,
        context: np.ndarray,
        action: np.ndarray,
        reward: float,
        type_rewards: np.ndarray | None,
    ) -> None:
        """One slot's feedback (already validated), then J Adam steps.

        Per-type rewards when given; otherwise the slot reward, fitted by the mix-weighted
        sum of the outputs (``slot_fit="joint"``) or by every output, weighted by the mix
        (``"shared"``; :data:`~tanbr.bandit.neural.SLOT_FITS`).
        """
        target, weight = type_targets(context, reward, type_rewards)
        z = self.encode(action[None, :])[0]
        joint = type_rewards is None and self.slot_fit == "joint"
        self.history.append(z, target, weight, joint=joint)
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


def mix_of(context: np.ndarray) -> np.ndarray:
    """The scoring weights ``psi`` of a context: clipped at 0 and normalised (V,)."""
    return type_targets(context, 0.0, None)[1]
