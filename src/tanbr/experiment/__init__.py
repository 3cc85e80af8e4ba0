"""The online system: workloads, task-mix estimation, the slot loop, experiments and reports.

The slot loop lives in :mod:`tanbr.experiment.loop` (``run_slot`` and its phase functions, also
used by the HTTP service). Names are re-exported lazily so that importing a CLI module of this
package stays cheap (the command line imports heavy modules only when a command runs).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # slot values
    "Requests": "tanbr.backend.requests",
    "Truth": "tanbr.backend.requests",
    "Slot": "tanbr.backend.requests",
    # the loop
    "Backend": "tanbr.backend.protocol",
    "TaskEstimator": "tanbr.experiment.loop",
    "Mode": "tanbr.experiment.loop",
    "Choice": "tanbr.experiment.loop",
    "Labelling": "tanbr.experiment.loop",
    "System": "tanbr.experiment.loop",
    "Decision": "tanbr.experiment.loop",
    "Served": "tanbr.experiment.loop",
    "Prediction": "tanbr.backend.protocol",
    "Plan": "tanbr.backend.protocol",
    "decide": "tanbr.experiment.loop",
    "apply_decision": "tanbr.experiment.loop",
    "serve": "tanbr.experiment.loop",
    "observe": "tanbr.experiment.loop",
    "feedback": "tanbr.experiment.loop",
    "flush_feedback": "tanbr.experiment.loop",
    "score": "tanbr.experiment.loop",
    "run_slot": "tanbr.experiment.loop",
    # reward, records
    "Outcomes": "tanbr.experiment.reward",
    "RewardFn": "tanbr.experiment.reward",
    "SlotRecord": "tanbr.experiment.records",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tanbr.experiment' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
