"""What the HTTP app asks of whoever owns the slots: the in-process
:class:`~tanbr.serve.slots.SlotManager`, or a Ray Serve replica following its controller
(:class:`~tanbr.serve.ray_serve.ReplicaSlots`)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from typing import Any, Protocol

from tanbr.backend.protocol import Backend
from tanbr.serve.batcher import Answer
from tanbr.serve.ledger import Completion
from tanbr.serve.slots import Lease
from tanbr.serve.state import FeedbackRow


class SlotService(Protocol):
    labels: list[str]
    policy_name: str
    generative: bool  # a causal LM: requests go through the generation endpoints

    @property
    def slot(self) -> int: ...

    @property
    def failure(self) -> object | None:
        """Why the slot boundaries stopped (None while they work)."""
        ...

    def submit(self, texts: Sequence[str]) -> concurrent.futures.Future[list[Answer]]: ...

    def observe_latency(self, predict_ms: float) -> None: ...

    def feedback(
        self, request_id: str, *, label: str | None = None, reward: float | None = None
    ) -> FeedbackRow: ...

    def pending_feedback(self) -> int: ...

    def status(self) -> dict[str, Any]: ...

    def close_slot(self, *, reason: str = "admin") -> tuple[int, int]: ...

    def stop(self) -> None: ...


class GenerativeService(SlotService, Protocol):
    """A slot owner serving a causal LM: the generation engine pins each generation to the
    model copy serving when it starts, and records it when it ends."""

    @property
    def backend(self) -> Backend:
        """The model served (its checkpoint names the model for the OpenAI routes)."""
        ...

    def lease(self) -> Lease: ...

    def release(self, lease: Lease) -> None: ...

    def complete(self, completion: Completion, *, model_ms: float = 0.0) -> None: ...
