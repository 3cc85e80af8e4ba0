"""Serving precision: which torch dtype a model runs in on this CPU."""

from __future__ import annotations

import copy
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)

DTYPES = ("float32", "bfloat16", "auto")


def serving_dtype(name: str) -> torch.dtype:
    """The torch dtype for a serving-precision name.

    ``auto`` picks bfloat16 where oneDNN has fast bfloat16 kernels (AMX, AVX512-BF16), where
    the merged layers run several times faster than in float32, and float32 elsewhere, where
    bfloat16 is emulated and slower.
    """
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be one of {DTYPES}, got {name!r}")
    if name == "auto":
        try:
            fast = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            fast = False
        name = "bfloat16" if fast else "float32"
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def in_dtype(module: M, dtype: torch.dtype) -> M:
    """``module`` itself when its parameters are already ``dtype``, else a cast deep copy (the
    original keeps serving in its own precision, e.g. for the float32 lower-state cache)."""
    current = next(module.parameters(), None)
    if current is None or current.dtype == dtype:
        return module
    cast = copy.deepcopy(module)
    cast.to(dtype)
    return cast
