"""Synthetic reward surfaces with per-type rewards and a known optimum; task-mix schedules.

Each of the V task types has its own mean reward ``g_v(a)`` in ``[LOW, HIGH]`` for a merge
``a`` on ``Simplex(K)``, and the slot's mean reward for a mix ``psi`` is the mix-weighted sum

    f(psi, a) = sum_v psi_v g_v(a)

as in the real system, where a slot's accuracy is the mix-weighted accuracy of its task types
and a task's accuracy under a merge does not depend on which other requests share the slot.
The observed per-type reward adds uniform noise in ``[-noise, noise]`` to each ``g_v`` (so it
stays in ``[0, 1]`` and its mean is exact), and the observed slot reward is the mix-weighted
sum of the observed per-type rewards. Both kinds of feedback come from one draw
(:meth:`Surface.feedback`).

Type v's reward peaks at its own merge ``m_v``, mostly its own experts, and falls off with
distance: the best merge for a mix trades the types off, and it is a non-linear function of
the mix (computed by mean-shift from many starts, :meth:`Surface.optimum`). Families
(``FAMILIES``):

* ``bump``: a Gaussian bump around ``m_v = 0.9 e_v + 0.1 / K`` (width 0.5). The best merge
  leans towards the dominant types: a sharpened mix.
* ``multimodal``: a narrower bump at ``m_v`` and a decoy of relative height 0.75 at the next
  type's merge ``m_{v+1}``, combined by ``max``: local optima at every type's merge.
* ``ridge``: one metric for every type, narrow (0.15) across the direction from the
  barycentre to the first vertex and broad (0.5) along the others: a sharp crest.
* ``flat``: ``m_v = 0.5 e_v + 0.5 / K`` and a bump of width 0.45: every type wants a spread
  merge, the best merge is a mix flattened towards uniform.
* ``shifted``: ``m_v = 0.55 e_v + 0.35 e_{K-1} + 0.1 / K``: every type also wants the last
  expert (a generalist), so the best merge is off-centre and far from the mix itself.
* ``plateau``: ``g_v`` is flat (at ``HIGH``) within 0.2 of ``m_v`` and falls off as a
  Gaussian (0.35) beyond: many merges are equally good near the top.

Tuning and reporting are kept apart: defaults are chosen on ``TUNING_SEEDS`` and
``TUNING_FAMILIES`` (``flat`` is never reported), tables and tests use ``REPORT_SEEDS`` and
``REPORT_FAMILIES`` (``shifted`` and ``plateau`` are held out: never used for tuning).

``contextual=False`` freezes the mix at a fixed asymmetric mix: one optimum, for
context-free policies and the PyXAB cross-check.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tanbr.bandit.base import check_int, check_positive

LOW, HIGH = 0.1, 0.9
FAMILIES: tuple[str, ...] = ("bump", "multimodal", "ridge", "flat", "shifted", "plateau")
#: Families on which defaults are chosen (with TUNING_SEEDS); ``flat`` is never reported.
TUNING_FAMILIES: tuple[str, ...] = ("bump", "multimodal", "ridge", "flat")
#: Families in the tables and tests (with REPORT_SEEDS); ``shifted`` and ``plateau`` are
#: held out: no default was ever chosen on them.
REPORT_FAMILIES: tuple[str, ...] = ("bump", "multimodal", "ridge", "shifted", "plateau")
HELD_OUT_FAMILIES: tuple[str, ...] = ("shifted", "plateau")
TUNING_SEEDS: tuple[int, ...] = (100, 101, 102, 103, 104)
REPORT_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)


@dataclass(frozen=True)
class _Shape:
    """One family's constants (distances are Euclidean on the simplex, edges sqrt 2)."""

    own: float = 0.9  # weight of the type's own experts in its best merge m_v
    shared: float = 0.0  # weight of the last expert (a generalist) in every m_v
    width: float = 0.5  # Gaussian width of the bump (across the crest for ridge)
    along: float | None = None  # ridge: width along the crest
    decoy: float = 0.0  # multimodal: relative height of the decoy (0: none)
    plateau: float = 0.0  # radius of the flat top (0: none)


_SHAPES: dict[str, _Shape] = {
    "bump": _Shape(),
    "multimodal": _Shape(width=0.35, decoy=0.75),
    "ridge": _Shape(width=0.15, along=0.5),
    "flat": _Shape(own=0.5, width=0.45),
    "shifted": _Shape(own=0.55, shared=0.35),
    "plateau": _Shape(width=0.35, plateau=0.2),
}
_MEAN_SHIFT_STEPS = 400
_MEAN_SHIFT_TOL = 1e-9
_STEPS = (1.0, 0.5, 0.25, 0.125, 1 / 16, 1 / 64, 1 / 256, 1 / 1024)


@dataclass(frozen=True)
class Surface:
    """Per-type reward surfaces on ``Simplex(dim)`` merges for ``types``-mix contexts.

    Examples
    --------
    >>> s = Surface(family="bump", dim=3)
    >>> x = np.array([0.6, 0.3, 0.1])
    >>> a = s.best_action(x)
    >>> bool(s.mean(x, a) >= s.mean(x, x)), s.type_means(a).shape
    (True, (3,))
    """

    family: str
    dim: int
    types: int | None = None  # V, the context's length; default dim
    contextual: bool = True
    noise: float = 0.1
    width: float | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        check_int("dim", self.dim, minimum=2)
        if self.types is not None:
            check_int("types", self.types, minimum=2)
        noise = check_positive("noise", self.noise, allow_zero=True)
        if noise > LOW:
            raise ValueError(f"noise must be <= {LOW} so rewards stay in [0, 1], got {noise}")
        if self.width is not None:
            check_positive("width", self.width)

    @property
    def n_types(self) -> int:
        return self.dim if self.types is None else int(self.types)

    @property
    def name(self) -> str:
        kind = "" if self.contextual else "-static"
        return f"{self.family}{kind}-{self.dim}"

    # --- geometry --------------------------------------------------------------------------

    @property
    def _shape(self) -> _Shape:
        return _SHAPES[self.family]

    def own_experts(self) -> np.ndarray:
        """Each type's own experts as a mix, shape (V, K): ``e_v`` when V = K; otherwise type
        v owns the experts ``k`` with ``k mod V = v`` (or expert ``v mod K`` when V > K)."""
        k, v = self.dim, self.n_types
        own = np.zeros((v, k))
        for t in range(v):
            mine = [e for e in range(k) if e % v == t] or [t % k]
            own[t, mine] = 1.0 / len(mine)
        return own

    def modes(self) -> tuple[np.ndarray, np.ndarray]:
        """Centres (V, J, K) and relative heights (V, J) of each type's modes."""
        cached = self.__dict__.get("_modes")
        if cached is None:
            cached = self._make_modes()
            object.__setattr__(self, "_modes", cached)  # a cache, not a field
        return cached

    def _make_modes(self) -> tuple[np.ndarray, np.ndarray]:
        sh, k = self._shape, self.dim
        own = self.own_experts()  # (V, K)
        shared = np.zeros(k)
        shared[-1] = 1.0
        rest = 1.0 - sh.own - sh.shared
        centre = sh.own * own + sh.shared * shared + rest / k  # (V, K)
        if not sh.decoy:
            return centre[:, None, :], np.ones((len(centre), 1))
        decoy = np.roll(centre, -1, axis=0)  # type v's decoy: type v+1's own merge
        heights = np.tile([1.0, sh.decoy], (len(centre), 1))
        return np.stack([centre, decoy], axis=1), heights

    def _distances(self, actions: np.ndarray) -> np.ndarray:
        """Scaled squared distances of actions (P, K) to every mode: (P, V, J)."""
        sh = self._shape
        width = self.width if self.width is not None else sh.width
        centres, _ = self.modes()
        d = actions[:, None, None, :] - centres[None]  # (P, V, J, K)
        d2 = np.einsum("pvjk,pvjk->pvj", d, d)
        if sh.along is None:
            return np.asarray(d2 / width**2)
        u = _ridge_direction(self.dim)
        across = d @ u  # (P, V, J)
        return np.asarray(across**2 / width**2 + (d2 - across**2) / sh.along**2)

    def _kernels(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-type kernel values in [0, 1] (P, V), the mean-shift pull of each type's active
        mode (P, V), and that mode's index (P, V)."""
        sh = self._shape
        _, heights = self.modes()
        q = self._distances(actions)  # (P, V, J)
        if sh.plateau:
            width = self.width if self.width is not None else sh.width
            r = np.sqrt(q) * width  # Euclidean distance
            excess = np.maximum(r - sh.plateau, 0.0)
            kern = np.exp(-(excess**2) / (2 * width**2)) * heights
            pull = kern * np.divide(excess, r, out=np.zeros_like(r), where=r > 0)
        else:
            kern = np.exp(-q / 2.0) * heights
            pull = kern
        j = np.argmax(kern, axis=2)  # (P, V) the active mode
        value = np.take_along_axis(kern, j[..., None], axis=2)[..., 0]
        weight = np.take_along_axis(pull, j[..., None], axis=2)[..., 0]
        return value, weight, j

    # --- rewards ---------------------------------------------------------------------------

    def static_context(self) -> np.ndarray:
        """The fixed mix of a non-contextual surface, (V,)."""
        return _static_mix(self.n_types)

    def _context(self, x: np.ndarray) -> np.ndarray:
        if self.contextual:
            x = np.asarray(x, dtype=float)
            if x.shape != (self.n_types,):
                raise ValueError(f"context must have shape ({self.n_types},), got {x.shape}")
            return x
        return _static_mix(self.n_types)

    def type_means(self, actions: np.ndarray) -> np.ndarray:
        """Mean reward of every type for ``actions`` (N, K) or (K,): (N, V) or (V,)."""
        a = np.asarray(actions, dtype=float)
        shape = a.shape[:-1]
        value = self._kernels(a.reshape(-1, self.dim))[0]
        out = LOW + (HIGH - LOW) * value
        return np.asarray(out.reshape(*shape, self.n_types))

    def mean(self, context: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Mean slot rewards ``psi . g(a)`` of ``actions`` (N, K) or (K,): (N,) or ()."""
        return np.asarray(self.type_means(actions) @ self._context(context))

    def feedback(
        self, context: np.ndarray, action: np.ndarray, rng: np.random.Generator
    ) -> tuple[float, np.ndarray]:
        """One slot's noisy feedback: the slot reward and the per-type rewards (V,).

        Per-type rewards are the means plus independent uniform noise in ``[-noise, noise]``;
        the slot reward is their mix-weighted sum.
        """
        psi = self._context(context)
        g = self.type_means(np.asarray(action, dtype=float))  # (V,)
        if self.noise:
            g = g + rng.uniform(-self.noise, self.noise, size=g.shape)
        return float(g @ psi), np.asarray(g)

    def reward(self, context: np.ndarray, action: np.ndarray, rng: np.random.Generator) -> float:
        """A noisy slot reward in [0, 1] (the first half of :meth:`feedback`)."""
        return self.feedback(context, action, rng)[0]

    # --- the optimum -----------------------------------------------------------------------

    def optimum(self, contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Best actions (T, K) and their mean rewards (T,) for contexts (T, V).

        ``f(psi, .)`` is a mix of bumps; its modes are fixed points of mean-shift,
        ``a <- sum_v w_v c_v / sum_v w_v`` with ``w_v = psi_v h_v k_v'`` the pull of type v's
        active mode ``c_v`` (one metric for every type, so the fixed point is a weighted mean
        of centres and stays inside the simplex). Started from every mode, the mix mapped
        onto the experts, the weighted mean of the centres and the uniform merge, the best
        fixed point is the optimum (the tests check it against dense random search).
        """
        psi = np.atleast_2d(np.asarray([self._context(x) for x in np.atleast_2d(contexts)]))
        centres, _ = self.modes()  # (V, J, K)
        n_t, k = len(psi), self.dim
        fixed = np.concatenate([centres.reshape(-1, k), np.full((1, k), 1.0 / k)])  # (S0, K)
        own = self.own_experts()
        per_context = np.stack([psi @ own, psi @ centres[:, 0, :]], axis=1)  # (T, 2, K)
        starts = np.concatenate([np.broadcast_to(fixed, (n_t, *fixed.shape)), per_context], 1)
        n_s = starts.shape[1]
        a = starts.reshape(-1, k).copy()  # (T*S, K)
        weights = np.repeat(psi, n_s, axis=0)  # (T*S, V)
        value = np.einsum("pv,pv->p", self._kernels(a)[0], weights)  # (P,)
        active = np.arange(len(a))
        types = np.arange(self.n_types)[None, :]
        for _ in range(_MEAN_SHIFT_STEPS):
            if not len(active):
                break
            pts, w_mix = a[active], weights[active]
            _, pull, mode = self._kernels(pts)
            w = pull * w_mix  # (P, V)
            c = centres[types, mode]  # (P, V, K) the active modes
            total = w.sum(axis=1, keepdims=True)
            target = np.einsum("pv,pvk->pk", w, c) / np.maximum(total, 1e-300)
            direction = np.where(total > 0, target - pts, 0.0)  # an ascent direction
            # backtracking along it: the best of the steps 1, 1/2, ..., 1/1024
            best_pts, best_val = pts, value[active]
            for t in _STEPS:
                trial = pts + t * direction
                val = np.einsum("pv,pv->p", self._kernels(trial)[0], w_mix)
                better = val > best_val + 1e-15
                best_pts = np.where(better[:, None], trial, best_pts)
                best_val = np.where(better, val, best_val)
            moved = np.max(np.abs(best_pts - pts), axis=1)
            a[active], value[active] = best_pts, best_val
            active = active[moved > _MEAN_SHIFT_TOL]
        values = (LOW + (HIGH - LOW) * value).reshape(n_t, n_s)
        best = np.argmax(values, axis=1)
        actions = a.reshape(n_t, n_s, k)[np.arange(n_t), best]
        return actions, values[np.arange(n_t), best]

    def best_action(self, context: np.ndarray) -> np.ndarray:
        """The action with the highest mean reward for ``context``, shape (dim,)."""
        return np.asarray(self.optimum(np.asarray(context, dtype=float)[None, :])[0][0])

    def best_value(self, context: np.ndarray) -> float:
        """The highest mean reward for ``context``."""
        return float(self.optimum(np.asarray(context, dtype=float)[None, :])[1][0])


def _static_mix(k: int) -> np.ndarray:
    """The fixed context of non-contextual surfaces: weights ``k, k-1, ..., 1`` normalised."""
    w = np.arange(k, 0, -1, dtype=float)
    return np.asarray(w / w.sum())


def _ridge_direction(k: int) -> np.ndarray:
    e = np.full(k, -1.0 / k)
    e[0] += 1.0
    return np.asarray(e / np.linalg.norm(e))


# --- task-mix schedules ------------------------------------------------------------------


def stationary(
    *, dim: int, n_slots: int, rng: np.random.Generator, concentration: float = 1.0
) -> np.ndarray:
    """I.i.d. mixes from a symmetric Dirichlet (``concentration`` 1 = uniform on the simplex)."""
    alpha = check_positive("concentration", concentration)
    return rng.dirichlet(np.full(dim, alpha), size=n_slots)


def switching(
    *,
    dim: int,
    n_slots: int,
    rng: np.random.Generator,
    period: int = 100,
    jitter: float = 200.0,
) -> np.ndarray:
    """Abrupt switches: a new uniform mix every ``period`` slots, with slot-level jitter.

    Each slot's mix is ``Dirichlet(jitter * m)`` around the current mix ``m``: the estimation
    noise of a finite slot.
    """
    period = check_int("period", period, minimum=1)
    jitter = check_positive("jitter", jitter)
    n_segments = -(-n_slots // period)
    anchors = rng.dirichlet(np.ones(dim), size=n_segments)  # (S, K)
    out = np.empty((n_slots, dim))
    for t in range(n_slots):
        out[t] = rng.dirichlet(jitter * anchors[t // period] + 1e-3)
    return out


def periodic(
    *,
    dim: int,
    n_slots: int,
    rng: np.random.Generator,
    period: int = 200,
    amplitude: float = 0.9,
) -> np.ndarray:
    """The dominant task rotates through the K tasks every ``period`` slots (a daily cycle).

    ``x_t,k`` is proportional to ``1 + amplitude * cos(2 pi t / period - 2 pi k / K)``; the
    phase is random.
    """
    period = check_int("period", period, minimum=2)
    amp = check_positive("amplitude", amplitude)
    if amp >= 1.0:
        raise ValueError(f"amplitude must be < 1 so every task keeps some share, got {amp}")
    phase = rng.uniform(0.0, 2 * math.pi)
    t = np.arange(n_slots)[:, None]  # (T, 1)
    k = np.arange(dim)[None, :]  # (1, K)
    w = 1.0 + amp * np.cos(2 * math.pi * t / period - 2 * math.pi * k / dim + phase)  # (T, K)
    return np.asarray(w / w.sum(axis=1, keepdims=True))


def random_walk(
    *,
    dim: int,
    n_slots: int,
    rng: np.random.Generator,
    step: float = 0.15,
    reversion: float = 0.02,
) -> np.ndarray:
    """Slow drift: a mean-reverting Gaussian walk of the mix's logits, mapped by softmax."""
    step = check_positive("step", step)
    kappa = check_positive("reversion", reversion, allow_zero=True)
    y = np.zeros(dim)
    out = np.empty((n_slots, dim))
    for t in range(n_slots):
        y = (1.0 - kappa) * y + step * rng.standard_normal(dim)
        e = np.exp(y - y.max())
        out[t] = e / e.sum()
    return out


Schedule = Callable[..., np.ndarray]
SCHEDULES: dict[str, Schedule] = {
    "stationary": stationary,
    "switching": switching,
    "periodic": periodic,
    "random-walk": random_walk,
}


def make_mixes(
    name: str, *, dim: int, n_slots: int, rng: np.random.Generator, **params: Any
) -> np.ndarray:
    """Context sequence of a named schedule, shape (n_slots, dim)."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose from {sorted(SCHEDULES)}")
    check_int("dim", dim, minimum=2)
    check_int("n_slots", n_slots, minimum=1)
    return SCHEDULES[name](dim=dim, n_slots=n_slots, rng=rng, **params)
