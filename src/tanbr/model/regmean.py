"""RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models")
for the experts of an MoE block.

For a linear map ``y = x W^T + b`` of the experts, RegMean picks the merged W that minimises
``sum_e || X_e W^T - X_e W_e^T ||^2``, X_e the inputs expert e receives: the merged map is as
close as a single map can be to every expert on that expert's own inputs. With the Gram
matrices ``G_e = X_e^T X_e`` the solution is

    W* = (sum_e W_e G~_e) (sum_e G~_e)^-1,    G~_e = alpha G_e + (1 - alpha) diag(G_e),

where the off-diagonal shrinkage alpha < 1 is RegMean's regulariser (alpha = 1 is the exact
least-squares merge; alpha = 0 a per-input-feature weighting). A bias is the weight of an
input fixed at 1: the input is ``[x, 1]`` and ``[W, b]`` is solved for at once.

Which inputs: X_e are the tokens the block's router sends to expert e in the full MoE (its own
top-k choice, :class:`~tanbr.model.static_merges.RoutingTap`). The merged expert stands in for
each expert on the tokens that expert serves, so those are the inputs on which it must agree
with it; tokens the router never sends to e say nothing about e's job, and giving every expert
all tokens would give them all one Gram matrix, which turns the merge of the up projection
into the plain average. The Gram matrices are unweighted (RegMean's own objective), not
scaled by the router's combine weights.

Which maps: the up (or gate_up) projection, whose input is the block's input, and the down
projection, whose input is each expert's own intermediate activation ``act(gate) * up`` (or
``act(up)``) on its tokens; in a per-expert layout every ``nn.Linear`` inside an expert module,
its input captured while the expert runs on its own tokens. An expert parameter in no linear
map (a norm inside an expert module) gets the plain average. Gate and up halves of a fused
``gate_up_proj`` share their input, so the whole matrix is solved at once, whatever its row
order (``[gate; up]`` or interleaved); transposed layouts are solved as ``W^T``.

Where it is approximate for an MoE: the merged down projection sees the merged intermediate
activation ``act(gate* x) * (up* x)``, not each expert's own, on which its Gram matrices were
taken; and the merged expert runs on every token with weight 1 where the MoE mixed k experts
with the router's weights. RegMean is exact per linear map, not for the expert as a whole.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tanbr.model.coeffs import MergedWeights
from tanbr.model.discovery import FUSED_GATED, MoEBlock, get_module
from tanbr.model.static_merges import (
    Batches,
    RoutingTap,
    check_calibration_model,
    check_unit,
    eval_mode,
    expert_members,
    plain_average,
    run_batches,
    stacked_experts,
)

logger = logging.getLogger(__name__)

RCOND = 1e-10  # sum G~ counts as singular below this ratio of its smallest to largest eigenvalue
#: A float32 solve is trusted down to this bound of the eigenvalue ratio (single precision's
#: error grows with the condition number); below it the map is solved again in float64.
RCOND_FLOAT32 = 1e-6


@dataclass(frozen=True)
class LinearMap:
    """One linear map of an expert: ``y = x W^T + b``, with where its weights are stored.

    ``name`` keys its Gram matrices; ``weight`` / ``bias`` are targets of the block (``bias``
    None when the map has none); ``transposed`` when the weight is stored (in, out).
    """

    name: str
    weight: str
    bias: str | None
    transposed: bool
    in_features: int


@dataclass(frozen=True)
class Grams:
    """One block's calibration statistics: per linear map, each expert's augmented Gram matrix
    ``sum_x [x, 1] [x, 1]^T`` over its routed tokens, ``(E, d + 1, d + 1)`` float64."""

    block: str
    maps: tuple[LinearMap, ...]
    grams: Mapping[str, torch.Tensor]
    tokens: torch.Tensor  # (E,) int64: calibration tokens routed to each expert
    #: calibration tokens that reached the block's experts, each counted once whatever its
    #: top-k (None when not counted: Grams built by hand)
    n_tokens: int | None = None


def linear_maps(model: nn.Module, block: MoEBlock) -> tuple[LinearMap, ...]:
    """The linear maps of one expert of ``block`` (fused: up and down; per-expert: every
    ``nn.Linear`` of the expert module whose weight is a target)."""
    targets = {t.name: t.shape for t in block.targets}
    if block.fused:
        up = "gate_up_proj" if block.layout == FUSED_GATED else "up_proj"
        maps = []
        for name in (up, "down_proj"):
            shape = targets[name]
            bias = f"{name}_bias" if f"{name}_bias" in targets else None
            d_in = shape[0] if block.is_transposed else shape[1]
            maps.append(LinearMap(name, name, bias, block.is_transposed, d_in))
        return tuple(maps)
    maps = []
    for name, module in expert_members(model, block)[0].named_modules():
        if not isinstance(module, nn.Linear) or f"{name}.weight" not in targets:
            continue
        bias = f"{name}.bias" if f"{name}.bias" in targets else None
        maps.append(LinearMap(name, f"{name}.weight", bias, False, module.in_features))
    return tuple(maps)


class _GramAccumulator:
    """Adds each expert's routed tokens to its Gram matrices (the visit of a RoutingTap)."""

    def __init__(self, model: nn.Module, blocks: Sequence[MoEBlock]) -> None:
        self.model = model
        self.maps = {b.name: linear_maps(model, b) for b in blocks}
        self.grams = {
            b.name: {
                m.name: torch.zeros(
                    b.n_experts, m.in_features + 1, m.in_features + 1, dtype=torch.float64
                )
                for m in self.maps[b.name]
            }
            for b in blocks
        }
        self.tokens = {b.name: torch.zeros(b.n_experts, dtype=torch.int64) for b in blocks}
        self.n_tokens = {b.name: 0 for b in blocks}

    def add(self, block: str, name: str, e: int, x: torch.Tensor) -> None:
        a = x.detach().reshape(-1, x.shape[-1]).double()
        a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)  # [x, 1]
        self.grams[block][name][e].addmm_(a.T, a)

    @torch.no_grad()
    def __call__(self, block: MoEBlock, x: torch.Tensor, hit: torch.Tensor) -> None:
        counts = hit.sum(dim=0)
        self.tokens[block.name] += counts
        self.n_tokens[block.name] += int(hit.any(dim=1).sum())
        for e in torch.nonzero(counts).flatten().tolist():
            xe = x[hit[:, e].to(x.device)]
            if block.fused:
                self._fused(block, e, xe)
            else:
                self._per_expert(block, e, xe)

    def _fused(self, block: MoEBlock, e: int, x: torch.Tensor) -> None:
        up, down = self.maps[block.name]
        self.add(block.name, up.name, e, x)
        self.add(block.name, down.name, e, fused_intermediate(self.model, block, e, x))

    def _per_expert(self, block: MoEBlock, e: int, x: torch.Tensor) -> None:
        expert = expert_members(self.model, block)[e]
        handles = []
        for m in self.maps[block.name]:

            def grab(module: nn.Module, args: tuple[torch.Tensor, ...], name: str = m.name) -> None:
                self.add(block.name, name, e, args[0])

            handles.append(expert.get_submodule(m.name).register_forward_pre_hook(grab))
        try:
            expert(x)
        finally:
            for h in handles:
                h.remove()


def fused_intermediate(model: nn.Module, block: MoEBlock, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e's intermediate activation (the down projection's input) for tokens x (N, H),
    computed as the merged expert computes it (the experts' own gating or activation)."""
    experts = get_module(model, block.experts_name)
    up_name = "gate_up_proj" if block.layout == FUSED_GATED else "up_proj"
    w = experts.get_parameter(up_name)[e]
    b = experts.get_parameter(f"{up_name}_bias")[e] if block.has_bias else None
    if block.is_transposed:  # w (in, out)
        h = x @ w
        h = h + b if b is not None else h
    else:
        h = F.linear(x, w, b)
    apply_gate = getattr(experts, "_apply_gate", None) if block.layout == FUSED_GATED else None
    if apply_gate is not None:  # the experts' own gating, as the merged expert runs it
        return apply_gate(h)  # type: ignore[no-any-return]
    act = experts.get_submodule("act_fn")
    if block.layout != FUSED_GATED:
        return act(h)  # type: ignore[no-any-return]
    g, u = h.chunk(2, dim=-1)
    return act(g) * u  # type: ignore[no-any-return]


@torch.no_grad()
def regmean_grams(
    model: nn.Module, blocks: Sequence[MoEBlock], batches: Batches
) -> dict[str, Grams]:
    """Run the calibration batches through the full MoE and collect every block's Grams."""
    check_calibration_model(model, blocks)
    acc = _GramAccumulator(model, blocks)
    with eval_mode(model), RoutingTap(model, blocks, acc) as tap:
        n = run_batches(model, batches, tap)
    logger.debug("RegMean statistics from %d calibration batches", n)
    return {
        b.name: Grams(
            b.name,
            acc.maps[b.name],
            dict(acc.grams[b.name]),
            acc.tokens[b.name],
            acc.n_tokens[b.name],
        )
        for b in blocks
    }


@torch.no_grad()
def regmean_merge(
    block: MoEBlock,
    stacked: Mapping[str, torch.Tensor],
    grams: Grams,
    *,
    alpha: float = 0.9,
    ridge: float = 1e-6,
) -> MergedWeights:
    """Merge one block's experts (target -> ``(E, *shape)``) with RegMean from its Grams.

    Solved in float64, cast to the block's dtype. When ``sum_e G~_e`` is singular (an input
    direction no routed token spans: a unit dead on every calibration token, or fewer tokens
    than inputs with alpha = 1), ``ridge * mean(diag) / E`` is added to every expert's G~, so
    the unspanned directions take the plain average, and a warning says so; with ``ridge=0``
    that is an error.
    """
    alpha = check_unit("alpha", alpha, high=1.0)
    ridge = check_unit("ridge", ridge)
    idle = [e for e, n in enumerate(grams.tokens.tolist()) if n == 0]
    if idle:
        logger.info(
            "RegMean block %r: expert(s) %s received no calibration token and do not enter "
            "the merge",
            block.name,
            idle,
        )
    out: dict[str, torch.Tensor] = {}
    for m in grams.maps:
        weight, bias = _solve_map(block, m, stacked, grams.grams[m.name], alpha, ridge)
        out[m.weight] = weight
        if m.bias is not None and bias is not None:
            out[m.bias] = bias
    for t in block.targets:
        if t.name not in out:  # a parameter in no linear map
            logger.info(
                "RegMean block %r: %r is in no linear map: plain average", block.name, t.name
            )
            out[t.name] = plain_average(stacked[t.name])
    return MergedWeights({t.name: out[t.name].to(block.dtype) for t in block.targets}, "regmean")


def _solve_map(
    block: MoEBlock,
    m: LinearMap,
    stacked: Mapping[str, torch.Tensor],
    gram: torch.Tensor,
    alpha: float,
    ridge: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[W, b]* = (sum_e [W_e, b_e] G~_e)(sum_e G~_e)^-1`` for one map, in float64."""
    w = augmented_weights(m, stacked)
    a, num = shrunk_sums(m, w, gram, alpha)
    where = f"RegMean block {block.name!r} target {m.weight!r}"
    merged = solve_merge(where, a, num, w.sum(dim=0), w.shape[0], ridge)
    return unpack_map(m, merged)


def augmented_weights(m: LinearMap, stacked: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Every expert's ``[W_e, b_e]`` of one map, ``(E, out, d')`` float64 (``d' = d + 1`` with
    a bias, the input ``[x, 1]``; ``d`` without)."""
    w = stacked[m.weight].double()  # (E, out, in) or (E, in, out)
    if m.transposed:
        w = w.transpose(1, 2)
    if m.bias is not None:
        w = torch.cat([w, stacked[m.bias].double().unsqueeze(-1)], dim=-1)  # (E, out, d + 1)
    return w


def shrunk_sums(
    m: LinearMap, w: torch.Tensor, gram: torch.Tensor, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_e G~_e, sum_e W_e G~_e)`` of one map from the experts' augmented Grams
    ``(E, d + 1, d + 1)`` and ``w`` from :func:`augmented_weights`: ``(d', d')`` and
    ``(out, d')``, float64, ``G~_e = alpha G_e + (1 - alpha) diag(G_e)``."""
    g = gram if m.bias is not None else gram[:, : m.in_features, : m.in_features]
    diag = torch.diagonal(g, dim1=1, dim2=2)  # (E, d')
    g = g * alpha  # G~_e = alpha G_e + (1 - alpha) diag(G_e), one (E, d', d') copy
    torch.diagonal(g, dim1=1, dim2=2).add_(diag, alpha=1.0 - alpha)
    return g.sum(dim=0), torch.einsum("eoi,eij->oj", w, g)


def solve_merge(
    where: str,
    a: torch.Tensor,
    num: torch.Tensor,
    w_sum: torch.Tensor,
    n_experts: int,
    ridge: float,
    *,
    exact_check: bool = True,
) -> torch.Tensor:
    """``num a^-1`` (a symmetric positive semi-definite ``(d', d')``, num ``(out, d')``), in
    float64, solved, never inverted.

    When ``a`` is singular, ``ridge * mean(diag a) / E`` is added to each of the ``n_experts``
    experts' G~ (``a + E lam I``, ``num + lam w_sum``, ``w_sum = sum_e [W_e, b_e]``), so the
    unspanned directions take the plain average, and a warning says so; with ``ridge=0`` that
    is an error. Singular means: the ratio of a's smallest to largest eigenvalue is at most
    :data:`RCOND` (``exact_check``, an eigendecomposition). Without ``exact_check`` (the
    per-slot solves of task-aware RegMean; about six times cheaper than the eigenvalues of a
    1537-wide map) it means: a's Cholesky factorisation ``L L^T`` fails, or
    ``(min_i L_ii / max_i L_ii)^2``, an upper bound of that eigenvalue ratio, is at most RCOND.
    The cheap test may pass a matrix the exact one calls singular (then solved as it is, in
    float64); on a matrix both pass, the two give the same solution up to rounding (the cheap
    one solves with the Cholesky factor it has, the exact one with an LU factorisation).

    float32 inputs without ``exact_check`` are solved in float32 (about twice as fast as
    float64) when the cheap test bounds the eigenvalue ratio above :data:`RCOND_FLOAT32`, and
    in float64 otherwise (the result is float32 either way).
    """
    if a.dtype == torch.float32:
        if not exact_check:
            factor, _, _ = _singular(a, False, rcond=RCOND_FLOAT32)
            if factor is not None:  # well-conditioned enough for single precision
                fast: torch.Tensor = torch.cholesky_solve(num.T, factor).T
                return fast
        wide = solve_merge(
            where,
            a.double(),
            num.double(),
            w_sum.double(),
            n_experts,
            ridge,
            exact_check=exact_check,
        )
        return wide.float()
    scale = float(torch.diagonal(a).mean())
    if not scale > 0.0:
        raise ValueError(
            f"{where}: no calibration token reached any expert of this block; pass batches "
            "that run through it"
        )
    factor, singular, span = _singular(a, exact_check)
    if singular:
        if ridge == 0.0:
            raise ValueError(
                f"{where}: the sum of the experts' Gram matrices is singular ({span}); pass "
                "ridge > 0 or more calibration tokens"
            )
        lam = ridge * scale / n_experts
        a = a + n_experts * lam * torch.eye(a.shape[0], dtype=a.dtype)
        num = num + lam * w_sum
        factor = None
        logger.warning(
            "%s: the sum of Gram matrices is singular (%s); added a ridge of %.3g to each "
            "expert's Gram matrix: the unspanned directions take the plain average",
            where,
            span,
            lam,
        )
    if factor is not None:  # the check's Cholesky factor solves it too
        solved: torch.Tensor = torch.cholesky_solve(num.T, factor).T
        return solved
    merged: torch.Tensor = torch.linalg.solve(a, num.T).T  # num a^-1 (a symmetric)
    return merged


def _singular(
    a: torch.Tensor, exact: bool, *, rcond: float = RCOND
) -> tuple[torch.Tensor | None, bool, str]:
    """Whether ``a`` counts as singular (eigenvalue ratio at most ``rcond``) and what is known
    of the span of its inputs; without ``exact``, also a's Cholesky factor (None when it has
    none or counts as singular)."""
    if exact:
        eig = torch.linalg.eigvalsh(a)
        if float(eig[0]) > rcond * float(eig[-1]):
            return None, False, ""
        rank = int((eig > rcond * eig[-1]).sum())
        return None, True, f"the routed inputs span {rank} of {a.shape[0]} dimensions"
    factor, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        return None, True, f"not positive definite, {a.shape[0]} dimensions"
    diag = torch.diagonal(factor)
    if float(diag.min()) ** 2 > rcond * float(diag.max()) ** 2:
        return factor, False, ""
    return None, True, f"ill-conditioned, {a.shape[0]} dimensions"


def unpack_map(m: LinearMap, merged: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A solved ``[W, b]`` ``(out, d')`` as the map stores it: ``(weight, bias or None)``."""
    d = m.in_features
    weight, bias = (merged[:, :d], merged[:, d]) if m.bias is not None else (merged, None)
    return (weight.T if m.transposed else weight), bias


def regmean_plan(
    model: nn.Module,
    blocks: Sequence[MoEBlock],
    batches: Batches,
    *,
    alpha: float = 0.9,
    ridge: float = 1e-6,
) -> dict[str, MergedWeights]:
    """RegMean merged weights for every block, from unlabeled calibration batches.

    Parameters
    ----------
    model
        The full MoE (not merged), its experts in memory (a lean model: ``Merger.restore()``).
    blocks
        The blocks to merge, e.g. ``merger.blocks``.
    batches
        Iterable of mappings, each run as ``model(**batch)``; an ``attention_mask`` (B, T) in
        a batch leaves padding out (see :mod:`tanbr.model.static_merges`).
    alpha
        Off-diagonal shrinkage of the Gram matrices, in [0, 1] (RegMean's default 0.9).
    ridge
        Relative size of the ridge added when the Gram matrices are singular (0: raise).

    Returns
    -------
    dict
        Block name -> :class:`~tanbr.model.coeffs.MergedWeights`, a plan for ``Merger.apply``.
    """
    alpha = check_unit("alpha", alpha, high=1.0)
    ridge = check_unit("ridge", ridge)
    start = time.perf_counter()
    grams = regmean_grams(model, blocks, batches)
    plan = {
        b.name: regmean_merge(b, stacked_experts(model, b), grams[b.name], alpha=alpha, ridge=ridge)
        for b in blocks
    }
    logger.info("RegMean merged %d blocks in %.2f s", len(blocks), time.perf_counter() - start)
    return plan
