"""Epsilon-greedy on a fixed grid of actions, with the same reward network as Tanbr.

The neural epsilon-greedy baseline of the neural-bandit literature: exploit the network's best
grid action, except with probability ``epsilon_t = min(1, epsilon / t^(1/3))`` play a uniform
grid action. The ``t^(-1/3)`` decay is the textbook schedule for exploration without
confidence widths (regret of order ``T^(2/3)``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tanbr.bandit.base import (
    argmax,
    check_action,
    check_context,
    check_feedback,
    check_int,
    check_positive,
    check_setup,
)
from tanbr.bandit.neural import RewardModel
from tanbr.bandit.spaces import Space, lattice


class EpsilonGreedyGrid:
    """Neural epsilon-greedy over a fixed lattice of actions.

    Parameters
    ----------
    epsilon
        Exploration rate at slot 1; slot ``t`` explores with ``min(1, epsilon / t^(1/3))``.
    max_arms
        Size budget of the lattice (Tanbr's ``max_leaves``, as for NeuralUCB-grid).
    **model_params
        Reward-model settings, as for Tanbr.
    """

    name = "egreedy-grid"

    def __init__(
        self,
        *,
        space: Space,
        context_dim: int,
        rng: np.random.Generator,
        epsilon: float = 0.2,
        max_arms: int = 2048,
        **model_params: Any,
    ) -> None:
        self.space = check_setup(space, context_dim, rng)
        self.context_dim = int(context_dim)
        self.rng = rng
        self.epsilon = check_positive("epsilon", epsilon, allow_zero=True)
        self.arms = lattice(self.space, check_int("max_arms", max_arms, minimum=1))
        self.model = RewardModel(
            space=self.space, context_dim=self.context_dim, rng=rng, **model_params
        )
        self.n_selected = 0

    def select(self, context: np.ndarray) -> np.ndarray:
        x = check_context(context, self.context_dim)
        self.n_selected += 1
        eps = min(1.0, self.epsilon / self.n_selected ** (1.0 / 3.0))
        if self.rng.random() < eps:
            return np.array(self.arms[self.rng.integers(len(self.arms))])
        return np.array(self.arms[argmax(self.model.mean(x, self.arms), self.rng)])

    def update(
        self,
        context: np.ndarray,
        action: np.ndarray,
        reward: float,
        *,
        type_rewards: np.ndarray | None = None,
    ) -> None:
        x = check_context(context, self.context_dim)
        a = check_action(action, self.space)
        r, per_type = check_feedback(reward, type_rewards, self.context_dim)
        self.model.learn(x, a, r, per_type)
