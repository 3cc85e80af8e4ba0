"""The context-anchored chart of the task simplex: actions as re-weightings of the mix.

When the action space is ``Simplex(K)`` and the context is a K-mix ``x``, the context is
already a good action (the plug-in merge). The chart describes an action ``b`` by the
*relative* point ``r`` of the same simplex that re-weights the mix:

    b = normalize(w * r),        w = normalize(x) + floor          (elementwise)
    r = normalize(b / w)                                           (the inverse)

The centre ``r = 1/K`` maps to ``b ~ x`` (the plug-in merge), the vertices map to the
vertices (the single-task merges), and the map is a bijection of the simplex onto itself for
every context. It is a projective map, so straight segments stay straight and a simplex cell
of the chart maps onto the simplex spanned by its mapped vertices. ``floor > 0`` keeps every
task reachable when the mix gives it no weight.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tanbr.bandit.base import check_positive
from tanbr.bandit.spaces import Simplex, Space, SparseSimplex

CHARTS: tuple[str, ...] = ("relative", "absolute")
DEFAULT_FLOOR = 0.02
#: The reward model in the relative chart: the anchor's other two parts (inputs that hold the
#: step ``a - x`` away from the plug-in merge, and the prior mean ``-3 |a - x|^2``), with the
#: training steps they were measured with (docs/algorithm.md, section 5).
ANCHORED_MODEL: dict[str, Any] = {"encoding": "offset", "prior": 3.0, "train_steps": 8}


def is_anchored(space: Space, context_dim: int) -> bool:
    """Whether actions live on the task simplex of the context (``Simplex(K)``, K-mix context):
    the only case where the context is itself an action, the plug-in merge."""
    return isinstance(space, Simplex | SparseSimplex) and space.dim == context_dim


def anchor_weights(context: np.ndarray, floor: float) -> np.ndarray:
    """``w = normalize(max(x, 0)) + floor`` for a mix ``x`` (K,), shape (K,).

    Raises ValueError unless the context is a mix (weights >= 0, positive sum); small
    negative estimation noise is clipped.
    """
    x = np.asarray(context, dtype=float)
    if np.any(x < -1e-6) or float(np.clip(x, 0.0, None).sum()) <= 0.0:
        raise ValueError(f"the relative chart needs a context that is a mix, got {x.tolist()}")
    p = np.clip(x, 0.0, None)
    return np.asarray(p / p.sum() + check_positive("floor", floor))


def to_action(weights: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Chart points ``r`` (N, K) to actions ``normalize(w * r)``, shape (N, K)."""
    b = np.asarray(points, dtype=float) * weights  # (N, K)
    return np.asarray(b / b.sum(axis=-1, keepdims=True))


def to_chart(weights: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """Actions ``b`` (..., K) back to chart points ``normalize(b / w)``, same shape."""
    r = np.asarray(actions, dtype=float) / weights  # (..., K)
    return np.asarray(r / r.sum(axis=-1, keepdims=True))
