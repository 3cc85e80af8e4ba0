"""Per-slot records and the run folder's files (``trace.jsonl``, ``summary.json``).

Records are plain values that serialise to one JSON object per line, so a run folder can be
read back (``tanbr report``) without importing any model code.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class SlotRecord:
    """What happened in one slot under one policy (a line of ``trace.jsonl``).

    Mixes are lists of floats: ``est_mix`` in the estimator's task-type order (what the policy
    saw), ``est_mix_tasks`` the same mapped onto the true tasks (evaluation only), ``true_mix``
    over the true tasks. ``n_served`` requests of the slot's ``n_requests`` ran through the model
    (all, unless an evaluation sample is set). ``latency_ms`` is the time the MoE layers and the
    head spent on them (lower layers cached; 0 when the predictions came from the backend's
    memo); end-to-end latency is measured separately on real batches. ``oracle_accuracy`` is
    the slot oracle's accuracy on the same scored requests and ``regret`` the difference
    (joined after the runs). ``est_mix`` has more entries than the policy's context once the
    estimator has opened task types online; ``profile_ms`` is the full-MoE gate pass charged
    for learning their profiles in this slot. For a language model with reference
    continuations, ``loss`` is
    the mean over the served requests of each one's mean NLL per token of its continuation,
    ``task_loss`` the same per true task (None where none was served) and ``task_n`` how many
    requests of each task were served.
    """

    policy: str
    seed: int
    slot: int
    n_requests: int
    kind: str
    est_mix: list[float]
    n_served: int = 0
    action: list[float] | None = None
    coeffs: dict[str, list[float]] | None = None
    true_mix: list[float] | None = None
    est_mix_tasks: list[float] | None = None
    tv: float | None = None
    accuracy: float | None = None
    oracle_accuracy: float | None = None
    regret: float | None = None
    loss: float | None = None
    task_loss: list[float | None] | None = None
    task_n: list[int] | None = None
    reward: float | None = None
    n_scored: int = 0
    latency_ms: float = 0.0
    merge_ms: float = 0.0
    memory_bytes: int = 0  # parameter bytes the served model keeps resident
    select_ms: float = 0.0
    estimate_ms: float = 0.0
    update_ms: float = 0.0
    profile_ms: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> SlotRecord:
        known = {f.name for f in fields(cls)}
        missing = {"policy", "seed", "slot", "n_requests", "kind", "est_mix"} - obj.keys()
        if missing:
            raise ValueError(f"trace record is missing {sorted(missing)}")
        return cls(**{k: v for k, v in obj.items() if k in known})


def _finite(obj: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every line stays valid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def write_trace(path: Path, records: Iterable[SlotRecord]) -> None:
    """Write records as JSON lines (atomically: a temp file renamed into place)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(_finite(record.to_json()), separators=(",", ":")) + "\n")
    tmp.replace(path)


def read_trace(path: Path) -> Iterator[SlotRecord]:
    """Read ``trace.jsonl``; a corrupt line raises ValueError naming the file and line."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield SlotRecord.from_json(json.loads(line))
            except (json.JSONDecodeError, TypeError, ValueError) as err:
                raise ValueError(f"{path}:{lineno}: bad trace record: {err}") from None


def write_json(path: Path, obj: Any) -> None:
    """Pretty JSON, atomically."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_finite(obj), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    tmp.replace(path)
