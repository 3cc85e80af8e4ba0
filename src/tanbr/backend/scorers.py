"""What "right" means for a task: one scorer per notion, each a score in [0, 1] per request.

``accuracy`` compares a classifier's label with the true label that comes back; ``proxy``
compares it with the full MoE's label on the same request, which needs no label at all (the
full MoE runs on a small budgeted sample, off the request path in the service). Adding a
scorer is one class and one line in :data:`SCORERS`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tanbr.backend.protocol import Backend, Scorer
from tanbr.backend.requests import Requests, Truth


class LabelAccuracy:
    """1 where the served label is the true label (the labels must come back)."""

    name = "accuracy"
    needs_truth = True

    def score(
        self, backend: Backend, requests: Requests, predictions: np.ndarray, truth: Truth | None
    ) -> np.ndarray:
        if truth is None:
            raise ValueError("the accuracy scorer needs the true labels of the requests")
        labels = np.asarray(truth.labels, dtype=np.int64)
        predictions = np.asarray(predictions, dtype=np.int64)
        if labels.shape != predictions.shape:
            raise ValueError(f"{predictions.shape} predictions for {labels.shape} true labels")
        return np.asarray(predictions == labels, dtype=np.float64)


class Agreement:
    """1 where the served label is the full MoE's label on the same request (label-free)."""

    name = "proxy"
    needs_truth = False

    def score(
        self, backend: Backend, requests: Requests, predictions: np.ndarray, truth: Truth | None
    ) -> np.ndarray:
        reference = np.asarray(backend.reference(requests), dtype=np.int64)
        return np.asarray(np.asarray(predictions, dtype=np.int64) == reference, dtype=np.float64)


SCORERS: dict[str, Callable[[], Scorer]] = {
    "accuracy": LabelAccuracy,
    "proxy": Agreement,
}


def make_scorer(name: str) -> Scorer:
    """The scorer registered as ``name``."""
    factory = SCORERS.get(name)
    if factory is None:
        raise ValueError(f"reward.kind must be one of {sorted(SCORERS)}, got {name!r}")
    return factory()
