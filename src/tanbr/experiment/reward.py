"""The reward: what the policy learns from, in [0, 1].

Accuracy on the requests whose labels come back (all of them, or a sampled fraction that may
arrive slots later), or a label-free proxy: agreement with the full MoE on a small probe sample.
An optional penalty subtracts a weighted relative overshoot of a latency or memory budget, so a
merge that is accurate but too slow or too big scores lower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tanbr.backend.scorers import SCORERS


@dataclass(frozen=True)
class Outcomes:
    """What came back for one slot's served requests.

    ``n_hits`` sums the scores in [0, 1] of the ``n_scored`` scored requests (for label
    accuracy, the number of correct predictions). A client that knows better may give a
    ``reward`` directly; it then overrides the counts.
    """

    n_hits: float = 0
    n_scored: int = 0
    latency_ms: float | None = None
    memory_bytes: int | None = None
    reward: float | None = None
    type_rewards: tuple[float, ...] | None = None  # mean score per task type, NaN where none

    def __post_init__(self) -> None:
        if self.n_scored < 0 or self.n_hits < 0 or self.n_hits > self.n_scored:
            raise ValueError(
                f"outcomes: need 0 <= n_hits <= n_scored, got {self.n_hits}/{self.n_scored}"
            )
        if self.reward is not None and not (
            math.isfinite(self.reward) and 0.0 <= self.reward <= 1.0
        ):
            raise ValueError(f"outcomes: reward must be in [0, 1], got {self.reward}")
        if self.latency_ms is not None and not (
            math.isfinite(self.latency_ms) and self.latency_ms >= 0
        ):
            raise ValueError(f"outcomes: latency_ms must be >= 0, got {self.latency_ms}")

    @property
    def empty(self) -> bool:
        """True when there is nothing to learn from (no labels came back, no reward given)."""
        return self.reward is None and self.n_scored == 0


@dataclass(frozen=True)
class RewardFn:
    """``r = clip(hits / scored - w_lat * overshoot(latency) - w_mem * overshoot(memory), 0, 1)``.

    ``overshoot(x) = max(0, x / budget - 1)``; a budget of 0 disables that penalty.
    """

    kind: str = "accuracy"  # the scorer's name (tanbr.backend.scorers.SCORERS)
    latency_budget_ms: float = 0.0
    latency_weight: float = 0.0
    memory_budget_bytes: int = 0
    memory_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SCORERS:
            raise ValueError(f"reward.kind must be one of {sorted(SCORERS)}, got {self.kind!r}")
        for name in ("latency_budget_ms", "latency_weight", "memory_budget_bytes", "memory_weight"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"reward.{name} must be finite and >= 0, got {value}")

    def __call__(self, outcomes: Outcomes) -> float | None:
        """The reward, or ``None`` when ``outcomes`` carries nothing to score."""
        if outcomes.empty:
            return None
        base = (
            outcomes.reward if outcomes.reward is not None else outcomes.n_hits / outcomes.n_scored
        )
        penalty = 0.0
        if self.latency_budget_ms > 0 and outcomes.latency_ms is not None:
            penalty += self.latency_weight * max(
                0.0, outcomes.latency_ms / self.latency_budget_ms - 1.0
            )
        if self.memory_budget_bytes > 0 and outcomes.memory_bytes is not None:
            penalty += self.memory_weight * max(
                0.0, outcomes.memory_bytes / self.memory_budget_bytes - 1.0
            )
        return float(min(1.0, max(0.0, base - penalty)))
