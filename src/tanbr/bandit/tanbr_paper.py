"""``tanbr-paper``: the paper's tree-structured neural bandit, point by point.

* **Action.** One coefficient per expert, summing to 1, at most B non-zero
  (:class:`~tanbr.bandit.spaces.SparseSimplex`; B = 8 in the paper). The same x merges every
  MoE layer.
* **Tree.** An infinite binary covering tree over the feasible x: the longest-edge bisection
  of the simplex (:class:`~tanbr.bandit.partition.PartitionTree`), grown from the root. A
  leaf is *live* when it holds a feasible point, i.e. when one of its vertices has at most B
  non-zero entries (a point of a cell is a convex combination of its vertices, whose supports
  add up). Each live leaf yields one feasible representative, found by optimisation inside
  the leaf. A leaf splits once its selection count reaches ``tau_h = ceil(c * rho^(-2h))``.
* **Network.** Input x, output a V-vector (one predicted reward per task type), width 64,
  depth 2; per-type UCB vectors from accumulated last-layer gradient outer products
  (lambda = 1, exploration coefficient 1) (:mod:`~tanbr.bandit.type_model`).
* **Decision.** Score of a leaf = ``psi . U(x_C)``; the best leaf's representative is played.
* **Update.** J gradient steps on the observed (per-type) rewards, then the leaf's count,
  the split rule, the representatives' optimisation and the UCB vectors of every candidate.

Everything that costs more than one product is done in ``update``; ``select`` is a
``(N, V) @ (V,)`` product and an argmax. See docs/algorithm.md, section 10, for every choice
where the paper is silent.
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
from tanbr.bandit.partition import PartitionTree
from tanbr.bandit.spaces import Simplex, SparseSimplex
from tanbr.bandit.type_model import TypeRewardModel, mix_of

PAPER_MAX_NONZERO = 8


def feasible_space(space: Any, max_nonzero: int | None) -> tuple[Simplex | SparseSimplex, int]:
    """The merges a sparse policy may play, and B, from its space and ``max_nonzero``.

    ``Simplex(K)`` with ``max_nonzero=None`` means the paper's B = 8 (the plain simplex when
    K <= 8); a ``SparseSimplex`` carries its own B.
    """
    if isinstance(space, SparseSimplex):
        if max_nonzero is not None and max_nonzero != space.max_nonzero:
            raise ValueError(
                f"max_nonzero={max_nonzero} contradicts the space's cap {space.max_nonzero}"
            )
        return space, space.max_nonzero
    if not isinstance(space, Simplex):
        raise ValueError(
            f"this policy acts on merge coefficients (a Simplex or SparseSimplex), got {space}"
        )
    b = PAPER_MAX_NONZERO if max_nonzero is None else check_int("max_nonzero", max_nonzero,
                                                                minimum=1)  # fmt: skip
    return (space if b >= space.dim else SparseSimplex(space.dim, b)), min(b, space.dim)


def sample_in_cells(
    vertices: np.ndarray, max_nonzero: int, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` feasible points inside each simplex cell: (C, n, K) points and (C,) liveness.

    A point of a cell is ``sum_i lam_i v_i``; its support is the union of the supports of the
    vertices with ``lam_i > 0``. So a random feasible point is: visit the cell's vertices in
    random order, keep a vertex when the union of supports stays within B, and put random
    (Dirichlet(1)) weights on the kept ones. A cell with no vertex of support <= B holds no
    feasible point (not live); its rows are NaN.
    """
    c, k, dim = vertices.shape
    support = vertices > 0.0  # (C, k, dim)
    rows = np.repeat(np.arange(c), n)  # (S,)
    if max_nonzero >= dim:
        chosen = np.ones((len(rows), k), dtype=bool)
        live = np.ones(c, dtype=bool)
    else:
        live = np.any(support.sum(axis=2) <= max_nonzero, axis=1)  # (C,)
        order = np.argsort(rng.random((len(rows), k)), axis=1)  # (S, k)
        union = np.zeros((len(rows), dim), dtype=bool)
        chosen = np.zeros((len(rows), k), dtype=bool)
        for pos in range(k):
            i = order[:, pos]
            grown = union | support[rows, i]  # (S, dim)
            take = grown.sum(axis=1) <= max_nonzero
            union = np.where(take[:, None], grown, union)
            chosen[np.arange(len(rows)), i] = take
    weights = np.where(chosen, rng.exponential(size=chosen.shape), 0.0)  # Dirichlet(1)
    total = weights.sum(axis=1, keepdims=True)
    weights = np.divide(weights, total, out=np.full_like(weights, np.nan), where=total > 0)
    points = np.einsum("sk,skd->sd", weights, vertices[rows])  # (S, dim)
    return points.reshape(c, n, dim), live


class TanbrPaper:
    """The paper's Tanbr: covering tree over B-sparse merges, V-output NeuralUCB, psi scoring.

    Parameters
    ----------
    space, context_dim, rng
        ``Simplex(K)`` or ``SparseSimplex(K, B)`` merges, V = ``context_dim`` task types, the
        only source of randomness.
    max_nonzero
        B for a ``Simplex`` space (default the paper's 8; B >= K is the plain simplex).
    rho, split_scale
        The split threshold ``tau_h = ceil(split_scale * rho^(-2h))``. Default ``rho`` is
        the rate at which bisection shrinks the cells of the K-simplex, ``2^(-1/(K-1))``,
        clipped to the paper's range [0.3, 0.9].
    gamma, lam, train_steps
        NeuralUCB's exploration coefficient and prior precision (the paper's 1 and 1), and J.
    samples
        Sampled feasible points per leaf in each optimisation of its representative.
    refine
        Leaves (besides the played one and its children) whose representative is
        re-optimised after every update, in round-robin order.
    ema
        Rate of the running mix ``psi_bar`` the representatives are optimised for.
    max_leaves
        Cap on the live leaves, which bounds the cost of ``update``.
    **net_params
        hidden, depth, lr, weight_decay, batch_size, refresh_every (the network's).
    """

    name = "tanbr-paper"

    def __init__(
        self,
        *,
        space: Simplex | SparseSimplex,
        context_dim: int,
        rng: np.random.Generator,
        max_nonzero: int | None = None,
        rho: float | None = None,
        split_scale: float = 0.1,
        gamma: float = 1.0,
        lam: float = 1.0,
        train_steps: int = 8,
        samples: int = 4,
        refine: int = 16,
        ema: float = 0.1,
        max_leaves: int = 1024,
        **net_params: Any,
    ) -> None:
        self.space = check_setup(space, context_dim, rng, sparse=True)
        self.feasible, self.max_nonzero = feasible_space(self.space, max_nonzero)
        self.context_dim = int(context_dim)
        self.rng = rng
        k = self.feasible.dim
        default_rho = min(0.9, max(0.3, 2.0 ** (-1.0 / max(k - 1, 1))))
        self.rho = check_positive("rho", default_rho if rho is None else rho)
        if self.rho >= 1.0:
            raise ValueError(f"rho must be in (0, 1), got {self.rho}")
        self.split_scale = check_positive("split_scale", split_scale)
        self.samples = check_int("samples", samples, minimum=1)
        self.refine = check_int("refine", refine, minimum=0)
        self.ema = check_positive("ema", ema)
        if self.ema > 1.0:
            raise ValueError(f"ema must be in (0, 1], got {self.ema}")
        self.max_leaves = check_int("max_leaves", max_leaves, minimum=1)
        self.model = TypeRewardModel(
            space=Simplex(k), types=self.context_dim, rng=rng, gamma=gamma, lam=lam,
            train_steps=train_steps, **net_params,
        )  # fmt: skip
        self.tree = PartitionTree(Simplex(k))
        self.counts = np.zeros(1, dtype=np.int64)
        self.psi_bar = np.full(self.context_dim, 1.0 / self.context_dim)
        self.n_updates = 0
        self._cursor = 0
        # The candidates: live leaves, their representatives and UCB vectors, aligned rows.
        self.nodes = np.zeros(0, dtype=np.int64)
        self.reps = np.zeros((0, k))
        self._add_leaves([0], inherit=None)
        self._refresh_ucb()

    # --- the policy -----------------------------------------------------------------------

    def select(self, context: np.ndarray) -> np.ndarray:
        psi = mix_of(check_context(context, self.context_dim))
        return np.array(self.reps[argmax(self.ucb @ psi, self.rng)])

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
        self.n_updates += 1
        self.psi_bar = (1.0 - self.ema) * self.psi_bar + self.ema * mix_of(x)
        node = self.node_of(a)
        self.counts[node] += 1
        touched: list[int] = []
        if self._should_split(node):
            touched = self._split(node)
        elif node in self._row:
            touched = [node]
        self._optimise([*touched, *self._round_robin()])
        self._refresh_ucb()

    # --- the tree -------------------------------------------------------------------------

    def threshold(self, depth: int) -> int:
        """``tau_h = ceil(c * rho^(-2h))``: selections before a leaf at depth h splits."""
        return math.ceil(self.split_scale * self.rho ** (-2 * depth) - 1e-9)

    def node_of(self, a: np.ndarray) -> int:
        """The leaf an action was played at: the live leaf whose representative it is, else
        the leaf that contains it (a late update after the representative moved on)."""
        hit = np.flatnonzero(np.all(np.abs(self.reps - a) <= 1e-12, axis=1))
        if len(hit):
            return int(self.nodes[hit[0]])
        return self.tree.locate(a)

    def _should_split(self, node: int) -> bool:
        return (
            node in self._row
            and self.counts[node] >= self.threshold(self.tree.depth(node))
            and len(self.nodes) < self.max_leaves
        )

    def _split(self, node: int) -> list[int]:
        """Split a live leaf; the child holding its representative keeps it. Returns the
        live children."""
        row = self._row[node]
        rep = self.reps[row]
        keep = np.ones(len(self.nodes), dtype=bool)
        keep[row] = False
        self.nodes, self.reps = self.nodes[keep], self.reps[keep]
        children = list(self.tree.split(node))
        self.counts = np.concatenate([self.counts, np.zeros(2, dtype=np.int64)])
        return self._add_leaves(children, inherit=rep)

    def _add_leaves(self, nodes: list[int], *, inherit: np.ndarray | None) -> list[int]:
        """Give new leaves a representative (inherited, else sampled); drop dead ones."""
        vertices = np.stack([self.tree.vertices(n) for n in nodes])  # (C, K, K)
        points, live = sample_in_cells(vertices, self.max_nonzero, self.samples, self.rng)
        kept: list[int] = []
        inherited = False
        for i, n in enumerate(nodes):
            if not live[i]:
                continue
            if inherit is not None and not inherited and self.tree.contains(n, inherit):
                rep, inherited = inherit, True
            else:
                rep = points[i, 0]
            self.nodes = np.append(self.nodes, n)
            self.reps = np.concatenate([self.reps, rep[None, :]])
            kept.append(n)
        self._row = {int(n): i for i, n in enumerate(self.nodes)}
        return kept

    # --- the representatives --------------------------------------------------------------

    def _round_robin(self) -> list[int]:
        n = len(self.nodes)
        if not n or not self.refine:
            return []
        picks = (self._cursor + np.arange(min(self.refine, n))) % n
        self._cursor = int((self._cursor + len(picks)) % n)
        return [int(self.nodes[i]) for i in picks]

    def _optimise(self, nodes: list[int]) -> None:
        """Best-of-sampled optimisation of the leaves' representatives on ``psi_bar . U``.

        The current representative competes with ``samples`` fresh feasible points of its
        cell, so the score under the current network never goes down.
        """
        nodes = list(dict.fromkeys(n for n in nodes if n in self._row))
        if not nodes:
            return
        rows = np.array([self._row[n] for n in nodes])
        vertices = np.stack([self.tree.vertices(n) for n in nodes])
        points, _ = sample_in_cells(vertices, self.max_nonzero, self.samples, self.rng)
        cands = np.concatenate([self.reps[rows][:, None, :], points], axis=1)  # (C, 1+M, K)
        flat = cands.reshape(-1, cands.shape[-1])
        ok = np.all(np.isfinite(flat), axis=1)
        score = np.full(len(flat), -np.inf)
        score[ok] = self.model.ucb(flat[ok]) @ self.psi_bar
        best = np.argmax(score.reshape(len(nodes), -1), axis=1)
        self.reps[rows] = cands[np.arange(len(nodes)), best]

    def _refresh_ucb(self) -> None:
        """UCB vectors of every candidate under the current network: what select scores."""
        self.ucb = self.model.ucb(self.reps)  # (N, V)

    @property
    def n_leaves(self) -> int:
        """Live leaves: the candidates."""
        return len(self.nodes)
