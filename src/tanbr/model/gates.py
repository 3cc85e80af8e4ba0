"""The MoE gate's own probabilities: recorded for profiles, signatures and soft merging.

A task's expert-usage *profile* is the mean gate probability vector of its requests, per block;
the usage-frequency merge uses the overall mean; the task estimator can use a request's mean
gate probabilities as a label-free signature. All of them need the same number: for every token
a block sees, the gate's probabilities over its E experts.

The probabilities are computed from the block's input and the gate's weight, not read from the
gate's output, so they are the same whether the block currently runs the full MoE, a merged
dense expert or a soft merge (the gate stays resident in every mode):
``softmax(x W^T + b)`` for softmax gates, and ``sigmoid(x W^T) / sum`` for DeepSeek-V3 style
sigmoid gates.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tanbr.model.discovery import MoEBlock, find_moe_blocks, get_module

logger = logging.getLogger(__name__)


def gate_probs(block: MoEBlock, gate: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Gate probabilities (..., E) in float32 for hidden states (..., H)."""
    if hidden.shape[-1] != block.hidden_size:
        raise ValueError(
            f"block {block.name!r}: hidden states end in {hidden.shape[-1]}, "
            f"expected {block.hidden_size}"
        )
    weight = gate.get_parameter("weight")  # (E, H)
    bias = getattr(gate, "bias", None)
    bias = bias.float() if isinstance(bias, torch.Tensor) and bias.dim() == 1 else None
    logits = F.linear(hidden.float(), weight.float(), bias)  # (..., E)
    if block.score_fn == "sigmoid":
        scores = torch.sigmoid(logits)
        return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    return torch.softmax(logits, dim=-1)


def masked_mean(probs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-sequence mean over tokens: probs (B, T, E), mask (B, T) -> (B, E)."""
    if mask is None:
        return probs.mean(dim=1)
    if tuple(mask.shape) != tuple(probs.shape[:2]):
        raise ValueError(
            f"token mask has shape {tuple(mask.shape)} but the batch is {tuple(probs.shape[:2])}"
        )
    m = mask.to(probs.dtype).unsqueeze(-1)  # (B, T, 1)
    total = m.sum(dim=1)  # (B, 1)
    if bool((total == 0).any()):
        raise ValueError("token mask leaves a sequence with no tokens")
    return (probs * m).sum(dim=1) / total


class GateRecorder:
    """Records, per block, the gate probabilities of every token the block sees.

    Use it as a context manager around forward passes::

        with GateRecorder(model) as rec:
            rec.set_mask(attention_mask)  # optional: ignore padding tokens
            model(**batch)
        rec.profile("model.layers.0.mlp")  # (E,) mean gate probabilities

    Hooks sit on the modules found at the blocks' paths when the context is entered; merging or
    restoring inside the context swaps those modules, so do that outside it.

    Parameters
    ----------
    model
        The model (full, merged or soft-merged).
    blocks
        The blocks to record; all of them when omitted.
    """

    def __init__(self, model: nn.Module, *, blocks: Sequence[MoEBlock] | None = None) -> None:
        self.model = model
        self.blocks = list(blocks) if blocks is not None else find_moe_blocks(model)
        self._records: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]] = {
            b.name: [] for b in self.blocks
        }
        self._mask: torch.Tensor | None = None
        self._handles: list[Any] = []

    # --- context ----------------------------------------------------------------------------

    def __enter__(self) -> GateRecorder:
        if self._handles:
            raise RuntimeError("GateRecorder is already active")
        for block in self.blocks:
            module = get_module(self.model, block.name)
            gate = get_module(self.model, block.gate_name)
            self._handles.append(
                module.register_forward_pre_hook(self._hook(block, gate), with_kwargs=True)
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, block: MoEBlock, gate: nn.Module) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(hidden, torch.Tensor):
                raise ValueError(f"block {block.name!r}: cannot find its hidden states input")
            with torch.no_grad():
                probs = gate_probs(block, gate, hidden.detach())  # (B, T, E) or (N, E)
            if probs.dim() == 2:
                probs = probs.unsqueeze(1)  # tokens as one-token sequences: (N, 1, E)
            mask = self._mask
            if mask is not None and tuple(mask.shape) != tuple(probs.shape[:2]):
                raise ValueError(
                    f"block {block.name!r}: mask shape {tuple(mask.shape)} does not match the "
                    f"batch {tuple(probs.shape[:2])}"
                )
            self._records[block.name].append((probs.cpu(), None if mask is None else mask.cpu()))

        return hook

    # --- results ----------------------------------------------------------------------------

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """Token mask (B, T) for the next forward passes (1 = real token); None for all tokens."""
        self._mask = None if mask is None else mask.detach().bool()

    def clear(self) -> None:
        for records in self._records.values():
            records.clear()

    @property
    def block_names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def _get(self, block: str) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        if block not in self._records:
            raise ValueError(f"unknown block {block!r}; recorded blocks: {self.block_names}")
        records = self._records[block]
        if not records:
            raise ValueError(f"block {block!r}: nothing recorded yet (run a forward pass)")
        return records

    def calls(self, block: str) -> list[torch.Tensor]:
        """The raw probabilities of each forward pass: (B, T, E) tensors, padding included."""
        return [p for p, _ in self._get(block)]

    def token_probs(self, block: str) -> torch.Tensor:
        """Probabilities of every real (unmasked) token seen: (N, E)."""
        rows = [p[m] if m is not None else p.reshape(-1, p.shape[-1]) for p, m in self._get(block)]
        return torch.cat(rows)

    def sequence_probs(self, block: str) -> torch.Tensor:
        """Mean probabilities of each sequence over its real tokens: (B, E), all calls stacked."""
        return torch.cat([masked_mean(p, m) for p, m in self._get(block)])

    def profile(self, block: str) -> np.ndarray:
        """Mean gate probabilities over all real tokens seen: (E,), sums to 1."""
        mean = self.token_probs(block).double().mean(dim=0)
        return np.asarray((mean / mean.sum()).numpy())

    def profiles(self) -> dict[str, np.ndarray]:
        """``profile`` of every block: a plan-shaped dict (block name -> (E,))."""
        return {name: self.profile(name) for name in self.block_names}
