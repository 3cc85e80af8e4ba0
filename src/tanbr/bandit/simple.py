"""Policies that do not learn: random, fixed, and the plug-in action ``a = x``."""

from __future__ import annotations

from typing import Any

import numpy as np

from tanbr.bandit.base import check_action, check_context, check_feedback, check_setup
from tanbr.bandit.spaces import Simplex, Space


class RandomPolicy:
    """A uniform random action every slot: the floor any learner must beat."""

    name = "random"

    def __init__(self, *, space: Space, context_dim: int, rng: np.random.Generator) -> None:
        self.space = check_setup(space, context_dim, rng, sparse=True)
        self.context_dim = int(context_dim)
        self.rng = rng

    def select(self, context: np.ndarray) -> np.ndarray:
        check_context(context, self.context_dim)
        return np.asarray(self.space.sample(self.rng, 1)[0])

    def update(
        self,
        context: np.ndarray,
        action: np.ndarray,
        reward: float,
        *,
        type_rewards: np.ndarray | None = None,
    ) -> None:
        check_context(context, self.context_dim)
        check_action(action, self.space)
        check_feedback(reward, type_rewards, self.context_dim)


class FixedPolicy:
    """Always the same action; by default the centre of the space (the uniform merge)."""

    name = "fixed"

    def __init__(
        self,
        *,
        space: Space,
        context_dim: int,
        rng: np.random.Generator,
        action: Any = None,
    ) -> None:
        self.space = check_setup(space, context_dim, rng, sparse=True)
        self.context_dim = int(context_dim)
        self.action = self.space.center() if action is None else check_action(action, self.space)

    def select(self, context: np.ndarray) -> np.ndarray:
        check_context(context, self.context_dim)
        return np.array(self.action)

    def update(
        self,
        context: np.ndarray,
        action: np.ndarray,
        reward: float,
        *,
        type_rewards: np.ndarray | None = None,
    ) -> None:
        check_context(context, self.context_dim)
        check_action(action, self.space)
        check_feedback(reward, type_rewards, self.context_dim)


class PlugIn:
    """Task-aware but not learning: the action is the context (merge as the mix says).

    Only meaningful when the action space is the task simplex of the context's dimension.
    """

    name = "plug-in"

    def __init__(self, *, space: Space, context_dim: int, rng: np.random.Generator) -> None:
        self.space = check_setup(space, context_dim, rng)
        if not isinstance(self.space, Simplex) or self.space.dim != context_dim:
            raise ValueError(
                "plug-in needs the action space Simplex(K) of the context's dimension "
                f"K={context_dim}, got {self.space}"
            )
        self.context_dim = int(context_dim)

    def select(self, context: np.ndarray) -> np.ndarray:
        x = check_context(context, self.context_dim)
        if np.any(x < 0) or x.sum() <= 0:
            raise ValueError(f"plug-in needs a context that is a mix (weights >= 0), got {x}")
        return np.asarray(x / x.sum())  # tolerate a mix estimate that does not sum to 1

    def update(
        self,
        context: np.ndarray,
        action: np.ndarray,
        reward: float,
        *,
        type_rewards: np.ndarray | None = None,
    ) -> None:
        check_context(context, self.context_dim)
        check_action(action, self.space)
        check_feedback(reward, type_rewards, self.context_dim)
