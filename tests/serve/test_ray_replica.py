"""A Ray Serve replica's two model copies, without a cluster: the copy that served the previous
slot rests (drops its merged experts) once its last forward has ended, never while a merge for
the next slot waits on it for its commit."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

pytest.importorskip("ray", reason="Ray is not installed (pip install 'tanbr[ray]')")

from tanbr.backend.registry import BackendSpec, serving_backend
from tanbr.experiment.loop import Decision, apply_decision
from tanbr.serve.metrics import ServiceMetrics
from tanbr.serve.ray_serve import ReplicaSlots
from tanbr.serve.replicas import ServeConfig
from tanbr.serve.slots import ModelCopy


class _Controller:
    """Every call the copies' bookkeeping makes, answered at once (no Ray)."""

    def __getattr__(self, name: str) -> Any:
        return SimpleNamespace(remote=lambda *args, **kwargs: None)


def _merge(backend: Any, slot: int, sharp: int) -> Decision:
    plan = {}
    for name, n_experts in backend.blocks.items():
        coeffs = np.full(n_experts, 0.5 / (n_experts - 1))
        coeffs[sharp % n_experts] = 0.5
        plan[name] = coeffs
    return Decision(slot=slot, mix=np.ones(2) / 2, kind="merge", plan=plan)


def _extra(copy: ModelCopy) -> int:
    """Bytes the copy holds beyond the tensors both copies share (its merged experts)."""
    backend = copy.system.backend
    return int(backend.merger.resident_bytes() - backend.served.shared_bytes)


def test_the_previous_copy_rests_after_its_last_forward(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = serving_backend(BackendSpec(path=str(tiny_model), lean=True))
    assert backend.merger.lean
    monkeypatch.setattr(ReplicaSlots, "_call", lambda self, ref: ref)
    slots = ReplicaSlots(ServeConfig(), _Controller(), ServiceMetrics())
    a = SimpleNamespace(backend=backend)
    b = SimpleNamespace(backend=backend.replica(experts=False))  # a merges-only policy
    slots._copies = [ModelCopy(a), ModelCopy(b)]  # type: ignore[arg-type]
    slots._active, slots._prepared, slots._building = 0, -1, False
    apply_decision(a, _merge(backend, 0, sharp=0))  # type: ignore[arg-type]
    first, second = slots._copies
    assert _extra(first) > 0 and _extra(second) == 0

    slots._prepare(1, _merge(backend, 1, sharp=1))  # slot 1's merge waits for its commit
    assert _extra(second) > 0 and not second.rested
    slots._rest()
    assert _extra(second) > 0  # a prepared merge is never dropped

    lease = slots.lease()  # a generation still running on slot 0's copy ...
    slots._swap(1)
    assert slots._copies[slots._active] is second
    assert not first.rested and _extra(first) > 0  # ... keeps its merged experts
    slots.release(lease)
    assert first.rested and _extra(first) == 0  # then they go
    assert _extra(second) > 0  # the serving copy keeps its own

    slots._prepare(2, _merge(backend, 2, sharp=2))  # the rested copy merges afresh
    assert not first.rested and _extra(first) > 0
