"""The modules that stand in for an MoE block while it is merged.

* :class:`MergedBlock` -- one merged dense expert on every token, the gate bypassed;
* :class:`GroupedBlock` -- m merged experts, routed by the block's own gate re-mapped to
  groups: each token runs its top-k' merged experts only (grouped dispatch);
* :class:`SoftMergedBlock` -- SMEAR-style soft merging, one expert merged per sequence.

All keep the block's gate, always-on shared experts and output scaling, and a reference to the
original block (``merged_from``, not a submodule) so that it can be described and restored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from tanbr.model.discovery import FUSED_GATED, MoEBlock, get_module
from tanbr.model.gates import gate_probs, masked_mean

_SOFT_CHUNK_BYTES = 64 << 20  # per-sequence merged weights built at once by a soft merge


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


class TokenMask:
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
        mask: TokenMask,
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


def membership(groups: Sequence[Sequence[int]], n_experts: int) -> torch.Tensor:
    """(E, m) float32 matrix with a 1 where expert e belongs to group g: ``probs @ it`` sums
    each group's gate probabilities (an expert in no group contributes to no score)."""
    out = torch.zeros(n_experts, len(groups))
    for g, members in enumerate(groups):
        out[list(members), g] = 1.0
    return out


class GroupedBlock(_BlockShell):
    """Stands in for one MoE block with m merged experts, routed by the block's own gate.

    Per token x, with p(x) the gate probabilities over the E experts (:func:`gate_probs`):
    group g scores ``s_g = sum_{e in G_g} p_e``; the token goes to its ``top_k`` best groups T,
    weighted ``s_g / sum_{h in T} s_h``, and each merged expert runs only on the tokens routed
    to it. With m = 1 every token goes to the single merged expert with weight 1, which is what
    :class:`MergedBlock` computes, so the gate is not even evaluated.
    """

    def __init__(
        self,
        block: MoEBlock,
        original: nn.Module,
        experts: Sequence[nn.Module],
        groups: Sequence[Sequence[int]],
        top_k: int,
    ) -> None:
        super().__init__(block, original)
        self.block = block
        self.merged = nn.ModuleList(experts)  # not `experts`: paths into the original use that
        self.register_buffer("members", membership(groups, block.n_experts), persistent=False)
        self.groups: tuple[tuple[int, ...], ...] = ()
        self.top_k = 1
        self.set_routing(groups, top_k)

    @property
    def n_groups(self) -> int:
        return len(self.merged)

    def set_routing(self, groups: Sequence[Sequence[int]], top_k: int) -> None:
        """Re-map the gate to new groups (same m) and route to ``min(m, top_k)`` of them."""
        if len(groups) != self.n_groups:
            raise ValueError(
                f"block {self.block_name!r}: {len(groups)} groups for {self.n_groups} merged "
                "experts"
            )
        if top_k < 1:
            raise ValueError(f"block {self.block_name!r}: top_k must be >= 1, got {top_k}")
        self.groups = tuple(tuple(int(e) for e in g) for g in groups)
        self.get_buffer("members").copy_(membership(self.groups, self.block.n_experts))
        self.top_k = min(self.n_groups, top_k)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (N, H) -> chosen groups (N, k') and their renormalised weights (N, k')."""
        gate = get_module(self, self.gate_rel)
        probs = gate_probs(self.block, gate, x)  # (N, E) float32
        scores = probs @ self.get_buffer("members")  # (N, m)
        weights, chosen = torch.topk(scores, self.top_k, dim=-1)  # (N, k')
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return chosen, weights

    def forward(self, hidden_states: torch.Tensor) -> Any:  # (..., H) -> (..., H)
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])  # (N, H)
        if self.n_groups == 1:
            return self._finish(self.merged[0](x), x, shape)
        chosen, weights = self.route(x)
        return self._finish(self._dispatch(x, chosen, weights), x, shape)

    def _dispatch(
        self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Sort the (token, group) pairs by group, run each merged expert once on its rows."""
        k = chosen.shape[1]
        flat = chosen.reshape(-1)  # (N k',)
        counts = torch.bincount(flat, minlength=self.n_groups).tolist()
        if k == 1 and max(counts) == x.shape[0]:  # every token to one merged expert
            alone: torch.Tensor = self.merged[counts.index(x.shape[0])](x)
            return alone
        order = torch.argsort(flat, stable=True)
        token = order // k if k > 1 else order
        xs = x.index_select(0, token)  # (N k', H) grouped by merged expert
        ys = torch.empty_like(xs)
        start = 0
        for g, count in enumerate(counts):
            if count:
                ys[start : start + count] = self.merged[g](xs[start : start + count])
                start += count
        if k == 1:  # a single chosen group has weight 1: each token is written once
            return torch.empty_like(x).index_copy_(0, token, ys)
        ys = ys * weights.reshape(-1)[order].unsqueeze(-1).to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys)
