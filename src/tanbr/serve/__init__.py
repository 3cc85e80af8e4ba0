"""The HTTP service: merges per slot and learns from feedback, on the experiment's loop.

``tanbr serve`` runs it (:mod:`tanbr.serve.cli_serve`); :func:`create_app` builds the FastAPI
app; :class:`SlotManager` groups requests into slots and swaps merged models between them;
:class:`StateStore` keeps what must survive a crash. Names are re-exported lazily so that the
command line stays fast (FastAPI and torch load only when a command runs).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "ServeConfig": "tanbr.serve.replicas",
    "Replicas": "tanbr.serve.replicas",
    "build_replicas": "tanbr.serve.replicas",
    "create_app": "tanbr.serve.app",
    "SlotConfig": "tanbr.serve.slots",
    "SlotManager": "tanbr.serve.slots",
    "ServiceBusyError": "tanbr.serve.slots",
    "StateStore": "tanbr.serve.state",
    "UnknownRequestError": "tanbr.serve.state",
    "DuplicateFeedbackError": "tanbr.serve.state",
    "ServiceMetrics": "tanbr.serve.metrics",
    "ServerProcess": "tanbr.serve.bench",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tanbr.serve' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
