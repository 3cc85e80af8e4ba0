"""Task-aware RegMean: one RegMean merge per point of the task simplex, solved per decision.

Static RegMean (:mod:`tanbr.model.regmean`) merges each linear map of a block's experts as

    W* = (sum_e W_e G~_e) (sum_e G~_e)^-1

from Gram matrices taken over every calibration token. Here the calibration requests are split
by the task type the estimator assigns them (label-free), and for each type k, block and map
only two sums are kept, token-normalised:

    A_k = (1 / n_k) sum_e G~_{e,k},    B_k = (1 / n_k) sum_e W_e G~_{e,k},

``G~_{e,k}`` the shrunk augmented Gram matrix of the type-k tokens the router sends to expert
e, ``n_k`` the type's calibration tokens (each counted once, whatever its top-k). An action a
on the K-simplex then merges every map as

    W*(a) = (sum_k a_k B_k) (sum_k a_k A_k)^-1,

solved (never inverted) with the singular / ridge handling of static RegMean. Since
G~ is linear in G, ``W*(a)`` is exactly RegMean on the calibration tokens re-weighted so that
type k's tokens carry a total weight a_k: a vertex is RegMean on that type's tokens alone, and
``a_k = n_k / sum_j n_j`` is static RegMean on all of them. Parameters in no linear map take
the experts' plain average, as in static RegMean (the action does not change them).

Precision: the statistics are accumulated in float64, as static RegMean's, and kept in
float32 by default: half the memory, and a solve about twice as fast (a map whose mixed
``A`` is too ill-conditioned for single precision is solved again in float64, see
:func:`~tanbr.model.regmean.solve_merge`). Keep them in float64 (``dtype``) to get RegMean's
exact limits to rounding.

Memory: per type, block and map ``A_k`` is ``(d', d')`` and ``B_k`` ``(out, d')``
(``d' = d + 1`` with a bias); the per-expert Gram matrices of one type at a time exist only
while that type's statistics are accumulated (:func:`task_regmean_stats`), as in static
RegMean.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from tanbr.model.coeffs import MergedWeights
from tanbr.model.discovery import MoEBlock
from tanbr.model.regmean import (
    LinearMap,
    augmented_weights,
    regmean_grams,
    shrunk_sums,
    solve_merge,
    unpack_map,
)
from tanbr.model.static_merges import Batches, check_unit, plain_average, stacked_experts

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, eq=False)
class TypeStats:
    """One block's per-type RegMean statistics (K task types).

    ``a[map]`` (K, d', d') and ``b[map]`` (K, out, d'): the token-normalised sums A_k, B_k of
    every linear map (float32 or float64: the solve runs in their dtype); ``w_sum[map]``
    (out, d'): ``sum_e [W_e, b_e]``, what the ridge pulls the unspanned directions towards;
    ``averages``: the plain average of each target in no linear map; ``tokens`` (K,): each
    type's calibration tokens n_k that reached the block's experts (0: the type had none, and
    its A_k, B_k are those of all the calibration tokens).
    """

    block: MoEBlock
    maps: tuple[LinearMap, ...]
    a: Mapping[str, torch.Tensor]
    b: Mapping[str, torch.Tensor]
    w_sum: Mapping[str, torch.Tensor]
    averages: Mapping[str, torch.Tensor]
    tokens: np.ndarray
    alpha: float

    @property
    def n_types(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        """Bytes of the per-type sums A_k and B_k (what grows with K)."""
        return sum(self.a[m.name].nbytes + self.b[m.name].nbytes for m in self.maps)


def group_by_type(items: Sequence[T], assign: np.ndarray, n_types: int) -> list[list[T]]:
    """``items`` split by their task type (``assign[i]`` in [0, n_types)), in order."""
    assign = np.asarray(assign)
    if assign.shape != (len(items),) or not np.issubdtype(assign.dtype, np.integer):
        raise ValueError(
            f"assign must be ({len(items)},) integer task types, one per request, got "
            f"{assign.dtype} {assign.shape}"
        )
    if n_types < 1:
        raise ValueError(f"the number of task types must be >= 1, got {n_types}")
    if len(assign) and (assign.min() < 0 or assign.max() >= n_types):
        raise ValueError(f"task types must be in [0, {n_types}), got {sorted(set(assign))}")
    return [[items[int(i)] for i in np.flatnonzero(assign == k)] for k in range(n_types)]


@torch.no_grad()
def task_regmean_stats(
    model: nn.Module,
    blocks: Sequence[MoEBlock],
    batches_by_type: Sequence[Batches],
    *,
    alpha: float = 0.9,
    dtype: torch.dtype = torch.float32,
) -> dict[str, TypeStats]:
    """Every block's per-type statistics from unlabeled calibration batches grouped by type.

    ``batches_by_type[k]``: the batches of the calibration requests assigned to type k (may be
    empty). Each type's batches run through the full MoE once (:func:`regmean_grams`, the
    accumulation of static RegMean, float64), are reduced to A_k, B_k, and their per-expert
    Gram matrices dropped before the next type. ``alpha``: RegMean's off-diagonal shrinkage,
    fixed here (it is inside A_k and B_k). ``dtype``: what the sums are kept (and solved) in.
    """
    alpha = check_unit("alpha", alpha, high=1.0)
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"task-aware RegMean keeps float32 or float64 statistics, got {dtype}")
    n_types = len(batches_by_type)
    if n_types < 1:
        raise ValueError("task-aware RegMean needs at least one task type")
    start = time.perf_counter()
    stacked = {b.name: stacked_experts(model, b) for b in blocks}
    weights: dict[str, dict[str, torch.Tensor]] = {b.name: {} for b in blocks}
    sums: dict[str, dict[str, list[tuple[torch.Tensor, torch.Tensor] | None]]] = {
        b.name: {} for b in blocks
    }
    maps: dict[str, tuple[LinearMap, ...]] = {}
    tokens = {b.name: np.zeros(n_types, dtype=np.int64) for b in blocks}
    for k, batches in enumerate(batches_by_type):
        batches = list(batches)
        if not batches:
            continue
        grams = regmean_grams(model, blocks, batches)
        for block in blocks:
            g = grams[block.name]
            n = g.n_tokens if g.n_tokens is not None else int(g.tokens.sum())
            tokens[block.name][k] = n
            maps[block.name] = g.maps
            if n == 0:
                continue
            for m in g.maps:
                if m.name not in weights[block.name]:
                    weights[block.name][m.name] = augmented_weights(m, stacked[block.name])
                s_a, s_b = shrunk_sums(m, weights[block.name][m.name], g.grams[m.name], alpha)
                parts = sums[block.name].setdefault(m.name, [None] * n_types)
                parts[k] = ((s_a / n).to(dtype), (s_b / n).to(dtype))
        del grams
    out: dict[str, TypeStats] = {}
    for block in blocks:
        n_k = tokens[block.name]
        if not n_k.any():
            raise ValueError(
                f"block {block.name!r}: no calibration token of any task type reached its "
                "experts; pass requests that run through it"
            )
        empty = np.flatnonzero(n_k == 0).tolist()
        if empty:
            logger.warning(
                "task-aware RegMean block %r: task type(s) %s have no calibration token; they "
                "get the statistics of all the calibration tokens",
                block.name,
                empty,
            )
        a_maps: dict[str, torch.Tensor] = {}
        b_maps: dict[str, torch.Tensor] = {}
        for m in maps[block.name]:
            parts = sums[block.name][m.name]
            a_maps[m.name] = _fill([None if p is None else p[0] for p in parts], n_k)
            b_maps[m.name] = _fill([None if p is None else p[1] for p in parts], n_k)
            sums[block.name][m.name] = []  # one copy of the sums at a time
        in_maps = {m.weight for m in maps[block.name]}
        in_maps |= {m.bias for m in maps[block.name] if m.bias is not None}
        averages = {
            t.name: plain_average(stacked[block.name][t.name])
            for t in block.targets
            if t.name not in in_maps
        }
        out[block.name] = TypeStats(
            block=block,
            maps=maps[block.name],
            a=a_maps,
            b=b_maps,
            w_sum={name: w.sum(dim=0).to(dtype) for name, w in weights[block.name].items()},
            averages=averages,
            tokens=n_k.copy(),
            alpha=alpha,
        )
    logger.info(
        "task-aware RegMean statistics of %d task types in %.2f s: %.1f MB",
        n_types,
        time.perf_counter() - start,
        sum(s.nbytes for s in out.values()) / 1e6,
    )
    return out


def _fill(parts: list[torch.Tensor | None], tokens: np.ndarray) -> torch.Tensor:
    """(K, ...) the types' normalised sums; a type without tokens gets those of all the
    tokens, ``sum_k n_k X_k / sum_k n_k``."""
    present = [(p, float(n)) for p, n in zip(parts, tokens, strict=True) if p is not None]
    overall: torch.Tensor | None = None
    if len(present) < len(parts):
        total = sum(n for _, n in present)
        overall = torch.zeros_like(present[0][0])
        for p, n in present:
            overall.add_(p, alpha=n / total)
    return torch.stack([p if p is not None else overall for p in parts])  # type: ignore[misc]


def check_action(action: np.ndarray, n_types: int) -> np.ndarray:
    """An action on the K-simplex as float64, or a ValueError that says what is wrong."""
    a = np.asarray(action, dtype=np.float64)
    if a.shape != (n_types,):
        raise ValueError(f"action must have shape ({n_types},), got {a.shape}")
    if not np.isfinite(a).all() or (a < -1e-9).any() or abs(a.sum() - 1.0) > 1e-6:
        raise ValueError(f"action must lie on the simplex, got {np.round(a, 4).tolist()}")
    a = np.clip(a, 0.0, None)
    return np.asarray(a / a.sum())


@torch.no_grad()
def task_regmean_solve(
    stats: TypeStats, action: np.ndarray, *, ridge: float = 1e-6
) -> dict[str, torch.Tensor]:
    """Every target of the block merged for ``action`` (K,) on the simplex, in the
    statistics' dtype: ``W*(a) = (sum_k a_k B_k)(sum_k a_k A_k)^-1`` per linear map, the plain
    average elsewhere.
    """
    ridge = check_unit("ridge", ridge)
    action = check_action(action, stats.n_types)
    block = stats.block
    out: dict[str, torch.Tensor] = {}
    for m in stats.maps:
        a_k, b_k = stats.a[m.name], stats.b[m.name]
        a = torch.from_numpy(action).to(a_k.dtype)
        mix_a = (a @ a_k.flatten(1)).view(a_k.shape[1:])  # (d', d'), one pass over the K sums
        mix_b = (a @ b_k.flatten(1)).view(b_k.shape[1:])  # (out, d')
        where = f"task-aware RegMean block {block.name!r} target {m.weight!r}"
        merged = solve_merge(
            where, mix_a, mix_b, stats.w_sum[m.name], block.n_experts, ridge, exact_check=False
        )
        weight, bias = unpack_map(m, merged)
        out[m.weight] = weight
        if m.bias is not None and bias is not None:
            out[m.bias] = bias
    out.update(stats.averages)
    return out


def task_regmean_merge(
    stats: TypeStats, action: np.ndarray, *, ridge: float = 1e-6
) -> MergedWeights:
    """The block's merged expert for ``action``, in the block's dtype; ``build_ms`` is the
    time the solve took (charged to the merge that installs it)."""
    t0 = time.perf_counter()
    solved = task_regmean_solve(stats, action, ridge=ridge)
    block = stats.block
    tensors = {t.name: solved[t.name].to(block.dtype) for t in block.targets}
    return MergedWeights(tensors, "task-regmean", build_ms=(time.perf_counter() - t0) * 1e3)
