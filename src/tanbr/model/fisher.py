"""Fisher-weighted averaging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted
Averaging") for the experts of an MoE block.

Each parameter of the merged expert is the experts' average weighted by their diagonal Fisher
information, elementwise:

    W* = sum_e F_e W_e / sum_e F_e,    F_e = mean_s (d log p(y_s | x_s) / d W_e)^2,

over calibration samples s, with y_s drawn from the model's own predictive distribution, so no
label is needed (the Fisher of the model's distribution, estimated with one sampled y per
sample, as Matena & Raffel do). A parameter that moves the model's predictions much gets a
weight near its expert's; one that does not is averaged.

What is computed on which tokens: the gradient of one sample's log-likelihood through the full
MoE reaches expert e only through the tokens its router sends to e, weighted by the router's
combine weight, so F_e measures e's parameters on e's own traffic; an expert no token reached
has F_e = 0 and does not enter the merge. Where no expert has Fisher mass (sum_e F_e at most
``eps`` times the tensor's mean: no token reached any of them, or a unit dead on all of them)
the merge falls back to the plain average, and a log line says how many elements did.

The caller passes ``loss_fn(model, batch) -> (S,)``: each sample's log-likelihood of a label
sampled from the model, differentiable. :func:`sampled_label_log_likelihood` serves a
classifier (a sample is a sequence, y its label), :func:`sampled_token_log_likelihood` a
causal LM or a seq2seq decoder (a sample is a sequence, y its next tokens, one drawn per
position; the sequence's log-likelihood is their sum).

Cost: one forward pass per batch and one backward pass per sample (the squared per-sample
gradients do not follow from the batch gradient). Gradients flow into the experts only (every
other parameter frozen for the duration), the squares are accumulated in float64, and batches
are processed one at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tanbr.model.coeffs import MergedWeights
from tanbr.model.discovery import MoEBlock, get_module
from tanbr.model.static_merges import (
    Batches,
    check_calibration_model,
    check_unit,
    eval_mode,
    expert_members,
    plain_average,
    stacked_experts,
)

logger = logging.getLogger(__name__)

# loss_fn(model, batch) -> (S,) per-sample log-likelihoods, differentiable w.r.t. the experts
LossFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]


def _logits(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", output)
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            f"the model returned {type(output).__name__} without a logits tensor; pass a "
            "loss_fn of your own"
        )
    return logits


def sampled_label_log_likelihood(
    model: nn.Module, batch: Mapping[str, Any], *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A classifier's ``log p(y | x)`` per sequence, y drawn from its own logits (B, C): (B,).

    Pass a seeded ``generator`` (``functools.partial``) for reproducible Fishers."""
    logits = _logits(model(**batch))
    if logits.dim() != 2:
        raise ValueError(
            f"a classifier's logits are (B, C), got {tuple(logits.shape)}; for token logits "
            "use sampled_token_log_likelihood"
        )
    logp = F.log_softmax(logits.float(), dim=-1)
    y = torch.multinomial(logp.detach().exp(), 1, generator=generator)  # (B, 1)
    return logp.gather(-1, y).squeeze(-1)


def sampled_token_log_likelihood(
    model: nn.Module, batch: Mapping[str, Any], *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A language model's log-likelihood per sequence of tokens drawn from its own next-token
    distributions: ``sum_t log p(y_t | x_<=t)``, ``y_t ~ p(. | x_<=t)``, over real positions.

    The logits (B, T, V) are the model's (a causal LM's, or a seq2seq decoder's). Positions
    where the batch's ``decoder_attention_mask`` or ``attention_mask`` (whichever is (B, T))
    is 0 are left out. Pass a seeded ``generator`` for reproducible Fishers."""
    logits = _logits(model(**batch))
    if logits.dim() != 3:
        raise ValueError(f"token logits are (B, T, V), got {tuple(logits.shape)}")
    b, t, v = logits.shape
    logp = F.log_softmax(logits.float(), dim=-1)
    y = torch.multinomial(logp.detach().exp().reshape(-1, v), 1, generator=generator)
    ll = logp.gather(-1, y.reshape(b, t, 1)).squeeze(-1)  # (B, T)
    for key in ("decoder_attention_mask", "attention_mask"):
        mask = batch.get(key)
        if isinstance(mask, torch.Tensor) and tuple(mask.shape) == (b, t):
            ll = ll * mask.to(ll.dtype)
            break
    return ll.sum(dim=-1)


def _expert_params(model: nn.Module, block: MoEBlock) -> dict[str, list[nn.Parameter]]:
    """target -> its parameters: one fused (E, ...) tensor, or one per expert module."""
    if block.fused:
        experts = get_module(model, block.experts_name)
        return {t.name: [experts.get_parameter(t.name)] for t in block.targets}
    members = expert_members(model, block)
    return {t.name: [m.get_parameter(t.name) for m in members] for t in block.targets}


@torch.no_grad()  # gradients only inside the forward passes of loss_fn, into the experts
def expert_fisher(
    model: nn.Module, blocks: Sequence[MoEBlock], batches: Batches, loss_fn: LossFn
) -> dict[str, dict[str, torch.Tensor]]:
    """The diagonal Fisher of every expert parameter: block -> target -> ``(E, *shape)``
    float64, the mean over samples of the squared per-sample gradient of ``loss_fn``."""
    check_calibration_model(model, blocks)
    if torch.is_inference_mode_enabled():
        raise ValueError("the Fisher needs gradients: call it outside torch.inference_mode()")
    params = {b.name: _expert_params(model, b) for b in blocks}
    flat = [p for b in blocks for ps in params[b.name].values() for p in ps]
    sums = {
        b.name: {
            t.name: torch.zeros((b.n_experts, *t.shape), dtype=torch.float64) for t in b.targets
        }
        for b in blocks
    }
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    n_samples = 0
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        for p in flat:
            p.requires_grad_(True)
        with eval_mode(model):
            for i, batch in enumerate(batches):
                if not isinstance(batch, Mapping):
                    raise ValueError(
                        f"calibration batch {i} is a {type(batch).__name__}; each batch is a "
                        "mapping of the model's keyword arguments (model(**batch))"
                    )
                with torch.enable_grad():
                    ll = loss_fn(model, batch)
                n_samples += _accumulate(blocks, params, flat, sums, ll, i)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    if n_samples == 0:
        raise ValueError("no calibration sample given")
    return {name: {t: s / n_samples for t, s in by.items()} for name, by in sums.items()}


def _accumulate(
    blocks: Sequence[MoEBlock],
    params: Mapping[str, Mapping[str, list[nn.Parameter]]],
    flat: list[nn.Parameter],
    sums: Mapping[str, Mapping[str, torch.Tensor]],
    ll: Any,
    batch_index: int,
) -> int:
    """Add the squared per-sample gradients of one batch's log-likelihoods; returns S."""
    if not isinstance(ll, torch.Tensor) or ll.dim() != 1:
        raise ValueError(
            f"loss_fn must return the per-sample log-likelihoods (S,), got "
            f"{tuple(ll.shape) if isinstance(ll, torch.Tensor) else type(ll).__name__} for "
            f"batch {batch_index}"
        )
    if not ll.requires_grad:
        raise ValueError(
            f"loss_fn's output for batch {batch_index} does not depend on the experts' "
            "parameters (no gradient): compute it from model(**batch), with gradients enabled"
        )
    if not bool(torch.isfinite(ll).all()):
        raise ValueError(f"loss_fn returned NaN or infinity for batch {batch_index}")
    for s in range(ll.shape[0]):
        with torch.enable_grad():  # the sample's own node in the graph
            grads = torch.autograd.grad(
                ll[s], flat, retain_graph=s < ll.shape[0] - 1, allow_unused=True
            )
        it = iter(grads)
        for b in blocks:
            for target, ps in params[b.name].items():
                acc = sums[b.name][target]
                for e, _ in enumerate(ps):
                    g = next(it)
                    if g is None:
                        continue  # an expert this sample never reached
                    # a float32 square is exact in float64: no rounding before the sum
                    (acc if len(ps) == 1 else acc[e]).addcmul_(g, g)
    return int(ll.shape[0])


@torch.no_grad()
def fisher_merge(
    block: MoEBlock,
    stacked: Mapping[str, torch.Tensor],
    fisher: Mapping[str, torch.Tensor],
    *,
    eps: float = 1e-8,
) -> MergedWeights:
    """Merge one block's experts (target -> ``(E, *shape)``) weighted by their Fisher
    (target -> ``(E, *shape)``), elementwise, in float64; cast to the block's dtype."""
    eps = check_unit("eps", eps)
    out: dict[str, torch.Tensor] = {}
    for t in block.targets:
        w = stacked[t.name].double()
        f = fisher[t.name].double()
        if tuple(f.shape) != tuple(w.shape):
            raise ValueError(
                f"Fisher of block {block.name!r} target {t.name!r} has shape "
                f"{tuple(f.shape)}, expected {tuple(w.shape)}"
            )
        total = f.sum(dim=0)
        reached = total > eps * float(total.mean())
        merged = (f * w).sum(dim=0) / torch.where(reached, total, 1.0)
        fallback = int((~reached).sum())
        if fallback:
            logger.info(
                "Fisher block %r target %r: %d of %d elements have no Fisher mass from any "
                "expert: plain average there",
                block.name,
                t.name,
                fallback,
                total.numel(),
            )
            merged = torch.where(reached, merged, plain_average(w))
        out[t.name] = merged.to(block.dtype)
    return MergedWeights(out, "fisher")


def fisher_plan(
    model: nn.Module,
    blocks: Sequence[MoEBlock],
    batches: Batches,
    loss_fn: LossFn,
    *,
    eps: float = 1e-8,
) -> dict[str, MergedWeights]:
    """Fisher-weighted merged weights for every block, from unlabeled calibration batches.

    Parameters
    ----------
    model
        The full MoE (not merged), its experts in memory (a lean model: ``Merger.restore()``).
    blocks
        The blocks to merge, e.g. ``merger.blocks``.
    batches
        Iterable of mappings, each passed to ``loss_fn(model, batch)``.
    loss_fn
        ``(model, batch) -> (S,)`` per-sample log-likelihoods of labels sampled from the model
        (:func:`sampled_label_log_likelihood`, :func:`sampled_token_log_likelihood`).
    eps
        Elements whose total Fisher over the experts is at most ``eps`` times the tensor's mean
        total get the plain average.

    Returns
    -------
    dict
        Block name -> :class:`~tanbr.model.coeffs.MergedWeights`, a plan for ``Merger.apply``.
    """
    eps = check_unit("eps", eps)
    start = time.perf_counter()
    fisher = expert_fisher(model, blocks, batches, loss_fn)
    plan = {
        b.name: fisher_merge(b, stacked_experts(model, b), fisher[b.name], eps=eps) for b in blocks
    }
    logger.info(
        "Fisher-weighted merge of %d blocks in %.2f s", len(blocks), time.perf_counter() - start
    )
    return plan
