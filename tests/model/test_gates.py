from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from tanbr.model import GateRecorder, Merger, find_moe_blocks, uniform_plan
from tanbr.model.discovery import get_module


def _gate_logits_from_the_gate(case: Any) -> dict[str, list[torch.Tensor]]:
    """Logits as each gate module itself computes them, captured from its forward."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for block in find_moe_blocks(case.model):
        module = get_module(case.model, block.gate_name)

        def hook(m: Any, args: Any, out: Any, name: str = block.name) -> None:
            logits = (
                out if isinstance(out, torch.Tensor) else out[-1 if case.name == "switch" else 0]
            )
            seen.setdefault(name, []).append(logits.detach().float())

        handles.append(module.register_forward_hook(hook))
    case.run()
    for h in handles:
        h.remove()
    return seen


@torch.no_grad()
def test_recorded_probabilities_are_the_gates_own(case: Any, close: Any) -> None:
    with GateRecorder(case.model) as rec:
        case.run()
    logits = _gate_logits_from_the_gate(case)
    own = {}
    for b in rec.blocks:
        if b.score_fn == "sigmoid":
            scores = [torch.sigmoid(x) for x in logits[b.name]]
            own[b.name] = [s / s.sum(-1, keepdim=True) for s in scores]
        else:
            own[b.name] = [torch.softmax(x, -1) for x in logits[b.name]]
    for b in rec.blocks:
        tokens = rec.token_probs(b.name)  # (N, E)
        assert tokens.shape[1] == b.n_experts
        torch.testing.assert_close(tokens.sum(-1), torch.ones(len(tokens)), atol=1e-6, rtol=0)
        theirs = torch.cat([x.reshape(-1, b.n_experts) for x in own[b.name]])
        close(tokens, theirs)  # the gate's own kernel may sum in another order
        assert rec.profile(b.name).sum() == pytest.approx(1.0)


@torch.no_grad()
def test_recording_works_on_the_merged_model(make_case: Any) -> None:
    case = make_case("qwen2_moe")
    with GateRecorder(case.model) as rec:
        case.run()
    full_first = rec.token_probs("model.layers.0.mlp")
    merger = Merger(case.model)
    merger.apply(uniform_plan(merger.blocks))
    with GateRecorder(case.model) as merged_rec:
        case.run()
    # the first block sees the same input in both models, so the same gate probabilities
    torch.testing.assert_close(merged_rec.token_probs("model.layers.0.mlp"), full_first)
    assert set(merged_rec.profiles()) == set(rec.profiles())


@torch.no_grad()
def test_masks_sequences_and_profiles(make_case: Any) -> None:
    case = make_case("fused_plain")
    block = find_moe_blocks(case.model)[0].name
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    with GateRecorder(case.model) as rec:
        rec.set_mask(mask)
        case.run()
        rec.set_mask(None)
        case.run()
    raw = rec.calls(block)
    assert [tuple(r.shape) for r in raw] == [(2, 6, 4), (2, 6, 4)]
    tokens = rec.token_probs(block)
    assert tokens.shape == (9 + 12, 4)  # masked tokens left out of the first call
    seqs = rec.sequence_probs(block)
    assert seqs.shape == (4, 4)
    torch.testing.assert_close(seqs[0], raw[0][0, :3].mean(0))
    torch.testing.assert_close(seqs[3], raw[1][1].mean(0))
    profile = rec.profile(block)
    assert np.allclose(
        profile, tokens.double().mean(0).numpy() / tokens.double().mean(0).sum().item()
    )
    rec.clear()
    with pytest.raises(ValueError, match="nothing recorded"):
        rec.profile(block)
    with pytest.raises(ValueError, match="unknown block"):
        rec.calls("nope")
    with GateRecorder(case.model) as rec, pytest.raises(ValueError, match="mask shape"):
        rec.set_mask(torch.ones(3, 6))
        case.run()
