"""Serving precision: which torch dtype a model runs in on this CPU."""

from __future__ import annotations

import torch

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
