"""The policy contract and the input checks every policy shares.

A policy has two verbs, ``select(context) -> action`` and
``update(context, action, reward, *, type_rewards=None)``, always with the context
(non-contextual policies ignore it). ``type_rewards`` is the optional per-type feedback of the
slot: the reward of each of the V = ``context_dim`` task types, NaN where no scored request
was assigned to that type; policies that cannot use it ignore it. ``update`` recovers
everything it needs from its arguments, never from a remembered "last action", so late and
out-of-order feedback works.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np

from tanbr.bandit.spaces import ActionSpace, Box, Simplex, Space, SparseSimplex, check_space


@runtime_checkable
class Policy(Protocol):
    """A (contextual) bandit over a continuous action space."""

    name: str

    def select(self, context: np.ndarray) -> np.ndarray: ...

    def update(
        self,
        context: np.ndarray,
        action: np.ndarray,
        reward: float,
        *,
        type_rewards: np.ndarray | None = None,
    ) -> None: ...


#: ``factory(space=..., context_dim=..., rng=..., **params) -> Policy``
PolicyFactory = Callable[..., Policy]


def check_context(context: Any, dim: int) -> np.ndarray:
    """A float copy of ``context``; ValueError unless finite with shape ``(dim,)``."""
    try:
        x = np.array(context, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"context must be a numeric vector, got {context!r}") from err
    if x.shape != (dim,):
        raise ValueError(f"context must have shape ({dim},), got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"context must be finite, got {x.tolist()}")
    return x


def check_action(action: Any, space: ActionSpace) -> np.ndarray:
    """A float copy of ``action``; ValueError unless it lies inside ``space``."""
    try:
        a = np.array(action, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"action must be a numeric vector, got {action!r}") from err
    if a.shape != (space.dim,):
        raise ValueError(f"action must have shape ({space.dim},), got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"action must be finite, got {a.tolist()}")
    if not space.contains(a):
        raise ValueError(f"action {a.tolist()} is outside the action space {space}")
    return a


def check_reward(reward: Any) -> float:
    """The reward as a float; ValueError unless finite and in [0, 1]."""
    if isinstance(reward, bool):
        raise ValueError(f"reward must be a number in [0, 1], got {reward!r}")
    try:
        r = float(reward)
    except (TypeError, ValueError) as err:
        raise ValueError(f"reward must be a number in [0, 1], got {reward!r}") from err
    if not math.isfinite(r):
        raise ValueError(f"reward must be finite, got {r}")
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"reward must be in [0, 1], got {r}")
    return r


def check_type_rewards(type_rewards: Any, dim: int) -> np.ndarray | None:
    """Per-type rewards as a float copy of shape ``(dim,)``, or None when not given.

    Each entry is a reward in [0, 1], or NaN where no scored request was assigned to that
    type; ValueError (naming ``type_rewards``) for a wrong shape, a non-number, an infinite
    value, a value outside [0, 1], or no finite entry at all (then pass None).
    """
    if type_rewards is None:
        return None
    if isinstance(type_rewards, str | bytes | bool):
        raise ValueError(f"type_rewards must be a numeric vector, got {type_rewards!r}")
    try:
        v = np.array(type_rewards, dtype=float)
    except (TypeError, ValueError) as err:
        raise ValueError(f"type_rewards must be a numeric vector, got {type_rewards!r}") from err
    if v.shape != (dim,):
        raise ValueError(f"type_rewards must have shape ({dim},), got {v.shape}")
    seen = ~np.isnan(v)
    if not np.any(seen):
        raise ValueError("type_rewards has no finite entry; pass None when no type was scored")
    if not np.all(np.isfinite(v[seen])):
        raise ValueError(f"type_rewards must be finite or NaN, got {v.tolist()}")
    if np.any(v[seen] < 0.0) or np.any(v[seen] > 1.0):
        raise ValueError(f"type_rewards must be in [0, 1] (or NaN), got {v.tolist()}")
    return v


def check_feedback(
    reward: Any, type_rewards: Any, context_dim: int
) -> tuple[float, np.ndarray | None]:
    """``check_reward`` and ``check_type_rewards`` together: what every ``update`` validates."""
    return check_reward(reward), check_type_rewards(type_rewards, context_dim)


def check_setup(space: Any, context_dim: Any, rng: Any, *, sparse: bool = False) -> Space:
    """Validate the arguments every factory takes; returns the space.

    ``sparse=False`` (a policy that cannot keep its actions B-sparse) refuses a
    ``SparseSimplex`` whose cap binds.
    """
    checked = check_space(space)
    if isinstance(checked, SparseSimplex) and not sparse:
        raise ValueError(
            f"this policy cannot keep actions inside {checked}; use tanbr-paper or nucb, or "
            f"Simplex({checked.dim})"
        )
    if isinstance(context_dim, bool) or not isinstance(context_dim, int | np.integer):
        raise ValueError(f"context_dim must be an int, got {context_dim!r}")
    if context_dim < 1:
        raise ValueError(f"context_dim must be >= 1, got {context_dim}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return checked


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """``value`` as a float; ValueError naming ``name`` unless finite and > 0 (or >= 0)."""
    try:
        v = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a number, got {value!r}") from err
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return v


def check_int(name: str, value: Any, *, minimum: int) -> int:
    """``value`` as an int; ValueError naming ``name`` unless an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def nearest(points: np.ndarray, a: np.ndarray) -> int:
    """Index of the row of ``points`` (n, d) closest to ``a`` (d,): how grid policies map an
    action back to its arm, so an action chosen elsewhere still credits the right arm."""
    d2 = np.einsum("nd,nd->n", points - a, points - a)  # (n,)
    return int(np.argmin(d2))


def argmax(scores: np.ndarray, rng: np.random.Generator) -> int:
    """Index of the largest score, ties broken uniformly at random with ``rng``."""
    best = np.flatnonzero(scores >= scores.max())
    return int(best[0] if len(best) == 1 else rng.choice(best))


__all__ = [
    "ActionSpace",
    "Box",
    "Policy",
    "PolicyFactory",
    "Simplex",
    "argmax",
    "check_action",
    "check_context",
    "check_feedback",
    "check_int",
    "check_positive",
    "check_reward",
    "check_setup",
    "check_type_rewards",
    "nearest",
]
