"""``nucb``: the paper's "Nucb" baseline, NeuralUCB over random feasible merges, no tree.

Every slot draws a fresh set of feasible candidates (uniform on the B-sparse simplex, or, for
``nucb-anchored``, uniform in the context-anchored chart of :mod:`~tanbr.bandit.chart`, which
keeps supports), scores them with the same network family as ``tanbr-paper`` (input the merge,
output one reward per task type, per-type UCB vectors scored by the mix) and plays the best.
The difference between ``tanbr-paper`` and ``nucb`` is exactly the tree.
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
from tanbr.bandit.chart import DEFAULT_FLOOR, anchor_weights, is_anchored, to_action
from tanbr.bandit.spaces import Simplex, SparseSimplex
from tanbr.bandit.tanbr_paper import feasible_space
from tanbr.bandit.type_model import TypeRewardModel, mix_of

CHARTS: tuple[str, ...] = ("absolute", "relative")


class NeuralUCBRandom:
    """NeuralUCB over ``candidates`` random feasible merges drawn afresh every slot.

    Parameters
    ----------
    space, context_dim, rng, max_nonzero
        As for ``tanbr-paper``.
    candidates
        Merges drawn per slot.
    chart
        ``"absolute"`` draws uniformly on the feasible set; ``"relative"`` draws uniformly in
        the context-anchored chart (needs V = K), so the draws crowd around the plug-in merge
        as Tanbr's leaves do.
    floor
        The relative chart's floor.
    gamma, lam, train_steps, **net_params
        As for ``tanbr-paper``'s network.
    """

    def __init__(
        self,
        *,
        space: Simplex | SparseSimplex,
        context_dim: int,
        rng: np.random.Generator,
        max_nonzero: int | None = None,
        candidates: int = 256,
        chart: str = "absolute",
        floor: float = DEFAULT_FLOOR,
        gamma: float = 1.0,
        lam: float = 1.0,
        train_steps: int = 8,
        **net_params: Any,
    ) -> None:
        self.space = check_setup(space, context_dim, rng, sparse=True)
        self.feasible, self.max_nonzero = feasible_space(self.space, max_nonzero)
        self.context_dim = int(context_dim)
        self.rng = rng
        self.candidates = check_int("candidates", candidates, minimum=1)
        if chart not in CHARTS:
            raise ValueError(f"chart must be one of {CHARTS}, got {chart!r}")
        if chart == "relative" and not is_anchored(self.feasible, self.context_dim):
            raise ValueError(
                "chart='relative' needs merges on the simplex of the context's dimension "
                f"K={self.context_dim}, got {self.space}"
            )
        self.chart = chart
        self.floor = check_positive("floor", floor)
        self.name = "nucb" if chart == "absolute" else "nucb-anchored"
        self.model = TypeRewardModel(
            space=Simplex(self.feasible.dim), types=self.context_dim, rng=rng, gamma=gamma,
            lam=lam, train_steps=train_steps, **net_params,
        )  # fmt: skip

    def select(self, context: np.ndarray) -> np.ndarray:
        x = check_context(context, self.context_dim)
        draws = self.feasible.sample(self.rng, self.candidates)  # (N, K)
        if self.chart == "relative":
            draws = to_action(anchor_weights(x, self.floor), draws)  # supports unchanged
        score = self.model.ucb(draws) @ mix_of(x)
        return np.array(draws[argmax(score, self.rng)])

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


def nucb_anchored(**params: Any) -> NeuralUCBRandom:
    """``nucb`` in the context-anchored chart: the anchor Tanbr has, offered to the baseline."""
    return NeuralUCBRandom(chart="relative", **params)
