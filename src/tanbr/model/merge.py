"""Collapse every MoE block into one dense expert, swap it in, and restore the original.

For block l with coeffs c_l on the simplex over its E experts, every expert tensor is merged as
``W_l = sum_e c_{l,e} W_{l,e}`` (biases too), and the block is replaced by a
:class:`MergedBlock` that runs that single expert with the original activation (SwiGLU, GELU,
ReLU, ...) on every token, adds the always-on shared experts, and never calls the token gate.
The original block is kept aside, untouched, so :meth:`Merger.restore` gives bit-identical
logits. Re-merging for the next slot writes into the merged tensors in place: one merged copy
per block exists at a time and nothing is allocated.

The merge itself is a weighted accumulation, chunked so that the output rows stay in cache
while all experts stream through once: it reads each active expert once and writes the merged
tensor once, which is why it runs close to a plain memory copy of the experts (the floor).
"""

from __future__ import annotations

import copy
import difflib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from tanbr.model.discovery import (
    FUSED_GATED,
    MoEBlock,
    find_moe_blocks,
    get_module,
    parent_of,
)
from tanbr.model.gates import gate_probs, masked_mean
from tanbr.model.lean import ExpertSource, ModuleExpertSource, Pieces, split_rows

logger = logging.getLogger(__name__)

SUM_ATOL = 1e-5  # how far from 1 the coeffs of a block may sum (float32 rounding of policies)
_CHUNK_ELEMENTS = 1 << 15  # = torch's parallel grain size: each merge kernel runs serially
_SOFT_CHUNK_BYTES = 64 << 20  # per-sequence merged weights built at once by a soft merge


# --- coefficients -----------------------------------------------------------------------------


def validate_coeffs(coeffs: Any, n_experts: int, *, block: str = "") -> np.ndarray:
    """Check one block's coeffs and return them as float64 (E,), renormalised to sum 1.

    Raises
    ------
    ValueError
        Naming the block and the problem: not a 1-D array of E numbers, NaN or infinity,
        a negative weight, or a sum different from 1 (beyond ``SUM_ATOL``).
    """
    where = f" of block {block!r}" if block else ""
    try:
        arr = np.asarray(coeffs, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"coeffs{where} are not an array of numbers: {coeffs!r}") from err
    if arr.ndim != 1:
        raise ValueError(f"coeffs{where} must be 1-D (E,), got shape {arr.shape}")
    if arr.shape[0] != n_experts:
        raise ValueError(f"coeffs{where} have {arr.shape[0]} weights, the block has {n_experts}")
    if not np.isfinite(arr).all():
        raise ValueError(f"coeffs{where} contain NaN or infinity: {arr.tolist()}")
    if (arr < 0).any():
        raise ValueError(f"coeffs{where} must be non-negative, got {arr.tolist()}")
    total = float(arr.sum())
    if abs(total - 1.0) > SUM_ATOL:
        raise ValueError(f"coeffs{where} must sum to 1 (a point of the simplex), got {total:.6g}")
    return arr / total


def validate_plan(plan: Mapping[str, Any], blocks: Sequence[MoEBlock]) -> dict[str, np.ndarray]:
    """Check a plan (block name -> coeffs) against the model's blocks; every block is needed."""
    if not isinstance(plan, Mapping):
        raise ValueError(f"a plan maps block names to coeffs, got {type(plan).__name__}")
    known = {b.name: b for b in blocks}
    unknown = [k for k in plan if k not in known]
    if unknown:
        hint = difflib.get_close_matches(str(unknown[0]), list(known), n=1)
        near = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ValueError(
            f"plan names unknown block(s) {unknown}{near}; the model's blocks are "
            f"{list(known)[:4]}{' ...' if len(known) > 4 else ''}"
        )
    missing = [name for name in known if name not in plan]
    if missing:
        raise ValueError(f"plan has no coeffs for block(s) {missing}")
    return {name: validate_coeffs(plan[name], b.n_experts, block=name) for name, b in known.items()}


def uniform_plan(blocks: Sequence[MoEBlock]) -> dict[str, np.ndarray]:
    """Equal weight on every expert of every block."""
    return {b.name: np.full(b.n_experts, 1.0 / b.n_experts) for b in blocks}


def one_hot_plan(blocks: Sequence[MoEBlock], expert: int) -> dict[str, np.ndarray]:
    """All weight on one expert index in every block."""
    plan = {}
    for b in blocks:
        if not 0 <= expert < b.n_experts:
            raise ValueError(
                f"expert must be in [0, {b.n_experts}) for block {b.name!r}, got {expert}"
            )
        plan[b.name] = np.eye(b.n_experts)[expert]
    return plan


# --- merged modules ---------------------------------------------------------------------------


class FusedExpert(nn.Module):
    """One dense expert in the fused layout: ``down(act(up x))`` or ``down(act(g x) * u x)``."""

    act_fn: nn.Module | None
    apply_gate: Callable[[torch.Tensor], torch.Tensor] | None
    post_norm: nn.Module | None

    def __init__(self, block: MoEBlock, experts: nn.Module, tensors: Mapping[str, torch.Tensor]):
        super().__init__()
        self.gated = block.layout == FUSED_GATED
        self.transposed = block.is_transposed
        self.up_name = "gate_up_proj" if self.gated else "up_proj"
        for name, t in tensors.items():
            self.register_parameter(name, nn.Parameter(t, requires_grad=False))
        act = getattr(experts, "act_fn", None)
        self.act_fn = act if isinstance(act, nn.Module) else None
        # the original gating (split + act * up, or a model's own variant) of the experts module
        self.apply_gate = getattr(experts, "_apply_gate", None) if self.gated else None
        norm = getattr(experts, "post_expert_norm", None)
        self.post_norm = norm if getattr(experts, "has_post_expert_norm", False) else None

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        w: torch.Tensor = getattr(self, name)
        b: torch.Tensor | None = getattr(self, name + "_bias", None)
        if self.transposed:  # w (in, out)
            y = x @ w
            return y + b if b is not None else y
        return F.linear(x, w, b)  # w (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, H) -> (N, H)
        h = self._linear(x, self.up_name)  # (N, 2I) or (N, I)
        if self.apply_gate is not None:  # the experts' own gating (act(gate) * up, or a variant)
            h = self.apply_gate(h)  # (N, I)
        elif self.act_fn is None:
            raise RuntimeError("merged expert has neither a gating function nor an activation")
        elif self.gated:
            g, u = h.chunk(2, dim=-1)
            h = self.act_fn(g) * u  # (N, I)
        else:
            h = self.act_fn(h)
        y = self._linear(h, "down_proj")  # (N, H)
        return self.post_norm(y) if self.post_norm is not None else y


class _BlockShell(nn.Module):
    """What merged and soft blocks share: the kept gate, shared experts, output scaling."""

    def __init__(self, block: MoEBlock, original: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "merged_from", original)  # not a submodule: not walked/counted
        self.block_name = block.name
        self.outputs = block.outputs
        self.routed_scale = block.routed_scale
        prefix = block.name + "." if block.name else ""
        self.gate_rel = block.gate_name[len(prefix) :]  # the gate's path inside the block
        gate_child = self.gate_rel.split(".")[0]
        self.add_module(gate_child, original._modules[gate_child])  # resident, never called
        self.shared = [s[len(prefix) :] for s in block.shared_names]
        self.shared_gate = block.shared_gate_name[len(prefix) :] if block.shared_gate_name else None
        for rel in [*self.shared, *([self.shared_gate] if self.shared_gate else [])]:
            self.add_module(rel, original._modules[rel])

    def _finish(self, routed: torch.Tensor, x: torch.Tensor, shape: torch.Size) -> Any:
        """routed (N, H) from flat inputs x (N, H): scale, add the shared experts, reshape.

        Returns what the original block returns: the hidden states, or a tuple starting with
        them (the gate's outputs that follow them are not computed: ``None``).
        """
        if self.routed_scale != 1.0:
            routed = routed * self.routed_scale
        for rel in self.shared:
            out = self._modules[rel](x)  # type: ignore[misc]
            if self.shared_gate is not None:
                out = torch.sigmoid(self._modules[self.shared_gate](x)) * out  # type: ignore[misc]
            routed = routed + out
        hidden = routed.reshape(shape)
        return hidden if self.outputs == 1 else (hidden, *([None] * (self.outputs - 1)))


class MergedBlock(_BlockShell):
    """Stands in for one MoE block: one merged dense expert on every token, gate bypassed."""

    def __init__(self, block: MoEBlock, original: nn.Module, expert: nn.Module) -> None:
        super().__init__(block, original)
        self.expert = expert

    def forward(self, hidden_states: torch.Tensor) -> Any:  # (..., H) -> (..., H)
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (N, H)
        return self._finish(self.expert(x), x, shape)


class _Mask:
    """The token mask shared by a merger's soft blocks (set per batch by the caller)."""

    mask: torch.Tensor | None = None


class SoftMergedBlock(_BlockShell):
    """SMEAR-style soft merging: each sequence runs one expert merged with its own coeffs.

    A sequence's coeffs are its gate probabilities averaged over its (unmasked) tokens, so the
    merge follows the input instead of a plan; 2-D inputs (N, H) are N one-token sequences.
    """

    def __init__(
        self,
        block: MoEBlock,
        original: nn.Module,
        stacked: Mapping[str, torch.Tensor],
        template: nn.Module,
        mask: _Mask,
    ) -> None:
        super().__init__(block, original)
        self.block = block
        self.stacked = dict(stacked)  # name -> (E, ...) all experts, views or one stacked copy
        self.template: nn.Module
        object.__setattr__(self, "template", template)  # run functionally, never registered
        self._mask = mask
        self.chunk = max(1, _SOFT_CHUNK_BYTES // max(1, block.expert_bytes))

    def forward(self, hidden_states: torch.Tensor) -> Any:  # (..., H) -> (..., H)
        shape = hidden_states.shape
        x = hidden_states if hidden_states.dim() == 3 else hidden_states.reshape(-1, 1, shape[-1])
        gate = get_module(self, self.gate_rel)
        probs = gate_probs(self.block, gate, x)  # (B, T, E)
        mask = self._mask.mask if hidden_states.dim() == 3 else None
        coeffs = masked_mean(probs, mask)  # (B, E)
        routed = torch.empty_like(x)  # (B, T, H)
        n_experts = self.block.n_experts
        for b0 in range(0, x.shape[0], self.chunk):
            c = coeffs[b0 : b0 + self.chunk].to(x.dtype)  # (b, E)
            merged = {  # name -> (b, ...): one merged expert per sequence
                n: (c @ s.reshape(n_experts, -1)).reshape(-1, *s.shape[1:])
                for n, s in self.stacked.items()
            }
            for i in range(c.shape[0]):
                params = {n: w[i] for n, w in merged.items()}
                routed[b0 + i] = functional_call(self.template, params, (x[b0 + i],))  # (T, H)
        flat = x.reshape(-1, shape[-1])
        return self._finish(routed.reshape(-1, shape[-1]), flat, shape)


# --- the merge --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeStats:
    """What one merge cost: wall time and the bytes it moved."""

    merge_ms: float
    bytes_read: int
    bytes_written: int
    n_blocks: int
    lean: bool
    in_place: bool


@dataclass(frozen=True)
class PreparedMerge:
    """Merged blocks built off the serving path, ready for :meth:`Merger.commit`."""

    modules: Mapping[str, MergedBlock]
    stats: MergeStats
    owner: int = field(repr=False)


def _accumulate(dst: torch.Tensor, terms: Sequence[tuple[float, torch.Tensor]]) -> None:
    """dst = sum_i c_i * src_i over contiguous tensors, one cache-sized chunk at a time.

    Each chunk (``_CHUNK_ELEMENTS``) stays in cache while every expert streams through it, and
    is small enough that torch runs it in the calling thread: a merge is thousands of tiny
    kernels, and waking a thread pool for each costs more than the work whenever the other core
    is busy (a serving process, or a shared machine).
    """
    if dst.is_inference() and not torch.is_inference_mode_enabled():
        # the first merge ran under inference_mode (a serving thread); re-merging in place
        # into its tensors is only allowed back inside that mode
        with torch.inference_mode():
            _accumulate(dst, terms)
        return
    d_flat = dst.view(-1)  # merged pieces are contiguous row ranges
    flats = [(c, s.reshape(-1)) for c, s in terms]
    # half-precision weights are summed in float32 and rounded once
    wide = dst.dtype in (torch.float32, torch.float64)
    scratch = None if wide else torch.empty(min(_CHUNK_ELEMENTS, d_flat.numel()))
    for a in range(0, d_flat.numel(), _CHUNK_ELEMENTS):
        d = d_flat[a : a + _CHUNK_ELEMENTS]
        acc = d if scratch is None else scratch[: d.numel()]
        c0, s0 = flats[0]
        if scratch is None:
            torch.mul(s0[a : a + _CHUNK_ELEMENTS], c0, out=acc)
        else:
            acc.copy_(s0[a : a + _CHUNK_ELEMENTS]).mul_(c0)
        for c, s in flats[1:]:
            acc.add_(s[a : a + _CHUNK_ELEMENTS], alpha=c)
        if scratch is not None:
            d.copy_(acc)


def merge_block_into(
    block: MoEBlock, pieces: Pieces, coeffs: np.ndarray, out: Mapping[str, torch.Tensor]
) -> int:
    """Write block's merged tensors into ``out`` (target name -> tensor); returns bytes read."""
    active = [(float(c), e) for e, c in enumerate(coeffs) if c != 0.0]
    read = 0
    for target in block.targets:
        dst = out[target.name]
        by_expert = {e: dict((r.start, t) for r, t in pieces(target.name, e)) for _, e in active}
        for rows in split_rows(block, target.name):
            terms = []
            for c, e in active:
                src = by_expert[e][rows.start]
                if tuple(src.shape) != tuple(dst[rows].shape):
                    raise ValueError(
                        f"block {block.name!r} expert {e}: {target.name} piece has shape "
                        f"{tuple(src.shape)}, expected {tuple(dst[rows].shape)}"
                    )
                terms.append((c, src))
                read += src.numel() * src.element_size()
            _accumulate(dst[rows], terms)
    return read


class Merger:
    """Merges a model's MoE blocks per plan, swaps the merged blocks in, and restores them.

    Parameters
    ----------
    model
        A model with MoE blocks (see :func:`~tanbr.model.discovery.find_moe_blocks`).
    store
        Where the original experts are read from: the model itself (default) or a
        memory-lean :class:`~tanbr.model.lean.SafetensorsExpertStore`, in which case the
        model's own experts are not resident (see :func:`~tanbr.model.checkpoint.load_checkpoint`).

    Not thread-safe: build the next merge on another thread with :meth:`prepare`, and
    :meth:`commit` it between two forward passes.
    """

    def __init__(self, model: nn.Module, *, store: ExpertSource | None = None) -> None:
        for name, module in model.named_modules():
            if getattr(module, "merged_from", None) is not None:
                raise ValueError(
                    f"block {name!r} is already merged by another Merger; restore it there first"
                )
        self.model = model
        self.blocks: list[MoEBlock] = find_moe_blocks(model)
        self.source: ExpertSource = store if store is not None else ModuleExpertSource(model)
        self._originals = {b.name: get_module(model, b.name) for b in self.blocks}
        self._installed: dict[str, nn.Module] = {}
        self._mode = "full"
        self._mask = _Mask()
        self._guards: list[Any] = []
        if self.lean:
            for b in self.blocks:
                hook = self._originals[b.name].register_forward_pre_hook(self._guard(b))
                self._guards.append(hook)

    # --- state ------------------------------------------------------------------------------

    @property
    def lean(self) -> bool:
        """True when the original experts live on disk, not in memory."""
        return bool(self.source.lean)

    @property
    def mode(self) -> str:
        """``"full"`` (original MoE), ``"merged"`` (a plan) or ``"soft"`` (SMEAR-style)."""
        return self._mode

    @property
    def merged(self) -> bool:
        return self._mode == "merged"

    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """Token mask (B, T) for soft merging of the next batches (1 = real token, 0 = padding)."""
        self._mask.mask = None if mask is None else mask.detach().bool()

    # --- merging ----------------------------------------------------------------------------

    @torch.no_grad()
    def apply(self, plan: Mapping[str, Any]) -> MergeStats:
        """Serve ``plan``: merge every block and swap the merged blocks in.

        On an already merged model the merged tensors are overwritten in place.
        """
        coeffs = validate_plan(plan, self.blocks)
        if self._mode != "merged":
            prepared = self._build(coeffs)
            self._install(prepared.modules, "merged")
            return prepared.stats
        start = time.perf_counter()
        read = written = 0
        for block in self.blocks:
            expert = self._installed[block.name].get_submodule("expert")
            out = {t.name: expert.get_parameter(t.name) for t in block.targets}
            with self.source.open(block) as pieces:
                read += merge_block_into(block, pieces, coeffs[block.name], out)
            written += block.expert_bytes
        ms = (time.perf_counter() - start) * 1e3
        logger.debug("re-merged %d blocks in %.1f ms", len(self.blocks), ms)
        return MergeStats(ms, read, written, len(self.blocks), self.lean, in_place=True)

    @torch.no_grad()
    def prepare(self, plan: Mapping[str, Any]) -> PreparedMerge:
        """Build the merged blocks of ``plan`` without touching the model (fresh tensors)."""
        return self._build(validate_plan(plan, self.blocks))

    def commit(self, prepared: PreparedMerge) -> None:
        """Swap in blocks built by :meth:`prepare`; the previous merged blocks are dropped."""
        if prepared.owner != id(self):
            raise ValueError("this PreparedMerge was built by another Merger")
        self._install(prepared.modules, "merged")

    @torch.no_grad()
    def apply_soft(self) -> None:
        """Replace every block by a :class:`SoftMergedBlock`. Soft merging needs every expert
        for every batch: in memory-lean mode they are read back from disk first, and dropped
        again by the next plain merge."""
        if self.lean:
            for block in self.blocks:
                self._materialize(block)
        modules = {}
        for block in self.blocks:
            original = self._originals[block.name]
            experts = _experts_of(original)
            if block.fused:
                stacked = {t.name: getattr(experts, t.name) for t in block.targets}
                template: nn.Module = FusedExpert(
                    block, experts, {n: s[0] for n, s in stacked.items()}
                )
            else:
                members = list(experts.children())
                states = [dict(m.named_parameters()) for m in members]
                stacked = {t.name: torch.stack([s[t.name] for s in states]) for t in block.targets}
                template = members[0]
            modules[block.name] = SoftMergedBlock(block, original, stacked, template, self._mask)
        self._install(modules, "soft")

    def restore(self) -> None:
        """Put the original blocks back: the model computes exactly what it did before merging.

        In memory-lean mode the original experts are read back from the checkpoint first.
        """
        if self.lean:  # also on a lean model that was never merged: it has no experts yet
            for block in self.blocks:
                self._materialize(block)
        if self._mode == "full":
            return
        for block in self.blocks:
            parent, attr = parent_of(self.model, block.name)
            setattr(parent, attr, self._originals[block.name])
        self._installed = {}
        self._mode = "full"

    def resident_bytes(self) -> int:
        """Bytes of every tensor this model keeps in memory (model, kept originals, merges)."""
        seen: set[int] = set()
        total = 0
        modules: list[nn.Module] = [self.model, *self._originals.values()]
        modules += list(self._installed.values())
        for module in modules:
            for t in [*module.parameters(), *module.buffers()]:
                if t.is_meta:
                    continue
                key = t.untyped_storage().data_ptr()
                if key not in seen:
                    seen.add(key)
                    total += t.untyped_storage().nbytes()
        return total

    # --- internals --------------------------------------------------------------------------

    def _build(self, coeffs: Mapping[str, np.ndarray]) -> PreparedMerge:
        start = time.perf_counter()
        read = written = 0
        modules: dict[str, MergedBlock] = {}
        for block in self.blocks:
            out = {t.name: torch.empty(t.shape, dtype=block.dtype) for t in block.targets}
            with self.source.open(block) as pieces:
                read += merge_block_into(block, pieces, coeffs[block.name], out)
            written += block.expert_bytes
            original = self._originals[block.name]
            modules[block.name] = MergedBlock(block, original, self._expert_module(block, out))
        ms = (time.perf_counter() - start) * 1e3
        stats = MergeStats(ms, read, written, len(self.blocks), self.lean, in_place=False)
        logger.debug("merged %d blocks in %.1f ms", len(self.blocks), ms)
        return PreparedMerge(modules=modules, stats=stats, owner=id(self))

    def _expert_module(self, block: MoEBlock, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
        experts = _experts_of(self._originals[block.name])
        if block.fused:
            return FusedExpert(block, experts, tensors)
        template = next(iter(experts.children()))
        # copy the expert's structure without copying its weights, then plug the merged ones in
        memo: dict[int, Any] = {
            id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
            for p in template.parameters()
        }
        expert = copy.deepcopy(template, memo)
        for name, t in tensors.items():
            _set_param(expert, name, t)
        return expert

    def _install(self, modules: Mapping[str, nn.Module], mode: str) -> None:
        for block in self.blocks:
            parent, attr = parent_of(self.model, block.name)
            setattr(parent, attr, modules[block.name])
        self._installed = dict(modules)
        self._mode = mode
        if self.lean and mode == "merged":
            for block in self.blocks:
                self._release(block)

    def _expert_params(
        self, block: MoEBlock, module: nn.Module | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        experts = _experts_of(self._originals[block.name] if module is None else module)
        names = {t.name for t in block.targets}
        for name, p in experts.named_parameters():
            if (block.fused and name in names) or (
                not block.fused and name.split(".", 1)[1] in names
            ):
                yield name, p

    def _resident(self, block: MoEBlock, module: nn.Module | None = None) -> bool:
        """Whether the block's original experts are in memory, read off the tensors themselves
        (several mergers, or a replica's copy, may share one model)."""
        return not any(p.is_meta for _, p in self._expert_params(block, module))

    def _release(self, block: MoEBlock) -> None:
        """Drop a lean block's original experts from memory (they stay on disk)."""
        if not self._resident(block):
            return
        experts = _experts_of(self._originals[block.name])
        for name, p in list(self._expert_params(block)):
            meta = torch.empty(p.shape, dtype=p.dtype, device="meta")
            _set_param(experts, name, nn.Parameter(meta, requires_grad=False))

    @torch.no_grad()
    def _materialize(self, block: MoEBlock) -> None:
        """Read a lean block's original experts back from disk (for :meth:`restore`)."""
        if self._resident(block):
            return
        experts = _experts_of(self._originals[block.name])
        keys = list(experts._modules)
        with self.source.open(block) as pieces:
            for t in block.targets:
                if block.fused:
                    full = torch.empty((block.n_experts, *t.shape), dtype=block.dtype)
                    for e in range(block.n_experts):
                        for rows, src in pieces(t.name, e):
                            full[e][rows].copy_(src)
                    _set_param(experts, t.name, nn.Parameter(full, requires_grad=False))
                    continue
                for e in range(block.n_experts):
                    one = torch.empty(t.shape, dtype=block.dtype)
                    for rows, src in pieces(t.name, e):
                        one[rows].copy_(src)
                    _set_param(
                        experts, f"{keys[e]}.{t.name}", nn.Parameter(one, requires_grad=False)
                    )

    def _guard(self, block: MoEBlock) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            if not self._resident(block, module):
                raise RuntimeError(
                    f"block {block.name!r}: its experts are not resident (memory-lean mode); "
                    "apply a plan, or call Merger.restore() to read them back"
                )

        return hook


def _set_param(root: nn.Module, dotted: str, value: torch.Tensor) -> None:
    head, _, name = dotted.rpartition(".")
    module = root.get_submodule(head) if head else root
    param = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
    setattr(module, name, param)


def _experts_of(block_module: nn.Module) -> nn.Module:
    experts = block_module._modules.get("experts")
    if experts is None:
        raise ValueError(f"{type(block_module).__name__} has no `experts` module")
    return experts
