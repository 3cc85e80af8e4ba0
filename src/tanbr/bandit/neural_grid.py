"""NeuralUCB on a fixed grid of actions: Tanbr's network and width without the tree.

The candidates are the finest lattice of the space with at most ``max_arms`` points
(:func:`~tanbr.bandit.spaces.lattice`); the score is ``f(x, a) + gamma * width``. With the same
network, width and training as Tanbr, the difference between the two is exactly the adaptive
partition.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tanbr.bandit.base import (
    argmax,
    check_action,
    check_context,
    check_int,
    check_positive,
    check_reward,
    check_setup,
)
from tanbr.bandit.neural import RewardModel
from tanbr.bandit.spaces import Space, lattice


class NeuralGrid:
    """NeuralUCB (Zhou et al., 2020) over a fixed lattice of actions.

    Parameters
    ----------
    gamma
        Weight of the NeuralUCB width.
    max_arms
        Size budget of the lattice; by default Tanbr's ``max_leaves``, so both score the same
        number of candidates at most (on ``Simplex(4)``: 2024 arms, spacing 1/21).
    **model_params
        Reward-model settings, as for Tanbr.
    """

    name = "neural-grid"

    def __init__(
        self,
        *,
        space: Space,
        context_dim: int,
        rng: np.random.Generator,
        gamma: float = 0.1,
        max_arms: int = 2048,
        **model_params: Any,
    ) -> None:
        self.space = check_setup(space, context_dim, rng)
        self.context_dim = int(context_dim)
        self.rng = rng
        self.gamma = check_positive("gamma", gamma, allow_zero=True)
        self.arms = lattice(self.space, check_int("max_arms", max_arms, minimum=1))
        self.model = RewardModel(
            space=self.space, context_dim=self.context_dim, rng=rng, **model_params
        )

    def select(self, context: np.ndarray) -> np.ndarray:
        x = check_context(context, self.context_dim)
        mean, width = self.model.predict(x, self.arms)  # (N,), (N,)
        return np.array(self.arms[argmax(mean + self.gamma * width, self.rng)])

    def update(self, context: np.ndarray, action: np.ndarray, reward: float) -> None:
        x = check_context(context, self.context_dim)
        a = check_action(action, self.space)
        self.model.learn(x, a, check_reward(reward))
