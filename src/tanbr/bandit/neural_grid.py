"""NeuralUCB on a fixed grid of actions: Tanbr's network and width without the tree.

The candidates are the finest lattice of the space with at most ``max_arms`` points
(:func:`~tanbr.bandit.spaces.lattice`); the score is ``f(x, a) + gamma * width``. With the same
network, width and training as Tanbr, the difference between the two is exactly the adaptive
partition.

``neural-grid-anchored`` is the same baseline given Tanbr's whole anchor: the lattice lives in
the context-anchored chart (:mod:`~tanbr.bandit.chart`; its centre is the plug-in merge) and
the reward model has Tanbr's offset inputs and prior mean. Against it, Tanbr's lead is the
tree's alone.
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
from tanbr.bandit.chart import (
    ANCHORED_MODEL,
    CHARTS,
    DEFAULT_FLOOR,
    anchor_weights,
    is_anchored,
    to_action,
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
    chart
        ``"absolute"`` (the lattice of the space) or ``"relative"`` (the lattice of the
        context-anchored chart, with Tanbr's anchored reward model; ``neural-grid-anchored``).
    floor
        The relative chart's floor.
    **model_params
        Reward-model settings, as for Tanbr.
    """

    def __init__(
        self,
        *,
        space: Space,
        context_dim: int,
        rng: np.random.Generator,
        gamma: float = 0.1,
        max_arms: int = 2048,
        chart: str = "absolute",
        floor: float = DEFAULT_FLOOR,
        **model_params: Any,
    ) -> None:
        self.space = check_setup(space, context_dim, rng)
        self.context_dim = int(context_dim)
        self.rng = rng
        self.gamma = check_positive("gamma", gamma, allow_zero=True)
        self.arms = lattice(self.space, check_int("max_arms", max_arms, minimum=1))
        if chart not in CHARTS:
            raise ValueError(f"chart must be one of {CHARTS}, got {chart!r}")
        if chart == "relative":
            if not is_anchored(self.space, self.context_dim):
                raise ValueError(
                    "chart='relative' needs the action space Simplex(K) of the context's "
                    f"dimension K={self.context_dim}, got {self.space}"
                )
            model_params = {**ANCHORED_MODEL, **model_params}
        self.chart = chart
        self.floor = check_positive("floor", floor)
        self.name = "neural-grid" if chart == "absolute" else "neural-grid-anchored"
        self.model = RewardModel(
            space=self.space, context_dim=self.context_dim, rng=rng, **model_params
        )

    def select(self, context: np.ndarray) -> np.ndarray:
        x = check_context(context, self.context_dim)
        arms = self._arms(x)
        mean, width = self.model.predict(x, arms)  # (N,), (N,)
        return np.array(arms[argmax(mean + self.gamma * width, self.rng)])

    def _arms(self, x: np.ndarray) -> np.ndarray:
        """The candidates for a context: the lattice, mapped through the chart if relative."""
        if self.chart == "absolute":
            return self.arms
        return to_action(anchor_weights(x, self.floor), self.arms)

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


def neural_grid_anchored(**params: Any) -> NeuralGrid:
    """NeuralUCB-grid with Tanbr's anchor: the chart, offset inputs and prior mean."""
    return NeuralGrid(chart="relative", **params)
