"""The arithmetic of a merge: ``dst = sum_i c_i src_i`` over expert tensors, near memory speed.

A merge reads every active expert once and writes the merged tensor once; the cost to beat is
a plain copy of the bytes it reads. Two ways to compute the sum, chosen per call:

* **one matrix product per chunk** (``c (1, k) @ S (k, n)``) when the k sources are equally
  spaced views of one storage, as the rows of an expert tensor fused over experts are (in
  memory, or memory-mapped from a fused tensor on disk): every byte is read once and the sum
  stays in registers. BLAS may hand such a product to its thread pool, and a pool woken while
  another process holds the other core stalls for milliseconds per call (measured: 2.9 s for
  what takes 11 ms serially), so this way is taken only when the calling thread's torch, and
  with it MKL, runs single-threaded;
* **a chain of in-place multiply-adds** otherwise (``acc = c_0 s_0``, then ``acc += c_i s_i``),
  one chunk at a time so that the accumulator stays in cache while every source streams
  through it. With more than one torch thread each kernel holds at most torch's parallel grain
  size (32768 elements), so it runs in the calling thread too.

Half-precision weights are converted to float32 (exactly), summed in float32 and rounded once.
The two ways differ only in float rounding (the order of the sum), and for given sources,
layout and thread setting the result is always the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch

GRAIN = 1 << 15  # torch's parallel grain size: a kernel this small never wakes the thread pool
SERIAL_CHUNK = 1 << 17  # chain chunk when torch runs single-threaded (fewer kernel launches)
PRODUCT_CHUNK = 1 << 15  # columns per matrix product: k x n float32 stays in the L2 cache

Terms = Sequence[tuple[float, torch.Tensor]]


def accumulate(dst: torch.Tensor, terms: Terms) -> None:
    """``dst = sum_i c_i * src_i`` for contiguous sources of ``dst``'s shape (any float dtype).

    Runs every kernel in the calling thread (see the module docstring).
    """
    if not terms:
        raise ValueError("accumulate needs at least one (coefficient, tensor) term")
    if dst.is_inference() and not torch.is_inference_mode_enabled():
        # the first merge ran under inference_mode (a serving thread); re-merging in place
        # into its tensors is only allowed back inside that mode
        with torch.inference_mode():
            accumulate(dst, terms)
        return
    for _, src in terms:
        if src.numel() != dst.numel():
            raise ValueError(f"a source has {src.numel()} elements, the target {dst.numel()}")
    compute = torch.float64 if dst.dtype == torch.float64 else torch.float32
    serial = torch.get_num_threads() == 1
    stacked = stacked_view(terms) if serial else None
    if stacked is not None:
        _by_products(dst, [c for c, _ in terms], stacked, compute)
    else:
        _by_chain(dst, terms, compute, SERIAL_CHUNK if serial else GRAIN)


def stacked_view(terms: Terms) -> torch.Tensor | None:
    """The sources as one strided (k, n) view of their common storage, or None.

    Possible when all sources are contiguous, of one dtype and size, in one storage, at
    offsets in arithmetic progression that do not overlap (an expert tensor fused over
    experts, the active experts equally spaced).
    """
    sources = [s for _, s in terms]
    first = sources[0]
    n = first.numel()
    storage = first.untyped_storage().data_ptr()
    for s in sources:
        if (
            not s.is_contiguous()
            or s.dtype != first.dtype
            or s.numel() != n
            or s.untyped_storage().data_ptr() != storage
        ):
            return None
    offsets = [s.storage_offset() for s in sources]
    step = offsets[1] - offsets[0] if len(offsets) > 1 else n
    if step < n or any(b - a != step for a, b in pairwise(offsets)):
        return None
    return first.as_strided((len(sources), n), (step, 1))


def _by_products(
    dst: torch.Tensor, coeffs: list[float], stacked: torch.Tensor, compute: torch.dtype
) -> None:
    """One ``(1, k) @ (k, n)`` product per chunk of columns (serial callers only)."""
    k, n = stacked.shape
    width = min(PRODUCT_CHUNK, n)
    c = torch.tensor([coeffs], dtype=compute)  # (1, k)
    d_flat = dst.view(-1)
    # sources in another dtype are converted chunk by chunk; so is the result
    scratch = None if stacked.dtype == compute else torch.empty(k, width, dtype=compute)
    acc = None if dst.dtype == compute else torch.empty(1, width, dtype=compute)
    for a in range(0, n, width):
        w = min(width, n - a)
        src = stacked[:, a : a + w]
        if scratch is not None:
            converted = scratch[:, :w]
            converted.copy_(src)
            src = converted
        out = d_flat[a : a + w].view(1, w) if acc is None else acc[:, :w]
        torch.matmul(c, src, out=out)
        if acc is not None:
            d_flat[a : a + w].copy_(out.view(-1))


def _by_chain(dst: torch.Tensor, terms: Terms, compute: torch.dtype, chunk: int) -> None:
    """``acc = c_0 s_0; acc += c_i s_i`` one cache-sized chunk at a time."""
    d_chunks = torch.split(dst.view(-1), chunk)
    sources = [(c, torch.split(s.reshape(-1), chunk)) for c, s in terms]
    (c0, first), rest = sources[0], sources[1:]
    direct = dst.dtype == compute and all(s.dtype == compute for _, s in terms)
    if direct:
        for i, d in enumerate(d_chunks):
            torch.mul(first[i], c0, out=d)
            for c, s in rest:
                d.add_(s[i], alpha=c)
        return
    size = min(chunk, dst.numel())
    scratch = torch.empty(size, dtype=compute)
    # a source in another dtype is converted (exactly) into a reused buffer first: a mixed-dtype
    # add would allocate that buffer for every chunk (8% of a bfloat16 merge, measured)
    convert = (
        torch.empty(size, dtype=compute) if any(s.dtype != compute for _, s in terms) else None
    )
    for i, d in enumerate(d_chunks):
        n = d.numel()
        acc = scratch if n == size else scratch[:n]
        acc.copy_(first[i]).mul_(c0)
        for c, s in rest:
            src = s[i]
            if convert is not None and src.dtype != compute:
                src = (convert if n == size else convert[:n]).copy_(src)
            acc.add_(src, alpha=c)
        d.copy_(acc)
