"""HOO: hierarchical optimistic optimisation (Bubeck, Munos, Stoltz and Szepesvari, JMLR 2011).

A tree, no network, no context. Every node ``(h, i)`` keeps its visit count ``T`` and mean
reward ``mu`` over the plays that went through it, and

    U = mu + sqrt(2 log n / T) + nu * rho^h        (U = +inf while T = 0)
    B = min(U, max(B_left, B_right))               (B = U at a leaf)

A slot descends from the root along the larger ``B`` and plays the centre of the leaf it
reaches; the update credits every node on the path to the played node and expands it. As in
PyXAB's truncated HOO, a node deeper than ``ceil((log(n) / 2 - log(1 / nu)) / log(1 / rho))``
is no longer expanded; ``n`` is the horizon when given, else the number of updates so far
(the anytime variant).
"""

from __future__ import annotations

import math

import numpy as np

from tanbr.bandit.base import (
    check_action,
    check_context,
    check_feedback,
    check_int,
    check_positive,
    check_setup,
)
from tanbr.bandit.partition import PartitionTree
from tanbr.bandit.spaces import Space


class HOO:
    """Hierarchical optimistic optimisation on the binary partition of the space.

    Parameters
    ----------
    nu, rho
        Smoothness: a cell at depth ``h`` varies by at most ``nu * rho^h``. Defaults: ``nu = 1``
        and ``rho = 2^(-1/n)`` (n the intrinsic dimension), the rate at which bisection halves
        diameters; on ``[0, 1]`` these are PyXAB's defaults.
    horizon
        Total number of slots if known (enters ``log n`` and the truncation depth).
    """

    name = "hoo"

    def __init__(
        self,
        *,
        space: Space,
        context_dim: int,
        rng: np.random.Generator,
        nu: float = 1.0,
        rho: float | None = None,
        horizon: int | None = None,
    ) -> None:
        self.space = check_setup(space, context_dim, rng)
        self.context_dim = int(context_dim)
        self.rng = rng
        self.nu = check_positive("nu", nu)
        n = self.space.intrinsic_dim
        self.rho = check_positive("rho", 2.0 ** (-1.0 / n) if rho is None else rho)
        if self.rho >= 1.0:
            raise ValueError(f"rho must be in (0, 1), got {self.rho}")
        self.horizon = None if horizon is None else check_int("horizon", horizon, minimum=1)
        self.tree = PartitionTree(self.space)
        self.tree.split(0)  # PyXAB expands the root at construction
        self.counts = np.zeros(self.tree.n_nodes)
        self.sums = np.zeros(self.tree.n_nodes)
        self.b_values = np.full(self.tree.n_nodes, np.inf)
        self.n_updates = 0

    def select(self, context: np.ndarray) -> np.ndarray:
        check_context(context, self.context_dim)
        node = 0
        while (kids := self.tree.children(node)) is not None:
            b = self.b_values[list(kids)]
            tie = b[0] == b[1]  # ties (both unvisited, say) are broken at random
            node = kids[int(self.rng.integers(2)) if tie else int(np.argmax(b))]
        return self.tree.center(node)

    def update(
        self,
        context: np.ndarray,
        action: np.ndarray,
        reward: float,
        *,
        type_rewards: np.ndarray | None = None,
    ) -> None:
        check_context(context, self.context_dim)
        a = check_action(action, self.space)
        r = check_feedback(reward, type_rewards, self.context_dim)[0]
        path = self._path_to(a)
        self.counts[path] += 1.0
        self.sums[path] += r
        self.n_updates += 1
        node = path[-1]
        if self.tree.is_leaf(node) and self.tree.depth(node) <= self._max_depth():
            self.tree.split(node)
            self.counts = np.append(self.counts, [0.0, 0.0])
            self.sums = np.append(self.sums, [0.0, 0.0])
        self._refresh_b()

    def _log_n(self) -> float:
        return math.log(self.horizon if self.horizon is not None else max(self.n_updates, 1))

    def _max_depth(self) -> int:
        return math.ceil((self._log_n() / 2.0 - math.log(1.0 / self.nu)) / math.log(1.0 / self.rho))

    def _path_to(self, a: np.ndarray) -> list[int]:
        """Root-to-node path of the node whose centre ``a`` is (else down to ``a``'s leaf)."""
        path = self.tree.path(a)
        centers = self.tree.centers
        for i, node in enumerate(path):
            if np.max(np.abs(centers[node] - a)) <= 1e-12:
                return path[: i + 1]
        return path

    def _refresh_b(self) -> None:
        """Recompute every U and B bottom-up, one vectorised pass per depth."""
        tree = self.tree
        depths = tree.depths
        with np.errstate(divide="ignore", invalid="ignore"):
            u = np.where(
                self.counts > 0,
                self.sums / self.counts
                + np.sqrt(2.0 * self._log_n() / self.counts)
                + self.nu * self.rho**depths,
                np.inf,
            )
        b = u.copy()
        kids = tree.child_ids  # (n, 2)
        for h in range(int(depths.max()), -1, -1):
            nodes = np.flatnonzero((depths == h) & (kids[:, 0] >= 0))
            if len(nodes):
                best_child = np.maximum(b[kids[nodes, 0]], b[kids[nodes, 1]])
                b[nodes] = np.minimum(u[nodes], best_child)
        self.b_values = b
