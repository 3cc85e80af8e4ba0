"""Request signatures of a Hugging Face MoE model, and the forward pass that stops early.

Signatures (the estimator's input) must not depend on the merge being served, or the
estimator would see its own decisions. Two families, with different costs:

* **On the served path** (:data:`SERVED_SIGNATURES`; no expert runs). ``input0``: the input of
  the first MoE block, mean-pooled over each request's real tokens. The forward pass is stopped
  by a hook on that block before it runs (:func:`first_block_input`), so only the embeddings
  and the layers before it (their attention, and any dense layer) are computed, whatever the
  block currently is: the original, a merged or a soft block. ``gate0``: the first block's gate
  probabilities on that input, averaged over the tokens. In memory-lean mode neither needs an
  expert in memory. Their cost is the layers before the first MoE block, a fraction of a
  forward pass (about 1/L of the layers and no expert for an L-layer model with MoE from
  layer 0).
* **Full MoE** (``gates``: every block's mean gate probabilities under the full MoE;
  ``gates+head``: those and what the model's head adds, see the backends). They cost a
  full-MoE forward pass per request (in memory-lean mode the experts are read back from disk
  first) and belong to the one-off clustering of calibration requests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from tanbr.backend.tokenizer import Batch
from tanbr.model import GateRecorder, MoEBlock
from tanbr.model import gate_probs as block_gate_probs
from tanbr.model.discovery import get_module
from tanbr.model.gates import masked_mean

SIGNATURES = ("input0", "gate0", "gates", "gates+head")
#: Signatures made of what the served forward computes anyway, before any expert runs.
SERVED_SIGNATURES = ("input0", "gate0")


class _ReachedFirstBlock(Exception):
    """Stops a forward pass at the first MoE block, once its input is recorded."""


def first_block_input(model: nn.Module, body: nn.Module, block: MoEBlock, batch: Batch) -> Any:
    """(b, T, H) the input of ``block`` (the first MoE block) for a batch: ``body`` (the
    transformer under the head) runs until the block is called, and no further."""
    seen: list[torch.Tensor] = []

    def stop(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(hidden, torch.Tensor):
            raise ValueError(f"block {block.name!r}: cannot find its hidden states")
        seen.append(hidden)
        raise _ReachedFirstBlock

    module = get_module(model, block.name)  # original, merged or soft: it does not run
    # first in line, before a memory-lean model's check that its experts are resident
    handle = module.register_forward_pre_hook(stop, with_kwargs=True, prepend=True)
    try:
        body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    except _ReachedFirstBlock:
        pass
    finally:
        handle.remove()
    if not seen:
        raise RuntimeError(f"the forward pass never reached MoE block {block.name!r}")
    hidden = seen[0]
    return hidden.reshape(*batch.input_ids.shape, -1) if hidden.dim() == 2 else hidden


def served_signatures(
    model: nn.Module, body: nn.Module, block: MoEBlock, batch: Batch, kind: str
) -> np.ndarray:
    """(b, d) ``input0`` (d = H) or ``gate0`` (d = E) of a batch; no expert runs."""
    if kind not in SERVED_SIGNATURES:
        raise ValueError(f"served signatures are {SERVED_SIGNATURES}, got {kind!r}")
    hidden = first_block_input(model, body, block, batch)  # (b, T, H)
    mask = batch.attention_mask
    if kind == "input0":
        return np.asarray(masked_mean(hidden.float(), mask).double().numpy())  # (b, H)
    gate = get_module(model, block.gate_name)
    probs = block_gate_probs(block, gate, hidden)  # (b, T, E)
    return np.asarray(masked_mean(probs, mask).double().numpy())  # (b, E)


def full_moe_gates(
    model: nn.Module,
    blocks: Sequence[MoEBlock],
    batches: Sequence[Batch],
    forward: Callable[[Batch], np.ndarray],
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per batch, (positions, every block's mean gate probabilities followed by what
    ``forward`` returns (b, d)): ``forward`` runs the model, which must be the full MoE."""
    parts = []
    with GateRecorder(model, blocks=blocks) as rec:
        for batch in batches:
            rec.clear()
            rec.set_mask(batch.attention_mask)
            head = forward(batch)  # (b, d)
            gates = [rec.sequence_probs(b.name).double().numpy() for b in blocks]
            parts.append((batch.pos, np.concatenate([*gates, head], axis=1)))
    return parts


def scatter(
    parts: Sequence[tuple[np.ndarray, np.ndarray]], n: int, empty: np.ndarray
) -> np.ndarray:
    """Batch results back in request order: ``parts`` of (positions, values)."""
    if not parts:
        return empty
    first = parts[0][1]
    out = np.zeros((n, *first.shape[1:]), dtype=first.dtype)
    for pos, values in parts:
        out[pos] = values
    return out
