"""The Ray controller's estimator reads the signatures the replicas send (no Ray needed: the
controller is a plain class that Ray runs as an actor)."""

from __future__ import annotations

import pickle
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tanbr.backend.requests import Requests
from tanbr.serve.ray_controller import Signed, SlotController
from tanbr.serve.replicas import ServeConfig
from tanbr.serve.slots import SlotConfig
from tanbr.serve.state import RequestRow

TEXTS = [
    "a warm and funny film",
    "stocks fell sharply today",
    "the senator spoke at length",
    "what a dull, lifeless script",
]


def _config(model: Path, folder: Path) -> ServeConfig:
    return ServeConfig(
        model=str(model),
        state_dir=folder / "state",
        slots=SlotConfig(slot_size=10_000, observe_max=16),
    )


@pytest.fixture
def controller(tiny_model: Path, tmp_path: Path) -> Iterator[SlotController]:
    c = SlotController(_config(tiny_model, tmp_path))
    c.open()
    try:
        yield c
    finally:
        c.stop()


def _spy(controller: SlotController, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Count the controller's own signature passes; keep what its estimator observes."""
    seen: dict[str, Any] = {"computed": 0, "observed": []}
    backend, estimator = controller.system.backend, controller.system.estimator
    compute, observe = backend.signatures, type(estimator).observe

    def signatures(requests: Requests) -> np.ndarray:
        seen["computed"] += len(requests)
        return compute(requests)

    def observed(self: Any, signatures: np.ndarray, **kw: Any) -> None:
        seen["observed"].append(np.array(signatures))
        observe(self, signatures, **kw)

    monkeypatch.setattr(backend, "signatures", signatures)
    # (on the class: the estimator is pickled into the snapshot at each boundary)
    monkeypatch.setattr(type(estimator), "observe", observed)
    return seen


def _rows(slot: int, n: int) -> list[RequestRow]:
    return [RequestRow(uuid.uuid4().hex, slot, "x", time.time()) for _ in range(n)]


def test_the_estimator_observes_the_signatures_a_replica_sent(
    controller: SlotController, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = TEXTS * 3
    sent = controller.system.backend.signatures(Requests(tuple(texts)))[::2] + 1.0  # marked
    seen = _spy(controller, monkeypatch)
    positions = tuple(range(0, len(texts), 2))
    controller.record(_rows(0, len(texts)), texts, [0] * len(texts), 5.0, Signed(positions, sent))
    assert controller.close_slot() == (0, 1)
    assert seen["computed"] == 0  # no estimator pass on the controller
    (observed,) = seen["observed"]
    np.testing.assert_array_equal(observed, sent)


def test_texts_without_signatures_are_signed_on_the_controller(
    controller: SlotController, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(After a restart, the slot's texts come back from the store without signatures.)"""
    seen = _spy(controller, monkeypatch)
    controller.record(_rows(0, len(TEXTS)), TEXTS, [0] * len(TEXTS), 5.0)
    controller.close_slot()
    assert seen["computed"] == len(TEXTS)
    assert [len(o) for o in seen["observed"]] == [len(TEXTS)]


def test_malformed_signatures_are_refused_by_name(
    controller: SlotController, monkeypatch: pytest.MonkeyPatch
) -> None:
    bad = np.full((2, 3), np.nan)
    controller.record(_rows(0, 2), TEXTS[:2], [0, 0], 5.0, Signed((0, 1), bad))
    with pytest.raises(RuntimeError, match="signatures: expected 2 finite rows"):
        controller.close_slot()


def test_a_restarted_controller_resumes_the_learning_state(
    tiny_model: Path, tmp_path: Path
) -> None:
    """The estimator and the policy come back from the snapshot, as they were at the last
    boundary, with the slot and the feedback watermark."""
    config = _config(tiny_model, tmp_path)
    first = SlotController(config)
    first.open()
    try:
        rows = _rows(0, len(TEXTS))
        first.record(rows, TEXTS, [0] * len(TEXTS), 5.0)
        first.feedback(rows[0].request_id, reward=1.0)
        first.close_slot()
    finally:
        first.stop()
    again = SlotController(config)
    again.open()
    try:
        assert again.status()["slot"] == 1 and again.pending_feedback() == 0
        assert again.ledger.updates == first.ledger.updates >= 1
        for part in ("estimator", "mode", "rng"):
            was, now = getattr(first.system, part), getattr(again.system, part)
            assert pickle.dumps(was) == pickle.dumps(now), part
    finally:
        again.stop()
