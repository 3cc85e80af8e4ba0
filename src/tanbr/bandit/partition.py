"""Binary partition tree of an action space: pure geometry, no statistics.

The root cell is the whole space. Splitting a cell makes two children that tile it exactly:

* a simplex cell (K vertices in R^K) is bisected on its longest edge ``(v_i, v_j)``: the
  midpoint replaces ``v_j`` in one child and ``v_i`` in the other, so each child has exactly half
  the parent's volume and diameters shrink geometrically with depth;
* a box cell is halved on its longest side.

Policies keep their own per-node statistics keyed by node id; node ids are dense integers in
creation order and never change, and the root is node 0.
"""

from __future__ import annotations

import numpy as np

from tanbr.bandit.spaces import ATOL, Box, Simplex, Space, SparseSimplex, check_space


class PartitionTree:
    """A growing binary partition of a ``Simplex`` or ``Box``.

    Examples
    --------
    >>> tree = PartitionTree(Simplex(3))
    >>> left, right = tree.split(0)
    >>> tree.leaves().tolist(), float(tree.volume(left) + tree.volume(right))
    ([1, 2], 1.0)
    """

    def __init__(self, space: Space) -> None:
        checked = check_space(space)
        # A sparse simplex is covered by the tree of its hull; policies keep their candidates
        # feasible themselves (see tanbr_paper.py).
        self.space: Simplex | Box = checked.hull if isinstance(checked, SparseSimplex) else checked
        self.dim: int = self.space.dim
        self._n = 0
        cap = 64
        self._parent = np.full(cap, -1, dtype=np.int64)
        self._children = np.full((cap, 2), -1, dtype=np.int64)
        self._depth = np.zeros(cap, dtype=np.int64)
        self._centers = np.zeros((cap, self.dim))
        self._diameters = np.zeros(cap)
        self._volumes = np.zeros(cap)
        # Split of each internal node: simplex (i, j) vertex indices; box (axis, -1).
        self._split = np.full((cap, 2), -1, dtype=np.int64)
        self._split_value = np.zeros(cap)  # box: the cut coordinate
        # Cell shapes: simplex vertices (K, K) and their inverse; box (2, d) low/high rows.
        if isinstance(self.space, Simplex):
            root = self.space.vertices()
        else:
            root = np.stack([np.asarray(self.space.low), np.asarray(self.space.high)])
        self._cells = np.zeros((cap, *root.shape))
        self._inverses: list[np.ndarray] = []
        self._root_measure = self._measure(root)
        self._add(root, parent=-1, depth=0)

    # --- queries -------------------------------------------------------------------------

    @property
    def n_nodes(self) -> int:
        return self._n

    def leaves(self) -> np.ndarray:
        """Ids of the current leaves, ascending, shape (n_leaves,)."""
        return np.flatnonzero(self._children[: self._n, 0] < 0)

    @property
    def n_leaves(self) -> int:
        return int(np.count_nonzero(self._children[: self._n, 0] < 0))

    def is_leaf(self, node: int) -> bool:
        return bool(self._children[self._check(node), 0] < 0)

    def children(self, node: int) -> tuple[int, int] | None:
        left, right = self._children[self._check(node)]
        return None if left < 0 else (int(left), int(right))

    def parent(self, node: int) -> int | None:
        p = int(self._parent[self._check(node)])
        return None if p < 0 else p

    def depth(self, node: int) -> int:
        return int(self._depth[self._check(node)])

    def center(self, node: int) -> np.ndarray:
        """The cell's barycentre (a copy)."""
        return np.array(self._centers[self._check(node)])

    def diameter(self, node: int) -> float:
        """Longest distance inside the cell (longest edge of a simplex, diagonal of a box)."""
        return float(self._diameters[self._check(node)])

    def volume(self, node: int) -> float:
        """Volume relative to the whole space (the root has volume 1)."""
        return float(self._volumes[self._check(node)])

    @property
    def centers(self) -> np.ndarray:
        """Barycentres of all nodes, indexed by node id, shape (n_nodes, dim); read-only view."""
        view = self._centers[: self._n]
        view.flags.writeable = False
        return view

    @property
    def depths(self) -> np.ndarray:
        view = self._depth[: self._n]
        view.flags.writeable = False
        return view

    @property
    def child_ids(self) -> np.ndarray:
        """Children of every node, shape (n_nodes, 2), ``-1`` for leaves; read-only view."""
        view = self._children[: self._n]
        view.flags.writeable = False
        return view

    @property
    def diameters(self) -> np.ndarray:
        view = self._diameters[: self._n]
        view.flags.writeable = False
        return view

    def vertices(self, node: int) -> np.ndarray:
        """Simplex cells: the vertices, one per row, shape (K, K). Box cells: ``[low; high]``."""
        return np.array(self._cells[self._check(node)])

    def contains(self, node: int, point: np.ndarray) -> bool:
        """Whether the closed cell contains ``point`` (with float slack)."""
        cell = self._cells[self._check(node)]
        p = np.asarray(point, dtype=float)
        if isinstance(self.space, Simplex):
            lam = p @ self._inverses[node]  # barycentric coordinates, (K,)
            return bool(np.all(lam >= -ATOL))
        lo, hi = cell
        slack = ATOL * (hi - lo)
        return bool(np.all(p >= lo - slack) and np.all(p <= hi + slack))

    def path(self, point: np.ndarray) -> list[int]:
        """Node ids from the root to the leaf containing ``point``.

        A point on a cut goes to the first child, so every point has exactly one path.
        """
        p = np.asarray(point, dtype=float)
        if p.shape != (self.dim,) or not self.space.contains(p):
            raise ValueError(f"point {p.tolist()} is not in the space {self.space}")
        node = 0
        out = [0]
        while self._children[node, 0] >= 0:
            node = int(self._children[node, self._side(node, p)])
            out.append(node)
        return out

    def locate(self, point: np.ndarray) -> int:
        """The leaf containing ``point``."""
        return self.path(point)[-1]

    def sample(self, nodes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One point uniform inside each cell of ``nodes`` (N,), shape (N, dim)."""
        nodes = np.asarray(nodes, dtype=np.int64)
        if nodes.size and (nodes.min() < 0 or nodes.max() >= self._n):
            raise ValueError(f"nodes must be in [0, {self._n}), got {nodes.tolist()}")
        cells = self._cells[nodes]  # (N, K, K) vertices or (N, 2, d) bounds
        if isinstance(self.space, Simplex):
            w = rng.dirichlet(np.ones(self.dim), size=len(nodes))  # (N, K) barycentric
            return np.asarray(np.einsum("nk,nkd->nd", w, cells))
        u = rng.random((len(nodes), self.dim))  # (N, d)
        return np.asarray(cells[:, 0] + u * (cells[:, 1] - cells[:, 0]))

    # --- growth --------------------------------------------------------------------------

    def split(self, node: int) -> tuple[int, int]:
        """Split a leaf in two; returns the children's ids."""
        if not self.is_leaf(node):
            raise ValueError(f"node {node} is already split")
        cell = self._cells[node]
        if isinstance(self.space, Simplex):
            i, j = self._longest_edge(cell)
            mid = (cell[i] + cell[j]) / 2.0
            first, second = cell.copy(), cell.copy()
            first[j] = mid  # keeps v_i: the half where barycentric lam_i >= lam_j
            second[i] = mid
            self._split[node] = (i, j)
        else:
            lo, hi = cell
            axis = int(np.argmax(hi - lo))  # first of the longest sides
            cut = (lo[axis] + hi[axis]) / 2.0
            first, second = cell.copy(), cell.copy()
            first[1, axis] = cut
            second[0, axis] = cut
            self._split[node] = (axis, -1)
            self._split_value[node] = cut
        depth = int(self._depth[node]) + 1
        left = self._add(first, parent=node, depth=depth)
        right = self._add(second, parent=node, depth=depth)
        self._children[node] = (left, right)
        return left, right

    # --- internals -----------------------------------------------------------------------

    def _check(self, node: int) -> int:
        if not 0 <= node < self._n:
            raise ValueError(f"no node {node} (the tree has {self._n})")
        return int(node)

    def _side(self, node: int, p: np.ndarray) -> int:
        """0 if ``p`` lies in the first child of ``node`` (ties included), else 1."""
        a, b = self._split[node]
        if isinstance(self.space, Simplex):
            inv = self._inverses[node]
            lam_i, lam_j = p @ inv[:, a], p @ inv[:, b]
            return 0 if lam_i >= lam_j else 1
        return 0 if p[a] <= self._split_value[node] else 1

    @staticmethod
    def _longest_edge(v: np.ndarray) -> tuple[int, int]:
        """First (i, j), i < j, of the longest edges: deterministic under float ties."""
        diff = v[:, None, :] - v[None, :, :]
        lengths = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))  # (K, K)
        iu, ju = np.triu_indices(len(v), k=1)
        edge = lengths[iu, ju]
        best = int(np.flatnonzero(edge >= edge.max() * (1.0 - 1e-12))[0])
        return int(iu[best]), int(ju[best])

    def _measure(self, cell: np.ndarray) -> float:
        if isinstance(self.space, Simplex):
            # Every cell lies in the hyperplane sum = 1, so |det| is proportional to volume.
            return float(abs(np.linalg.det(cell)))
        return float(np.prod(cell[1] - cell[0]))

    def _diameter_of(self, cell: np.ndarray) -> float:
        if isinstance(self.space, Simplex):
            i, j = self._longest_edge(cell)
            return float(np.linalg.norm(cell[i] - cell[j]))
        return float(np.linalg.norm(cell[1] - cell[0]))

    def _add(self, cell: np.ndarray, *, parent: int, depth: int) -> int:
        node = self._n
        if node == len(self._parent):
            self._grow()
        self._parent[node] = parent
        self._depth[node] = depth
        self._cells[node] = cell
        if isinstance(self.space, Simplex):
            self._inverses.append(np.linalg.inv(cell))
            self._centers[node] = cell.mean(axis=0)
        else:
            self._centers[node] = cell.mean(axis=0)
        self._diameters[node] = self._diameter_of(cell)
        self._volumes[node] = self._measure(cell) / self._root_measure if node else 1.0
        self._n += 1
        return node

    def _grow(self) -> None:
        cap = 2 * len(self._parent)

        def grown(a: np.ndarray, fill: float) -> np.ndarray:
            out = np.full((cap, *a.shape[1:]), fill, dtype=a.dtype)
            out[: len(a)] = a
            return out

        self._parent = grown(self._parent, -1)
        self._children = grown(self._children, -1)
        self._depth = grown(self._depth, 0)
        self._centers = grown(self._centers, 0.0)
        self._diameters = grown(self._diameters, 0.0)
        self._volumes = grown(self._volumes, 0.0)
        self._split = grown(self._split, -1)
        self._split_value = grown(self._split_value, 0.0)
        self._cells = grown(self._cells, 0.0)


def split_to_depth(tree: PartitionTree, depth: int) -> None:
    """Split every leaf shallower than ``depth`` (a uniform start for the policies)."""
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    frontier = [int(n) for n in tree.leaves() if tree.depth(int(n)) < depth]
    while frontier:
        node = frontier.pop()
        for child in tree.split(node):
            if tree.depth(child) < depth:
                frontier.append(child)


__all__ = ["Box", "PartitionTree", "Simplex", "split_to_depth"]
