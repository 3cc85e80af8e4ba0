"""A small loop that runs a policy on a synthetic surface and records its regret.

Regret is the pseudo-regret against the slot oracle: ``max_a f(x_t, a) - f(x_t, a_t)`` with the
noise-free mean ``f``, so curves are not blurred by reward noise. The policy learns from the
slot reward alone (``feedback="scalar"``) or also from the per-type rewards
(``feedback="per-type"``, the default); both come from the same noise draw, so the two kinds of
run see the same noise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from tanbr.bandit import make_policy
from tanbr.bandit.base import Policy
from tanbr.bandit.spaces import Simplex
from tanbr.bandit.surfaces import Surface, make_mixes

FEEDBACKS: tuple[str, ...] = ("per-type", "scalar")
_OPTIMA: dict[tuple[Surface, bytes], np.ndarray] = {}  # best values per context sequence
_OPTIMA_SIZE = 64


def best_values(surface: Surface, contexts: np.ndarray) -> np.ndarray:
    """The slot oracle's mean reward for every context (T,), memoised: every policy of a
    seeded benchmark sees the same contexts, and the optimum costs a mean-shift search."""
    contexts = np.ascontiguousarray(contexts, dtype=float)
    key = (surface, contexts.tobytes())
    if key not in _OPTIMA:
        if len(_OPTIMA) >= _OPTIMA_SIZE:
            _OPTIMA.pop(next(iter(_OPTIMA)))
        _OPTIMA[key] = surface.optimum(contexts)[1]
    return _OPTIMA[key]


@dataclass(frozen=True)
class Trace:
    """What happened in a run: per-slot arrays of length T."""

    regret: np.ndarray  # (T,) per-slot pseudo-regret
    rewards: np.ndarray  # (T,) observed rewards
    actions: np.ndarray  # (T, dim)
    select_ms: np.ndarray  # (T,) wall time of select
    update_ms: np.ndarray  # (T,) wall time of update

    @property
    def cumulative(self) -> np.ndarray:
        """Cumulative regret after each slot, shape (T,)."""
        return np.cumsum(self.regret)


def simulate(
    policy: Policy,
    surface: Surface,
    contexts: np.ndarray,
    *,
    rng: np.random.Generator,
    feedback: str = "per-type",
    oracle: bool = True,
    on_slot: Callable[[int], None] | None = None,
) -> Trace:
    """Run ``policy`` for one slot per row of ``contexts`` (T, V); noise drawn from ``rng``.

    ``oracle=False`` skips the optimum (regret is NaN): for timing runs.
    """
    if feedback not in FEEDBACKS:
        raise ValueError(f"feedback must be one of {FEEDBACKS}, got {feedback!r}")
    contexts = np.asarray(contexts, dtype=float)
    n_slots = len(contexts)
    best = best_values(surface, contexts) if oracle else np.full(n_slots, np.nan)
    regret = np.empty(n_slots)
    rewards = np.empty(n_slots)
    actions = np.empty((n_slots, surface.dim))
    select_ms = np.empty(n_slots)
    update_ms = np.empty(n_slots)
    for t, x in enumerate(contexts):
        t0 = time.perf_counter()
        a = policy.select(x)
        t1 = time.perf_counter()
        r, per_type = surface.feedback(x, a, rng)
        t2 = time.perf_counter()
        policy.update(x, a, r, type_rewards=per_type if feedback == "per-type" else None)
        t3 = time.perf_counter()
        regret[t] = best[t] - float(surface.mean(x, a)) if oracle else np.nan
        rewards[t] = r
        actions[t] = a
        select_ms[t] = 1e3 * (t1 - t0)
        update_ms[t] = 1e3 * (t3 - t2)
        if on_slot is not None:
            on_slot(t)
    return Trace(regret, rewards, actions, select_ms, update_ms)


def run_policy(
    name: str,
    surface: Surface,
    *,
    n_slots: int,
    seed: int,
    schedule: str = "stationary",
    schedule_params: dict[str, Any] | None = None,
    policy_params: dict[str, Any] | None = None,
    feedback: str = "per-type",
    on_slot: Callable[[int], None] | None = None,
) -> Trace:
    """One seeded run of a registered policy on ``Simplex(K)`` with a task-mix schedule (a
    non-contextual surface shows the policy its fixed mix every slot).

    The seed is split into independent streams for the contexts, the policy and the reward
    noise, so every policy run with the same seed sees the same mixes and the same noise.
    """
    ctx_seed, policy_seed, noise_seed = np.random.SeedSequence(seed).spawn(3)
    contexts = make_mixes(
        schedule,
        dim=surface.n_types,
        n_slots=n_slots,
        rng=np.random.default_rng(ctx_seed),
        **(schedule_params or {}),
    )
    if not surface.contextual:
        contexts = np.tile(surface.static_context(), (n_slots, 1))
    policy = make_policy(
        name,
        space=Simplex(surface.dim),
        context_dim=surface.n_types,
        rng=np.random.default_rng(policy_seed),
        **(policy_params or {}),
    )
    noise = np.random.default_rng(noise_seed)
    return simulate(policy, surface, contexts, rng=noise, feedback=feedback, on_slot=on_slot)


def loglog_slope(cumulative: np.ndarray, *, start: int = 200, end: int | None = None) -> float:
    """Slope of log cumulative regret against log T between slots ``start`` and ``end``.

    Linear regret gives 1, ``sqrt(T)`` regret gives 0.5.

    Examples
    --------
    >>> round(loglog_slope(np.sqrt(np.arange(1, 2001)), start=200), 3)
    0.5
    """
    cumulative = np.asarray(cumulative, dtype=float)
    end = len(cumulative) if end is None else end
    if not 1 <= start < end <= len(cumulative):
        raise ValueError(f"need 1 <= start < end <= {len(cumulative)}, got {start}, {end}")
    lo, hi = float(cumulative[start - 1]), float(cumulative[end - 1])
    if hi <= 0.0:
        return 0.0  # no regret at all
    if lo <= 0.0:
        return math.inf  # regret only began after ``start``
    return math.log(hi / lo) / math.log(end / start)
