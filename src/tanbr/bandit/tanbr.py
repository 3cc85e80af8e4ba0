"""Tanbr: the tree-structured adaptive neural contextual bandit (the project's default).

Every slot the candidates are the representative points of the leaves of a binary partition of
the action space. A reward network scores them all in one batched forward pass for the slot's
context, and the policy plays the leaf with the highest optimistic score

    score(C) = psi . (f(a_C) + gamma * w(a_C)) + nu * diam(C)

(the per-type predictions and NeuralUCB widths weighted by the mix ``psi``, as in the paper,
and the cell term that bounds how much better an untried point of the cell can be under a
``nu``-Lipschitz reward). The reward network is the paper's: the action in, one reward per
task type out, learnt from per-type feedback when the slot has it (``head="scalar"`` restores
the former one-reward network of (context, action)). A played leaf splits once
its confidence width has fallen below its cell term (the data can no longer tell its points
apart), or after ``split_visits`` visits, so candidates get finer only where the policy keeps
playing, i.e. where the reward is high. Depth is capped at
``init_depth + ceil(n/2 * log2(t + 1))`` (n the intrinsic dimension), where the cells reach
the ``1/sqrt(t)`` statistical resolution: O(log T).

When the action space is the task simplex of the context's dimension, the tree partitions the
context-anchored chart (:mod:`tanbr.bandit.chart`) instead of the absolute simplex: its centre
is the plug-in merge, so the candidates crowd around it and the tree refines the correction.
Actions handed out and taken back are always absolute merges; the chart is recomputed from the
context, so no state is kept between ``select`` and ``update``.
See docs/algorithm.md for every formula.
"""

from __future__ import annotations

import math
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
    to_chart,
)
from tanbr.bandit.neural import RewardModel
from tanbr.bandit.partition import PartitionTree, split_to_depth
from tanbr.bandit.spaces import Box, Space

REPRESENTATIVES: tuple[str, ...] = ("center", "sample")
#: Tanbr's reward model (docs/algorithm.md, section 5), chosen on the tuning seeds and
#: families: the paper's network (the action in, one reward per task type out, scored by the
#: mix) trained with 8 Adam steps per slot. ``lam`` defaults to the width m (64): NeuralUCB's
#: lam = 1 in its normalisation ``g / sqrt(m)``.
DEFAULT_MODEL: dict[str, Any] = {
    "head": "per-type",
    "encoding": "sqrt",
    "prior": 0.0,
    "train_steps": 8,
}
#: Forced-exploration weight (``explore``), chosen on the tuning seeds and families at K = 2 to 8.
DEFAULT_EXPLORE = 0.2
#: Visits after which a played leaf splits (``split_visits``), chosen on the tuning seeds and
#: families: 4 on charts of two or more dimensions, 16 on a segment (K = 2), where cells that
#: split on visits alone fragment the data of the only direction there is.
DEFAULT_SPLIT_VISITS = 4
SEGMENT_SPLIT_VISITS = 16
#: The former default reward model in the relative chart (``tanbr@scalar`` in the bench).
SCALAR_MODEL: dict[str, Any] = {"head": "scalar", **ANCHORED_MODEL}


class Tanbr:
    """Tree-structured adaptive neural bandit over a ``Simplex`` or ``Box``.

    Parameters
    ----------
    space, context_dim, rng
        The action space, the length of the context, the only source of randomness.
    gamma
        Weight of the NeuralUCB width in the score, in NeuralUCB's normalisation
        (``lam = m``); the paper's 1 explored too much on the tuning seeds.
    nu
        Lipschitz constant of the cell term ``nu * diam(C)`` (reward per unit distance in the
        partitioned chart).
    init_depth
        The tree starts split uniformly to this depth. Default in the absolute chart
        ``max(6, n)``: at least 64 candidates, every direction cut at least once; in the
        relative chart 4 (16 cells around the plug-in merge). At most ``log2(max_leaves) - 1``.
    split_visits
        A played leaf splits after this many visits even if its width is still large.
        Default :data:`DEFAULT_SPLIT_VISITS`, :data:`SEGMENT_SPLIT_VISITS` on a
        one-dimensional chart.
    max_leaves
        Hard cap on the candidate set, which bounds the cost of ``select``.
    representative
        ``"center"`` plays the barycentre of the chosen leaf; ``"sample"`` scores and plays a
        fresh uniform point inside every leaf.
    chart
        ``"relative"`` partitions the context-anchored chart (default when the space is
        ``Simplex(K)`` and the context has length K), ``"absolute"`` the space itself (the
        only choice otherwise).
    floor
        The relative chart's ``w = x + floor``: keeps tasks absent from the mix reachable.
    explore
        Forced exploration: after ``t`` updates, ``select`` plays a leaf drawn uniformly with
        probability ``explore / (n * sqrt(t + 1))`` (``n`` the chart's dimension) instead of
        the best score. The network's width cannot see what it never tried where the gradient
        features of distant actions are nearly collinear, as on a one- or two-dimensional
        chart; there a learnt ramp hides an interior optimum for hundreds of slots. 0 turns
        it off.
    **model_params
        Reward-model settings (:class:`~tanbr.bandit.neural.RewardModel` and
        :class:`~tanbr.bandit.neural.RewardNet`): hidden, depth, lr, weight_decay, lam, bonus,
        train_steps, batch_size, refresh_every, encoding, prior. In the relative chart the
        defaults are :data:`DEFAULT_MODEL`, with ``lam`` equal to ``hidden``.
    """

    name = "tanbr"
    #: What a policy pickled before forced exploration existed reads (its state has no
    #: ``explore``); every new policy sets its own in ``__init__``.
    explore: float = 0.0

    def __init__(
        self,
        *,
        space: Space,
        context_dim: int,
        rng: np.random.Generator,
        gamma: float = 0.1,
        nu: float = 0.05,
        init_depth: int | None = None,
        split_visits: int | None = None,
        max_leaves: int = 512,
        representative: str = "center",
        chart: str | None = None,
        floor: float = DEFAULT_FLOOR,
        explore: float = DEFAULT_EXPLORE,
        **model_params: Any,
    ) -> None:
        self.space = check_setup(space, context_dim, rng)
        self.context_dim = int(context_dim)
        self.rng = rng
        anchored = is_anchored(self.space, self.context_dim)
        chart = ("relative" if anchored else "absolute") if chart is None else chart
        if chart not in CHARTS:
            raise ValueError(f"chart must be one of {CHARTS}, got {chart!r}")
        if chart == "relative" and not anchored:
            raise ValueError(
                "chart='relative' needs the action space Simplex(K) of the context's "
                f"dimension K={self.context_dim}, got {self.space}"
            )
        self.chart = chart
        relative = chart == "relative"
        self.floor = check_positive("floor", floor)
        self.gamma = check_positive("gamma", gamma, allow_zero=True)
        self.nu = check_positive("nu", nu, allow_zero=True)
        self.explore = check_positive("explore", explore, allow_zero=True)
        n = self.space.intrinsic_dim
        if split_visits is None:
            split_visits = SEGMENT_SPLIT_VISITS if n == 1 else DEFAULT_SPLIT_VISITS
        self.split_visits = check_int("split_visits", split_visits, minimum=1)
        self.max_leaves = check_int("max_leaves", max_leaves, minimum=2)
        room = int(math.log2(self.max_leaves)) - 1  # leave room to refine under the cap
        start = 4 if relative else max(6, n)
        depth = min(start, room) if init_depth is None else init_depth
        self.init_depth = check_int("init_depth", depth, minimum=0)
        if 2**self.init_depth > self.max_leaves:
            raise ValueError(
                f"init_depth {self.init_depth} makes {2**self.init_depth} leaves, more than "
                f"max_leaves={self.max_leaves}"
            )
        if representative not in REPRESENTATIVES:
            raise ValueError(
                f"representative must be one of {REPRESENTATIVES}, got {representative!r}"
            )
        self.representative = representative
        defaults = dict(DEFAULT_MODEL)
        if isinstance(self.space, Box):  # no simplex faces to stretch
            defaults["encoding"] = "action"
        model_params = {**defaults, **model_params}
        model_params.setdefault("lam", float(model_params.get("hidden", 64)))
        self.tree = PartitionTree(self.space)
        split_to_depth(self.tree, self.init_depth)
        self.model = RewardModel(
            space=self.space, context_dim=self.context_dim, rng=rng, **model_params
        )
        self.visits = np.zeros(self.tree.n_nodes, dtype=np.int64)
        self.n_updates = 0

    # --- the policy -----------------------------------------------------------------------

    def select(self, context: np.ndarray) -> np.ndarray:
        x = check_context(context, self.context_dim)
        w = self._weights(x)
        leaves = self.tree.leaves()  # (N,)
        points = self._representatives(leaves)  # (N, dim) in the chart
        actions = points if w is None else to_action(w, points)  # (N, dim) in the space
        mean, width = self.model.predict(x, actions)  # (N,), (N,)
        score = mean + self.gamma * width + self.nu * self.tree.diameters[leaves]
        if self.explore > 0 and self.rng.random() < self.explore_probability():
            return np.array(actions[self.rng.integers(len(actions))])
        return np.array(actions[argmax(score, self.rng)])

    def explore_probability(self) -> float:
        """Chance that the next ``select`` plays a uniformly drawn leaf (see ``explore``)."""
        n = max(1, self.space.intrinsic_dim)
        return min(1.0, self.explore / (n * math.sqrt(self.n_updates + 1)))

    def update(
        self,
        context: np.ndarray,
        action: np.ndarray,
        reward: float,
        *,
        type_rewards: np.ndarray | None = None,
    ) -> None:
        x = check_context(context, self.context_dim)
        w = self._weights(x)
        a = check_action(action, self.space)
        r, per_type = check_feedback(reward, type_rewards, self.context_dim)
        self.model.learn(x, a, r, per_type)
        self.n_updates += 1
        node = self._node_of(a if w is None else to_chart(w, a))
        self.visits[node] += 1
        self._maybe_split(node, x, w)

    # --- the chart ------------------------------------------------------------------------

    def _weights(self, x: np.ndarray) -> np.ndarray | None:
        """The chart's anchor ``w`` for a context, or None for the absolute chart."""
        return None if self.chart == "absolute" else anchor_weights(x, self.floor)

    # --- refinement -----------------------------------------------------------------------

    def max_depth(self) -> int:
        """Depth cap after the updates so far: where cells reach ``1/sqrt(t)`` resolution."""
        n = self.space.intrinsic_dim
        return self.init_depth + math.ceil(n / 2 * math.log2(self.n_updates + 1))

    def _maybe_split(self, node: int, x: np.ndarray, w: np.ndarray | None) -> None:
        tree = self.tree
        if not tree.is_leaf(node) or tree.n_leaves >= self.max_leaves:
            return
        if tree.depth(node) >= self.max_depth():
            return
        if self.visits[node] < self.split_visits:
            center = tree.centers[node][None, :]  # (1, dim) in the chart
            _, width = self.model.predict(x, center if w is None else to_action(w, center))
            if self.gamma * float(width[0]) > self.nu * tree.diameter(node):
                return
        tree.split(node)
        self.visits = np.concatenate([self.visits, np.zeros(2, dtype=np.int64)])

    def _node_of(self, a: np.ndarray) -> int:
        """The node an action was played at: the one whose centre it is, else its leaf.

        A centre lies on the cut of its own cell, so once that cell has split (feedback may
        arrive late) the centre is matched here rather than credited to a child.
        """
        path = self.tree.path(a)
        if self.representative == "center":
            centers = self.tree.centers
            for node in path:
                if np.max(np.abs(centers[node] - a)) <= 1e-9:
                    return node
        return path[-1]

    def _representatives(self, leaves: np.ndarray) -> np.ndarray:
        if self.representative == "center":
            return np.array(self.tree.centers[leaves])
        return self.tree.sample(leaves, self.rng)

    @property
    def n_leaves(self) -> int:
        return self.tree.n_leaves
