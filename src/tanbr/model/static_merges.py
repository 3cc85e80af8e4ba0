"""Static merges from calibration data: what RegMean and Fisher-weighted averaging share.

The paper's static baselines merge each MoE block's experts once, from unlabeled calibration
batches, into one dense expert that is not a weighted average with one scalar per expert:

* :func:`~tanbr.model.regmean.regmean_plan` -- RegMean (Jin et al. 2023): every linear map of
  the merged expert minimises the squared error against each expert's map on the inputs that
  expert receives;
* :func:`~tanbr.model.fisher.fisher_plan` -- Fisher-weighted averaging (Matena & Raffel 2022):
  every parameter is averaged with the experts' diagonal Fisher information as weights.

Both return a plan of :class:`~tanbr.model.coeffs.MergedWeights` (block name -> merged tensors)
that :meth:`~tanbr.model.merge.Merger.apply` serves like any plan. This module holds what they
share: the calibration batches' form, the checks that the model is the full MoE with its
experts resident, the experts' tensors stacked over experts, and :class:`RoutingTap`, which
hands a merge the tokens the router sends to each expert, read with forward hooks (no model
class is edited).

**Calibration batches** are an iterable of mappings, each passed as ``model(**batch)`` (token
ids, attention mask, decoder ids: whatever the model's forward takes). A batch's
``attention_mask`` (B, T) marks its real tokens for every block whose input is (B, T, H);
padding is then left out of the statistics.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any

import torch
from torch import nn

from tanbr.model.discovery import MoEBlock, get_module
from tanbr.model.gates import gate_probs

logger = logging.getLogger(__name__)

Batch = Mapping[str, Any]  # keyword arguments of one forward pass: model(**batch)
Batches = Iterable[Batch]

# visit(block, x (N, H) the experts' input tokens, hit (N, E) bool: token n goes to expert e)
Visit = Callable[[MoEBlock, torch.Tensor, torch.Tensor], None]


def check_calibration_model(model: nn.Module, blocks: Sequence[MoEBlock]) -> None:
    """A static merge calibrates on the full MoE: every block in place, its experts in memory.

    Raises
    ------
    ValueError
        Naming the block: it is merged (restore the model first) or its experts are not
        resident (a memory-lean model: ``Merger.restore()`` reads them back).
    """
    if not blocks:
        raise ValueError("a static merge needs at least one MoE block")
    for block in blocks:
        module = get_module(model, block.name)
        if getattr(module, "merged_from", None) is not None:
            raise ValueError(
                f"block {block.name!r} is merged ({type(module).__name__}); a static merge "
                "calibrates on the full MoE: call Merger.restore() first"
            )
        experts = get_module(model, block.experts_name)
        if any(p.is_meta for p in experts.parameters()):
            raise ValueError(
                f"block {block.name!r}: its experts are not resident (memory-lean model); call "
                "Merger.restore() to read them back, compute the plan, then apply it"
            )


def expert_members(model: nn.Module, block: MoEBlock) -> list[nn.Module]:
    """The expert modules of a per-expert block, in expert order."""
    return list(get_module(model, block.experts_name).children())


def stacked_experts(model: nn.Module, block: MoEBlock) -> dict[str, torch.Tensor]:
    """Every target of the block as one detached ``(E, *shape)`` tensor: the fused tensors
    themselves, or the per-expert modules' parameters stacked (a copy)."""
    experts = get_module(model, block.experts_name)
    if block.fused:
        return {t.name: experts.get_parameter(t.name).detach() for t in block.targets}
    members = expert_members(model, block)
    return {
        t.name: torch.stack([m.get_parameter(t.name).detach() for m in members])
        for t in block.targets
    }


def plain_average(stacked: torch.Tensor) -> torch.Tensor:
    """The experts' plain average of an ``(E, ...)`` tensor, in float64."""
    return stacked.double().mean(dim=0)


def check_unit(name: str, value: float, *, low: float = 0.0, high: float | None = None) -> float:
    """A float parameter within bounds, with a message that names it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not v >= low or (high is not None and v > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {bound}, got {value!r}")
    return v


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode (no dropout, no router jitter), each put back afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class RoutingTap:
    """Calls ``visit(block, x, hit)`` for every forward pass through every block.

    ``x`` (N, H) are the tokens the block's experts receive and ``hit`` (N, E) says which
    expert(s) the router sends each one to: the full MoE's own top-k choice. It is read where
    the block hands it to its experts (the ``experts(hidden, routing, weights)`` call of every
    transformers MoE, Switch's included: an index tensor (N, k) or a one-hot mask (N, 1, E)),
    so routers that do more than a top-k of the gate probabilities (DeepSeek-V3's group limit
    and correction bias, Switch's capacity) are followed exactly. A block that runs a list of
    expert modules itself gets the top-k of :func:`~tanbr.model.gates.gate_probs` with the
    block's ``top_k`` (1 when it does not say). Padding tokens (:meth:`set_mask`) are dropped.
    """

    def __init__(self, model: nn.Module, blocks: Sequence[MoEBlock], visit: Visit) -> None:
        self.model = model
        self.blocks = list(blocks)
        self.visit = visit
        self._mask: torch.Tensor | None = None
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor | None] | None] = {}
        self._handles: list[Any] = []

    def set_mask(self, mask: torch.Tensor | None) -> None:
        """The next batch's attention mask (B, T), 1 for real tokens; None: every token."""
        self._mask = None if mask is None else mask.detach().bool()

    def __enter__(self) -> RoutingTap:
        for block in self.blocks:
            module = get_module(self.model, block.name)
            experts = get_module(self.model, block.experts_name)
            self._handles.append(
                module.register_forward_pre_hook(self._block_pre(block), with_kwargs=True)
            )
            self._handles.append(module.register_forward_hook(self._block_post(block)))
            self._handles.append(
                experts.register_forward_pre_hook(self._experts_pre(block), with_kwargs=True)
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
        self._pending.clear()

    def _block_pre(self, block: MoEBlock) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(hidden, torch.Tensor):
                raise ValueError(f"block {block.name!r}: cannot find its hidden states input")
            mask = self._mask
            keep = None
            if mask is not None and hidden.dim() == 3 and tuple(hidden.shape[:2]) == mask.shape:
                keep = mask.reshape(-1)
            self._pending[block.name] = (hidden.detach().reshape(-1, hidden.shape[-1]), keep)

        return hook

    def _experts_pre(self, block: MoEBlock) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            pending = self._pending.get(block.name)
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            if pending is None or len(tensors) < 2:
                return
            x = tensors[0].detach().reshape(-1, block.hidden_size)
            hit = _hits(tensors[1], x.shape[0], block.n_experts)
            if hit is None:
                return  # not a routing we can read: the block's post-hook routes by the gate
            _, keep = pending
            if keep is not None and keep.numel() == x.shape[0]:
                hit = hit & keep.unsqueeze(-1)
            self._pending[block.name] = None
            self.visit(block, x, hit)

        return hook

    def _block_post(self, block: MoEBlock) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            pending = self._pending.pop(block.name, None)
            if pending is None:  # the experts' call was read
                return
            x, keep = pending
            gate = get_module(self.model, block.gate_name)
            k = block.top_k or 1
            with torch.no_grad():
                top = torch.topk(gate_probs(block, gate, x), k, dim=-1).indices  # (N, k)
            hit = torch.zeros(x.shape[0], block.n_experts, dtype=torch.bool)
            hit.scatter_(1, top, True)
            if keep is not None:
                hit = hit & keep.unsqueeze(-1)
            self.visit(block, x, hit)

        return hook


def _hits(routing: torch.Tensor, n_tokens: int, n_experts: int) -> torch.Tensor | None:
    """(N, E) bool from the routing an experts module is called with, or None if unreadable.

    An index tensor (N, k) holds expert ids (an id outside [0, E) is a dropped slot); a mask
    (N, ..., E) of zeros and ones marks the chosen experts (Switch's, capacity applied)."""
    if routing.is_floating_point() or routing.numel() == 0:
        return None
    if routing.dim() == 2 and routing.shape[0] == n_tokens:
        ids = torch.arange(n_experts, device=routing.device)
        return (routing.unsqueeze(-1) == ids).any(dim=1).cpu()
    if routing.dim() >= 3 and routing.shape[-1] == n_experts and routing.shape[0] == n_tokens:
        return routing.reshape(n_tokens, -1, n_experts).bool().any(dim=1).cpu()
    return None


def run_batches(model: nn.Module, batches: Batches, tap: RoutingTap | None = None) -> int:
    """Run every calibration batch through the model (no gradients); returns their number."""
    n = 0
    for batch in batches:
        if not isinstance(batch, Mapping):
            raise ValueError(
                f"calibration batch {n} is a {type(batch).__name__}; each batch is a mapping "
                "of the model's keyword arguments (model(**batch))"
            )
        if tap is not None:
            mask = batch.get("attention_mask")
            tap.set_mask(mask if isinstance(mask, torch.Tensor) else None)
        with torch.no_grad():
            model(**batch)
        n += 1
    if n == 0:
        raise ValueError("no calibration batch given")
    return n
