"""LinUCB on a fixed grid of actions (Li et al., WWW 2010, disjoint model).

Each grid arm has its own ridge regression of the reward on the context features
``phi = (x, 1)`` and is scored by ``theta_a^T phi + alpha * sqrt(phi^T A_a^-1 phi)``. All arms
are scored in one batched einsum; each update is a Sherman-Morrison step on one arm.
"""

from __future__ import annotations

import numpy as np

from tanbr.bandit.base import (
    argmax,
    check_action,
    check_context,
    check_feedback,
    check_int,
    check_positive,
    check_setup,
    nearest,
)
from tanbr.bandit.spaces import Space, lattice


class LinUCBGrid:
    """Disjoint LinUCB over the finest lattice with at most ``max_arms`` points.

    Parameters
    ----------
    alpha
        Weight of the confidence width.
    lam
        Ridge prior precision of every arm.
    max_arms
        Size budget of the lattice. Every arm needs about ``context_dim + 1`` plays before its
        model means anything, so the default is smaller than the neural grids'.
    """

    name = "linucb-grid"

    def __init__(
        self,
        *,
        space: Space,
        context_dim: int,
        rng: np.random.Generator,
        alpha: float = 0.5,
        lam: float = 1.0,
        max_arms: int = 64,
    ) -> None:
        self.space = check_setup(space, context_dim, rng)
        self.context_dim = int(context_dim)
        self.rng = rng
        self.alpha = check_positive("alpha", alpha, allow_zero=True)
        lam = check_positive("lam", lam)
        self.arms = lattice(self.space, check_int("max_arms", max_arms, minimum=1))
        n, d = len(self.arms), self.context_dim + 1
        self.a_inv = np.broadcast_to(np.eye(d) / lam, (n, d, d)).copy()  # (N, d, d)
        self.b = np.zeros((n, d))  # (N, d)

    def _features(self, x: np.ndarray) -> np.ndarray:
        return np.append(x, 1.0)  # (d,)

    def select(self, context: np.ndarray) -> np.ndarray:
        phi = self._features(check_context(context, self.context_dim))
        theta = np.einsum("nij,nj->ni", self.a_inv, self.b)  # (N, d)
        width = np.sqrt(np.einsum("i,nij,j->n", phi, self.a_inv, phi))  # (N,)
        return np.array(self.arms[argmax(theta @ phi + self.alpha * width, self.rng)])

    def update(
        self,
        context: np.ndarray,
        action: np.ndarray,
        reward: float,
        *,
        type_rewards: np.ndarray | None = None,
    ) -> None:
        phi = self._features(check_context(context, self.context_dim))
        arm = nearest(self.arms, check_action(action, self.space))
        r = check_feedback(reward, type_rewards, self.context_dim)[0]
        ap = self.a_inv[arm] @ phi  # (d,)
        self.a_inv[arm] -= np.outer(ap, ap) / (1.0 + phi @ ap)
        self.b[arm] += r * phi
