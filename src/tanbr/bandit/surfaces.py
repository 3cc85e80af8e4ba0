"""Synthetic reward surfaces with a known optimum, and task-mix schedules.

A surface maps a context ``x`` (a task mix on the K-simplex) and an action ``a`` (merging
weights on the K-simplex) to a mean reward in ``[LOW, HIGH]``; the observed reward adds
uniform noise in ``[-noise, noise]``, so it stays in ``[0, 1]`` without clipping and its mean
is exact. The best action is known in closed form and is a *non-linear* function of the
context, not the context itself:

    a*(x) = (1 - eta) * x^p / sum(x^p) + eta / K          (p = 2, eta = 0.1)

"the best merge sharpens the dominant tasks and keeps a little of every expert". So the
plug-in action ``a = x`` is close but wrong, and a policy must learn the map.

Families (``FAMILIES``), all peaking at ``a*(x)`` with value ``HIGH``:

* ``bump``: one smooth Gaussian bump ``exp(-|a - a*|^2 / (2 sigma^2))``;
* ``multimodal``: the global bump and a decoy mode of relative height 0.75 centred on the
  mirrored mix ``b(x)`` (the same map applied to ``1 - x``), combined by ``max`` so the global
  optimum is still exactly ``a*(x)``; a greedy learner that finds the decoy first stays there;
* ``ridge``: a sharp crest: narrow (``sigma = 0.06``) across the direction ``e`` from the
  barycentre towards the first vertex, broad (0.35) along the others. A grid misses the crest.

``contextual=False`` freezes the context at a fixed asymmetric mix: the same shapes with one
optimum, for context-free policies and the PyXAB cross-check.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tanbr.bandit.base import check_int, check_positive

LOW, HIGH = 0.1, 0.9
FAMILIES: tuple[str, ...] = ("bump", "multimodal", "ridge")

# Shape defaults per family (distances are Euclidean on the simplex, whose edges are sqrt 2).
_WIDTH = {"bump": 0.25, "multimodal": 0.2, "ridge": 0.06}
_SPREAD = {"multimodal": 0.2, "ridge": 0.35}
_DECOY_HEIGHT = 0.75
_SHARPEN_POWER = 2.0
_SHARPEN_FLOOR = 0.1


def sharpen(x: np.ndarray) -> np.ndarray:
    """The optimum map ``a*(x)`` for mixes ``x`` (..., K), same shape."""
    x = np.asarray(x, dtype=float)
    k = x.shape[-1]
    p = np.maximum(x, 0.0) ** _SHARPEN_POWER
    p = p / p.sum(axis=-1, keepdims=True)
    return np.asarray((1.0 - _SHARPEN_FLOOR) * p + _SHARPEN_FLOOR / k)


@dataclass(frozen=True)
class Surface:
    """A reward surface on ``Simplex(dim)`` actions and ``dim``-mix contexts.

    Examples
    --------
    >>> s = Surface(family="bump", dim=3)
    >>> x = np.array([0.6, 0.3, 0.1])
    >>> a = s.best_action(x)
    >>> round(float(s.mean(x, a)), 6) == HIGH, bool(s.mean(x, x) < HIGH)
    (True, True)
    """

    family: str
    dim: int
    contextual: bool = True
    noise: float = 0.1
    width: float | None = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        check_int("dim", self.dim, minimum=2)
        noise = check_positive("noise", self.noise, allow_zero=True)
        if noise > LOW:
            raise ValueError(f"noise must be <= {LOW} so rewards stay in [0, 1], got {noise}")
        if self.width is not None:
            check_positive("width", self.width)

    @property
    def name(self) -> str:
        kind = "" if self.contextual else "-static"
        return f"{self.family}{kind}-{self.dim}"

    def _context(self, x: np.ndarray) -> np.ndarray:
        if self.contextual:
            x = np.asarray(x, dtype=float)
            if x.shape != (self.dim,):
                raise ValueError(f"context must have shape ({self.dim},), got {x.shape}")
            return x
        return _static_mix(self.dim)

    def best_action(self, context: np.ndarray) -> np.ndarray:
        """The action with the highest mean reward for ``context``, shape (dim,)."""
        return sharpen(self._context(context))

    def best_value(self, context: np.ndarray) -> float:
        """The highest mean reward (always ``HIGH``: every family peaks at ``a*(x)``)."""
        return HIGH

    def mean(self, context: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Mean rewards of ``actions`` (N, dim) or (dim,) for one context: (N,) or ()."""
        x = self._context(context)
        a = np.asarray(actions, dtype=float)
        shape = a.shape[:-1]
        a = a.reshape(-1, self.dim)  # (N, K)
        centre = sharpen(x)  # (K,)
        width = self.width if self.width is not None else _WIDTH[self.family]
        d = a - centre  # (N, K)
        if self.family == "bump":
            g = np.exp(-np.einsum("nk,nk->n", d, d) / (2 * width**2))
        elif self.family == "multimodal":
            g1 = np.exp(-np.einsum("nk,nk->n", d, d) / (2 * width**2))
            e = a - sharpen(1.0 - x)  # (N, K), the decoy's centre b(x)
            g2 = np.exp(-np.einsum("nk,nk->n", e, e) / (2 * _SPREAD["multimodal"] ** 2))
            g = np.maximum(g1, _DECOY_HEIGHT * g2)
        else:
            u = _ridge_direction(self.dim)  # (K,) unit, sums to 0
            across = d @ u  # (N,)
            along = d - across[:, None] * u[None, :]  # (N, K)
            g = np.exp(
                -(across**2) / (2 * width**2)
                - np.einsum("nk,nk->n", along, along) / (2 * _SPREAD["ridge"] ** 2)
            )
        out = LOW + (HIGH - LOW) * g
        return np.asarray(out.reshape(shape))

    def reward(self, context: np.ndarray, action: np.ndarray, rng: np.random.Generator) -> float:
        """A noisy reward in [0, 1]: the mean plus uniform noise in ``[-noise, noise]``."""
        m = float(self.mean(context, action))
        return m + float(rng.uniform(-self.noise, self.noise)) if self.noise else m


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
