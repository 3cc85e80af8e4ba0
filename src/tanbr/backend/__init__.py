"""The seam between the online system and a model.

:class:`Backend` is what any MoE can do (signatures, gate probabilities, merge / soft merge /
restore, predict, memory, a weight-sharing replica); :class:`Scorer` is what a task means by
"right". :func:`open_backend` turns a :class:`BackendSpec` into a backend and its calibration
and test pools, whichever kind of model the folder holds. Names are re-exported lazily so that
importing this package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "Backend": "tanbr.backend.protocol",
    "Scorer": "tanbr.backend.protocol",
    "Prediction": "tanbr.backend.protocol",
    "Plan": "tanbr.backend.protocol",
    "Requests": "tanbr.backend.requests",
    "Truth": "tanbr.backend.requests",
    "Slot": "tanbr.backend.requests",
    "Pool": "tanbr.backend.requests",
    "SCORERS": "tanbr.backend.scorers",
    "make_scorer": "tanbr.backend.scorers",
    "BACKENDS": "tanbr.backend.registry",
    "BackendSpec": "tanbr.backend.registry",
    "open_backend": "tanbr.backend.registry",
    "choose_loader": "tanbr.backend.registry",
    "serving_backend": "tanbr.backend.registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tanbr.backend' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
