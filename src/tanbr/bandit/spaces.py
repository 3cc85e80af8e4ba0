"""Action spaces of the policies: the probability simplex, its sparse subset, and the box.

The real system acts on ``Simplex(K)``, "how much each task's experts count", so actions are
mixes of the K task types. ``SparseSimplex(K, B)`` is the paper's feasible set of merge
coefficients: one per expert, summing to 1, at most B of them non-zero (a resource cap).
``Box`` serves a direct parameterization and the cross-check against PyXAB, whose algorithms
work on boxes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

#: Slack for membership tests: cell centres and midpoints are sums of floats.
ATOL = 1e-9


@runtime_checkable
class ActionSpace(Protocol):
    """Where actions live: ``Simplex(dim)`` or ``Box(low, high)``."""

    @property
    def dim(self) -> int: ...

    def contains(self, a: np.ndarray) -> bool: ...

    def center(self) -> np.ndarray: ...

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray: ...


@dataclass(frozen=True)
class Simplex:
    """The probability simplex ``{a in R^dim : a >= 0, sum(a) = 1}`` (intrinsic dim ``dim - 1``).

    Examples
    --------
    >>> s = Simplex(3)
    >>> s.center().round(3).tolist()
    [0.333, 0.333, 0.333]
    >>> s.contains(np.array([0.5, 0.5, 0.0]))
    True
    """

    dim: int

    def __post_init__(self) -> None:
        if isinstance(self.dim, bool) or not isinstance(self.dim, int | np.integer):
            raise ValueError(f"Simplex dim must be an int, got {self.dim!r}")
        if self.dim < 2:
            raise ValueError(f"Simplex dim must be >= 2, got {self.dim}")
        object.__setattr__(self, "dim", int(self.dim))

    @property
    def intrinsic_dim(self) -> int:
        """Degrees of freedom: the simplex is a (dim-1)-dimensional polytope."""
        return self.dim - 1

    @property
    def diameter(self) -> float:
        """Longest distance between two points: an edge, ``sqrt(2)``."""
        return math.sqrt(2.0)

    def contains(self, a: np.ndarray) -> bool:
        a = np.asarray(a, dtype=float)
        return bool(
            a.shape == (self.dim,)
            and np.all(np.isfinite(a))
            and np.all(a >= -ATOL)
            and abs(float(a.sum()) - 1.0) <= ATOL * self.dim
        )

    def center(self) -> np.ndarray:
        """The uniform mix: the barycentre."""
        return np.full(self.dim, 1.0 / self.dim)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` points uniform on the simplex, shape (n, dim)."""
        return rng.dirichlet(np.ones(self.dim), size=n)

    def vertices(self) -> np.ndarray:
        """The pure mixes, one per row, shape (dim, dim)."""
        return np.eye(self.dim)

    def encode(self, a: np.ndarray) -> np.ndarray:
        """Network input for actions ``(..., dim)``: centred on the barycentre, unit-order scale."""
        return (np.asarray(a, dtype=float) - 1.0 / self.dim) * self.dim


@dataclass(frozen=True)
class Box:
    """The box ``[low_1, high_1] x ... x [low_d, high_d]``.

    Examples
    --------
    >>> b = Box(low=(0.0, -1.0), high=(1.0, 1.0))
    >>> b.dim, b.center().tolist()
    (2, [0.5, 0.0])
    """

    low: tuple[float, ...]
    high: tuple[float, ...]

    def __post_init__(self) -> None:
        low = np.atleast_1d(np.asarray(self.low, dtype=float))
        high = np.atleast_1d(np.asarray(self.high, dtype=float))
        if low.ndim != 1 or low.size == 0:
            raise ValueError(f"Box low must be a non-empty 1-D sequence, got {self.low!r}")
        if high.shape != low.shape:
            raise ValueError(
                f"Box low and high must have the same length, got {low.size} and {high.size}"
            )
        if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
            raise ValueError(f"Box bounds must be finite, got low={self.low!r} high={self.high!r}")
        if np.any(high <= low):
            raise ValueError(f"Box needs low < high on every side, got low={low} high={high}")
        object.__setattr__(self, "low", tuple(float(v) for v in low))
        object.__setattr__(self, "high", tuple(float(v) for v in high))

    @property
    def dim(self) -> int:
        return len(self.low)

    @property
    def intrinsic_dim(self) -> int:
        return len(self.low)

    @property
    def diameter(self) -> float:
        """The main diagonal."""
        return float(np.linalg.norm(np.subtract(self.high, self.low)))

    def contains(self, a: np.ndarray) -> bool:
        a = np.asarray(a, dtype=float)
        lo, hi = np.asarray(self.low), np.asarray(self.high)
        slack = ATOL * (hi - lo)
        return bool(
            a.shape == (self.dim,)
            and np.all(np.isfinite(a))
            and np.all(a >= lo - slack)
            and np.all(a <= hi + slack)
        )

    def center(self) -> np.ndarray:
        return np.asarray((np.asarray(self.low) + np.asarray(self.high)) / 2.0)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` points uniform in the box, shape (n, dim)."""
        return rng.uniform(np.asarray(self.low), np.asarray(self.high), size=(n, self.dim))

    def encode(self, a: np.ndarray) -> np.ndarray:
        """Network input for actions ``(..., dim)``: the box mapped onto ``[-1, 1]^dim``."""
        lo, hi = np.asarray(self.low), np.asarray(self.high)
        return np.asarray(2.0 * (np.asarray(a, dtype=float) - lo) / (hi - lo) - 1.0)


@dataclass(frozen=True)
class SparseSimplex:
    """Mixes with at most ``max_nonzero`` non-zero entries: ``{a in Simplex(dim), |supp a| <= B}``.

    The paper's feasible merge coefficients (B = 8 in its runs). It is a union of faces of the
    simplex, not convex, so policies that average actions cannot stay inside it; the ones that
    can (``tanbr-paper``, ``nucb``, ``random``, ``fixed``) accept it. With ``max_nonzero >= dim``
    it is the plain simplex, and :func:`check_space` hands the policies ``Simplex(dim)``.

    Examples
    --------
    >>> s = SparseSimplex(4, 2)
    >>> s.contains(np.array([0.5, 0.5, 0.0, 0.0])), s.contains(np.full(4, 0.25))
    (True, False)
    >>> s.center().tolist()
    [0.5, 0.5, 0.0, 0.0]
    """

    dim: int
    max_nonzero: int

    def __post_init__(self) -> None:
        Simplex(self.dim)  # the same checks on dim
        b = self.max_nonzero
        if isinstance(b, bool) or not isinstance(b, int | np.integer) or b < 1:
            raise ValueError(f"SparseSimplex max_nonzero must be an int >= 1, got {b!r}")
        object.__setattr__(self, "dim", int(self.dim))
        object.__setattr__(self, "max_nonzero", int(b))

    @property
    def hull(self) -> Simplex:
        """The simplex the feasible set lies in (and is dense in when ``B >= dim``)."""
        return Simplex(self.dim)

    @property
    def intrinsic_dim(self) -> int:
        """Degrees of freedom of one face: ``min(B, dim) - 1``."""
        return min(self.max_nonzero, self.dim) - 1

    @property
    def diameter(self) -> float:
        return math.sqrt(2.0)

    def contains(self, a: np.ndarray) -> bool:
        a = np.asarray(a, dtype=float)
        return bool(self.hull.contains(a) and np.count_nonzero(a > ATOL) <= self.max_nonzero)

    def center(self) -> np.ndarray:
        """The uniform mix of the first ``B`` coordinates (the uniform merge when B >= dim)."""
        b = min(self.max_nonzero, self.dim)
        out = np.zeros(self.dim)
        out[:b] = 1.0 / b
        return out

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` feasible points, shape (n, dim): a uniform support of size ``min(B, dim)``,
        then a uniform point of that face."""
        b = min(self.max_nonzero, self.dim)
        out = np.zeros((n, self.dim))
        if n == 0:
            return out
        support = np.argsort(rng.random((n, self.dim)), axis=1)[:, :b]  # (n, b)
        np.put_along_axis(out, support, rng.dirichlet(np.ones(b), size=n), axis=1)
        return out

    def vertices(self) -> np.ndarray:
        return np.eye(self.dim)

    def encode(self, a: np.ndarray) -> np.ndarray:
        """As for the simplex: centred on the barycentre, unit-order scale."""
        return self.hull.encode(a)


Space = Simplex | Box | SparseSimplex


def check_space(space: object) -> Space:
    """The space itself if it is one we know, else ValueError.

    A ``SparseSimplex`` whose cap does not bind (``max_nonzero >= dim``) is the plain
    ``Simplex(dim)``.
    """
    if isinstance(space, SparseSimplex) and space.max_nonzero >= space.dim:
        return space.hull
    if not isinstance(space, Simplex | Box | SparseSimplex):
        raise ValueError(
            f"space must be a Simplex, SparseSimplex or Box, got {type(space).__name__}"
        )
    return space


def support_sizes(points: np.ndarray) -> np.ndarray:
    """Number of non-zero entries of each row of ``points`` (n, dim), shape (n,)."""
    return np.asarray(np.count_nonzero(np.asarray(points) > ATOL, axis=-1))


def lattice(space: Space, max_points: int) -> np.ndarray:
    """The finest regular grid of the space with at most ``max_points`` points, shape (n, dim).

    On ``Simplex(K)`` it is the set of mixes with coordinates in ``{0, 1/m, ..., 1}`` for the
    largest resolution ``m`` whose ``C(m + K - 1, K - 1)`` points fit the budget; on a box, the
    same number ``m + 1`` of evenly spaced values on every side. The grid always contains the
    vertices of the space, and for even ``m`` the centre of the box.

    Examples
    --------
    >>> lattice(Simplex(2), 3).tolist()
    [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]
    """
    if isinstance(max_points, bool) or not isinstance(max_points, int | np.integer):
        raise ValueError(f"max_points must be an int, got {max_points!r}")
    space = check_space(space)
    if isinstance(space, SparseSimplex):
        raise ValueError(f"lattice needs a Simplex or a Box, got {space}")
    if isinstance(space, Simplex):
        k = space.dim
        if max_points < k:
            raise ValueError(f"max_points must be >= {k} (the vertices), got {max_points}")
        m = 1
        while math.comb(m + 1 + k - 1, k - 1) <= max_points:
            m += 1
        return _simplex_lattice(k, m)
    d = space.dim
    if max_points < 2**d:
        raise ValueError(f"max_points must be >= {2**d} (the corners), got {max_points}")
    m = 1
    while (m + 2) ** d <= max_points:
        m += 1
    axes = [np.linspace(lo, hi, m + 1) for lo, hi in zip(space.low, space.high, strict=True)]
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([g.ravel() for g in mesh], axis=1)


def _simplex_lattice(k: int, m: int) -> np.ndarray:
    """All compositions of ``m`` into ``k`` non-negative parts, divided by ``m``."""
    out: list[list[int]] = []

    def rec(prefix: list[int], left: int, slots: int) -> None:
        if slots == 1:
            out.append([*prefix, left])
            return
        for v in range(left + 1):
            rec([*prefix, v], left - v, slots - 1)

    rec([], m, k)
    return np.asarray(out, dtype=float) / m
