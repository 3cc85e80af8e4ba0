"""Collapse every MoE block into merged dense experts, swap them in, and restore the original.

For block l with coeffs c_l (E,) on the simplex over its E experts, every expert tensor is
merged as ``W_l = sum_e c_{l,e} W_{l,e}`` (biases too), and the block is replaced by a
:class:`~tanbr.model.blocks.MergedBlock` that runs that single expert on every token and never
calls the token gate. With grouped coeffs (m, E) each row is merged the same way into one of m
dense experts, and the block becomes a :class:`~tanbr.model.blocks.GroupedBlock` that routes
every token to its best merged experts with the block's own gate. A block's plan value may
also be :class:`~tanbr.model.coeffs.MergedWeights`, the merged expert's tensors computed
elsewhere (RegMean, Fisher-weighted averaging): they are copied in as they are, and no
original expert is read for that block. The original block is kept aside, untouched, so
:meth:`Merger.restore` gives bit-identical logits. Re-merging for the next
slot writes into the merged tensors in place whenever a block keeps its form (one merged
expert, or the same number m): nothing is allocated.

The arithmetic, a weighted sum that reads each active expert once and writes the merged tensor
once, lives in :mod:`tanbr.model.accumulate`.
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from tanbr.model.accumulate import accumulate
from tanbr.model.blocks import FusedExpert, GroupedBlock, MergedBlock, SoftMergedBlock, TokenMask
from tanbr.model.coeffs import MergedWeights, PlanValue, groups_of, validate_merge_plan
from tanbr.model.discovery import MoEBlock, find_moe_blocks, get_module, parent_of
from tanbr.model.lean import ExpertSource, ModuleExpertSource, Pieces, split_rows

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MergeStats:
    """What one merge cost: wall time and the bytes it moved.

    ``in_place`` is True when every block was re-merged into its existing tensors (nothing
    allocated); ``n_merged`` counts the merged experts built (one per block, or m).
    """

    merge_ms: float
    bytes_read: int
    bytes_written: int
    n_blocks: int
    lean: bool
    in_place: bool
    n_merged: int = 0


@dataclass(frozen=True)
class PreparedMerge:
    """Merged blocks built off the serving path, ready for :meth:`Merger.commit`."""

    modules: Mapping[str, nn.Module]
    stats: MergeStats
    owner: int = field(repr=False)


def merge_block_into(
    block: MoEBlock, pieces: Pieces, coeffs: np.ndarray, out: Mapping[str, torch.Tensor]
) -> int:
    """Write one merged expert of ``block`` (coeffs (E,)) into ``out`` (target name -> tensor);
    returns the bytes read. Experts with a zero coefficient are not read."""
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
            accumulate(dst[rows], terms)
    return read


def check_group_top_k(value: int) -> int:
    """``group_top_k`` must be a positive int (the routing keeps min(m, it) groups per token)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"group_top_k must be an int >= 1, got {value!r}")
    return value


_CLAIM = "_tanbr_merger"  # set on each original block: the Merger whose hooks act there
_TOKENS = itertools.count(1)


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
    group_top_k
        How many merged experts each token runs in a grouped merge (coeffs (m, E)): the
        routing keeps min(m, group_top_k) groups per token. 1 by default, the cost of one
        expert per token; the model's own top-k with m = E gives back the full MoE.

    Not thread-safe: build the next merge on another thread with :meth:`prepare`, and
    :meth:`commit` it between two forward passes.
    """

    def __init__(
        self, model: nn.Module, *, store: ExpertSource | None = None, group_top_k: int = 1
    ) -> None:
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
        self._mask = TokenMask()
        self._group_top_k = check_group_top_k(group_top_k)
        self._guards: list[Any] = []
        self._streams: list[Any] = []  # hooks of a streamed full MoE (see restore)
        # A model shared within a process may be handed on while another Merger streams it:
        # the newest Merger's hooks act, the others' on the same modules go inert.
        self._token = next(_TOKENS)
        for module in self._originals.values():
            module.__dict__[_CLAIM] = self._token
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

    @property
    def group_top_k(self) -> int:
        """Merged experts per token in grouped blocks (at most their m)."""
        return self._group_top_k

    @group_top_k.setter
    def group_top_k(self, value: int) -> None:
        self._group_top_k = check_group_top_k(value)
        for module in self._installed.values():
            if isinstance(module, GroupedBlock):
                module.set_routing(module.groups, self._group_top_k)

    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """Token mask (B, T) for soft merging of the next batches (1 = real token, 0 = padding)."""
        self._mask.mask = None if mask is None else mask.detach().bool()

    # --- merging ----------------------------------------------------------------------------

    @torch.no_grad()
    def apply(self, plan: Mapping[str, Any]) -> MergeStats:
        """Serve ``plan`` (block name -> coeffs (E,) or (m, E), or :class:`MergedWeights`):
        merge every block, swap in.

        On an already merged model, a block that keeps its form (one merged expert, or the same
        m) is re-merged in place, its groups re-mapped; any other block is built afresh. Merged
        weights are one merged expert: they are copied into it, and nothing is read from the
        original experts (in memory-lean mode, nothing from disk).
        """
        coeffs = validate_merge_plan(plan, self.blocks)
        if self._mode != "merged":
            prepared = self._build(coeffs)
            self._install(prepared.modules, "merged")
            return prepared.stats
        start = time.perf_counter()
        read = written = n_merged = 0
        rebuilt: dict[str, nn.Module] = {}
        for block in self.blocks:
            c = coeffs[block.name]
            module = self._installed[block.name]
            if _same_form(module, c):
                read += self._merge_into(block, c, _merged_tensors(block, module))
                if isinstance(module, GroupedBlock) and not isinstance(c, MergedWeights):
                    module.set_routing(groups_of(c), self._group_top_k)
            else:
                rebuilt[block.name], bytes_read = self._build_block(block, c)
                read += bytes_read
            rows = _n_merged(c)
            written += rows * block.expert_bytes
            n_merged += rows
        for name, module in rebuilt.items():
            parent, attr = parent_of(self.model, name)
            setattr(parent, attr, module)
            self._installed[name] = module
        ms = (time.perf_counter() - start) * 1e3
        logger.debug(
            "re-merged %d blocks in %.1f ms (%d rebuilt)", len(self.blocks), ms, len(rebuilt)
        )
        return MergeStats(
            ms, read, written, len(self.blocks), self.lean, in_place=not rebuilt, n_merged=n_merged
        )

    @torch.no_grad()
    def prepare(self, plan: Mapping[str, Any]) -> PreparedMerge:
        """Build the merged blocks of ``plan`` without touching the model (fresh tensors)."""
        return self._build(validate_merge_plan(plan, self.blocks))

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

    def restore(self, *, streamed: bool = False) -> None:
        """Put the original blocks back: the model computes exactly what it did before merging.

        In memory-lean mode the original experts are read back from the checkpoint first; with
        ``streamed`` they stay on disk instead (any read back before are dropped), and each
        block reads its experts just before it runs and drops them once it has run. A streamed
        pass computes the same numbers while holding one block's experts at a time (a merged
        service scoring a sample with the full MoE need not grow to the full MoE's size), and
        it reads them again on every pass; between passes no expert is resident.
        """
        self._stop_streaming()
        if self.lean:  # also on a lean model never merged: no experts yet
            for block in self.blocks:
                if streamed:
                    self._release(block)
                else:
                    self._materialize(block)
        if self._mode != "full":
            for block in self.blocks:
                parent, attr = parent_of(self.model, block.name)
                setattr(parent, attr, self._originals[block.name])
            self._installed = {}
            self._mode = "full"
        if self.lean and streamed:
            for block in self.blocks:
                module = self._originals[block.name]
                module.__dict__[_CLAIM] = self._token  # (taken back from a newer Merger)
                # before the lean guard (which a replica's copied tree also carries)
                load = module.register_forward_pre_hook(self._stream_in(block), prepend=True)
                self._streams += [load, module.register_forward_hook(self._stream_out(block))]

    def unload(self) -> None:
        """Memory-lean: the original blocks back with every expert on disk and nothing to read
        them, as the model was loaded (a copy of the tree made now carries no hook of this
        merger's); :meth:`restore` or :meth:`apply` before it runs again."""
        self.restore(streamed=True)
        self._stop_streaming()

    @property
    def experts_resident(self) -> bool:
        """True when every original expert is in memory (always, unless memory-lean)."""
        return all(self._resident(block) for block in self.blocks)

    @property
    def streaming(self) -> bool:
        """True while the full MoE is served streamed (:meth:`restore` with ``streamed``)."""
        return bool(self._streams)

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

    def _build(self, coeffs: Mapping[str, PlanValue]) -> PreparedMerge:
        start = time.perf_counter()
        read = written = n_merged = 0
        modules: dict[str, nn.Module] = {}
        for block in self.blocks:
            c = coeffs[block.name]
            modules[block.name], bytes_read = self._build_block(block, c)
            rows = _n_merged(c)
            read += bytes_read
            written += rows * block.expert_bytes
            n_merged += rows
        ms = (time.perf_counter() - start) * 1e3
        stats = MergeStats(
            ms, read, written, len(self.blocks), self.lean, in_place=False, n_merged=n_merged
        )
        logger.debug("merged %d blocks in %.1f ms", len(self.blocks), ms)
        return PreparedMerge(modules=modules, stats=stats, owner=id(self))

    def _build_block(self, block: MoEBlock, coeffs: PlanValue) -> tuple[nn.Module, int]:
        """A fresh merged block for coeffs (E,) or (m, E) or merged weights, and the bytes its
        merge read."""
        outs = [
            {t.name: torch.empty(t.shape, dtype=block.dtype) for t in block.targets}
            for _ in range(_n_merged(coeffs))
        ]
        read = self._merge_into(block, coeffs, outs)
        original = self._originals[block.name]
        experts = [self._expert_module(block, out) for out in outs]
        if isinstance(coeffs, MergedWeights) or coeffs.ndim == 1:
            return MergedBlock(block, original, experts[0]), read
        grouped = GroupedBlock(block, original, experts, groups_of(coeffs), self._group_top_k)
        return grouped, read

    def _merge_into(
        self, block: MoEBlock, coeffs: PlanValue, outs: list[dict[str, torch.Tensor]]
    ) -> int:
        """Merge each row of coeffs into its tensors, reading the block's experts once; merged
        weights are copied in (the source of the original experts is not opened)."""
        if isinstance(coeffs, MergedWeights):
            (out,) = outs
            for t in block.targets:
                copy_into(out[t.name], coeffs.tensors[t.name])
            return coeffs.nbytes
        read = 0
        with self.source.open(block) as pieces:
            for row, out in zip(np.atleast_2d(coeffs), outs, strict=True):
                read += merge_block_into(block, pieces, row, out)
        return read

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
        self._stop_streaming()
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

    def _stop_streaming(self) -> None:
        for handle in self._streams:
            handle.remove()
        self._streams = []

    def _owns(self, block: MoEBlock, module: nn.Module) -> bool:
        """The module is this merger's own original (not a copy's tree) and no newer Merger
        has taken the model over."""
        return module is self._originals[block.name] and module.__dict__.get(_CLAIM) == self._token

    def _stream_in(self, block: MoEBlock) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            if self._owns(block, module):
                self._materialize(block)

        return hook

    def _stream_out(self, block: MoEBlock) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._owns(block, module):
                self._release(block)

        return hook

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


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst[...] = src``, also into tensors a first merge made under ``inference_mode``."""
    if dst.is_inference() and not torch.is_inference_mode_enabled():
        with torch.inference_mode():
            dst.copy_(src)
        return
    dst.copy_(src)


def _n_merged(coeffs: PlanValue) -> int:
    """Merged experts a plan value builds: 1 for (E,) or merged weights, m for (m, E)."""
    if isinstance(coeffs, MergedWeights) or coeffs.ndim == 1:
        return 1
    return int(coeffs.shape[0])


def _same_form(module: nn.Module, coeffs: PlanValue) -> bool:
    """Whether an installed merged block can be re-merged in place for these coeffs."""
    if isinstance(coeffs, MergedWeights) or coeffs.ndim == 1:
        return isinstance(module, MergedBlock)
    return isinstance(module, GroupedBlock) and module.n_groups == coeffs.shape[0]


def _merged_tensors(block: MoEBlock, module: nn.Module) -> list[dict[str, torch.Tensor]]:
    """The merged experts' tensors of an installed block, one dict per merged expert."""
    if isinstance(module, GroupedBlock):
        experts: list[nn.Module] = list(module.merged)
    else:
        experts = [module.get_submodule("expert")]
    return [{t.name: e.get_parameter(t.name) for t in block.targets} for e in experts]
