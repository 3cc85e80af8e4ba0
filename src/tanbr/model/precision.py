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

    ``auto`` picks bfloat16 where the CPU has AMX tiles, where oneDNN's bfloat16 products run
    about twice as fast as float32 ones, and float32 elsewhere. AVX512-BF16 alone is not enough:
    on such a CPU (no AMX) a bfloat16 linear layer of the default model's shape took 1.7x the
    float32 time and the demo's whole served path 1.6x (docs/experiment.md).
    """
    if name not in DTYPES:
        raise ValueError(f"model.dtype must be one of {DTYPES}, got {name!r}")
    if name == "auto":
        name = "bfloat16" if fast_bfloat16() else "float32"
    return torch.bfloat16 if name == "bfloat16" else torch.float32


def fast_bfloat16() -> bool:
    """Whether bfloat16 products beat float32 ones on this CPU: AMX tiles with oneDNN's
    bfloat16 kernels."""
    try:
        amx = bool(torch.cpu._is_amx_tile_supported())
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
    return amx and onednn


def in_dtype(module: M, dtype: torch.dtype) -> M:
    """``module`` itself when its parameters are already ``dtype``, else a cast deep copy (the
    original keeps serving in its own precision, e.g. for the float32 lower-state cache)."""
    current = next(module.parameters(), None)
    if current is None or current.dtype == dtype:
        return module
    cast = copy.deepcopy(module)
    cast.to(dtype)
    return cast
