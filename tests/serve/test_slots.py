"""The slot manager in process, on the tiny default model (no HTTP)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tanbr.serve import ledger as ledger_module
from tanbr.serve.metrics import ServiceMetrics
from tanbr.serve.replicas import ServeConfig, build_replicas
from tanbr.serve.slots import SlotConfig, SlotManager
from tanbr.serve.state import StateStore

pytestmark = [pytest.mark.data, pytest.mark.timeout(600)]

TEXTS = [
    "A warm, funny and beautifully acted film.",
    "Die Sitzung ist eröffnet.",
    "What is your favourite programming language?",
    "Stocks fell sharply in Asia.",
]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("slot_size", 0),
        ("slot_seconds", 0.0),
        ("max_batch", 0),
        ("batch_wait_ms", -1.0),
        ("max_queue", 0),
        ("observe_max", -1),
    ],
)
def test_slot_config_names_the_bad_parameter(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        SlotConfig(**{field: value})  # type: ignore[arg-type]


def test_service_serves_in_the_configured_precision(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`model.dtype` of the experiment config reaches both replicas and the state's meta, so a
    restart resumes in the same precision. (Runs before the module's manager merges the shared
    float32 model.)"""
    import torch

    config = ServeConfig(
        model=str(tiny_model),
        state_dir=tmp_path_factory.mktemp("state-bf16"),
        overrides=("model.dtype=bfloat16",),
    )
    replicas = build_replicas(config)
    assert replicas.meta["dtype"] == "bfloat16"
    for system in replicas.systems:
        assert system.backend.model.dtype == torch.bfloat16


@pytest.fixture(scope="module")
def manager(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlotManager]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ledger_module, "KEEP_DECISIONS", 1)  # evict every past decision
        config = ServeConfig(model=str(tiny_model), state_dir=tmp_path_factory.mktemp("state"))
        replicas = build_replicas(config)
        store = StateStore(config.state_dir)
        manager = SlotManager(
            replicas.systems,
            labels=replicas.labels,
            meta=replicas.meta,
            store=store,
            metrics=ServiceMetrics(),
            config=SlotConfig(slot_size=2),
        )
        manager.start()
        yield manager
        manager.stop()
        store.close()


def test_replicas_share_tensors_but_not_modules(manager: SlotManager) -> None:
    a, b = (r.system.backend for r in manager._replicas)
    assert a.model is not b.model and a.dm.tokenizer is not b.dm.tokenizer
    assert a.merger is not b.merger

    def weights(backend: Any) -> dict[str, int]:
        """Every tensor but the experts (merged ones are per replica; lean originals stay on
        disk): where it lives."""
        return {
            name: p.data_ptr()
            for name, p in backend.model.named_parameters()
            if ".experts." not in name and ".mlp.expert." not in name
        }

    assert weights(a) == weights(b) and len(weights(a)) > 10


def test_late_feedback_for_an_evicted_slot_is_learned_with_its_own_decision(
    manager: SlotManager,
) -> None:
    [first] = manager.submit(TEXTS[:1]).result(timeout=120)
    slot = first.slot
    original = manager.ledger.decisions[slot]
    for _ in range(3):  # three boundaries later, the slot's decision is no longer in memory
        manager.close_slot()
    assert slot not in manager.ledger.decisions and manager.slot >= slot + 3
    n_before = len(manager.store.updates())
    manager.feedback(first.request_id, label=first.label)  # right: reward 1
    manager.close_slot()
    [update] = manager.store.updates()[n_before:]
    assert (update.slot, update.reward, update.n_feedback) == (slot, 1.0, 1)
    restored, _, memory = manager.ledger.decision_of(
        slot, open_slot=manager.slot, open_latency_ms=0.0
    )
    assert np.array_equal(restored.mix, original.mix)
    assert original.action is not None and restored.action is not None
    assert np.array_equal(restored.action, original.action)
    assert original.plan is not None and restored.plan is not None
    assert all(np.array_equal(restored.plan[k], original.plan[k]) for k in original.plan)
    assert memory > 0


def test_answers_carry_the_slot_that_served_them(manager: SlotManager) -> None:
    before = manager.store.count_requests()
    answers = [manager.submit([t]).result(timeout=120) for t in TEXTS]
    slots = [a[0].slot for a in answers]
    assert slots == sorted(slots)
    deadline = time.monotonic() + 120  # slots of 2 texts turn over (the boundary is async)
    while manager.slot == slots[0] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert manager.slot > slots[0]
    for a in answers:
        assert abs(float(a[0].probs.sum()) - 1.0) < 1e-4
        assert a[0].label == manager.labels[int(np.argmax(a[0].probs))]
    assert manager.store.count_requests() == before + len(TEXTS)
    served = {s: slots.count(s) for s in set(slots)}
    for s, n in served.items():
        assert manager.store.count_requests(s) >= n
