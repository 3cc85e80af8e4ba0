from __future__ import annotations

import gc
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tanbr.model import MergedBlock, Merger, SoftMergedBlock, find_moe_blocks, one_hot_plan
from tanbr.model.discovery import get_module


def _plan(blocks: Any, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {b.name: rng.dirichlet(np.ones(b.n_experts)) for b in blocks}


def _h(out: Any) -> torch.Tensor:
    """A block's hidden states, whether it returns them alone or first in a tuple."""
    return out[0] if isinstance(out, tuple) else out


def _x(shape: tuple[int, ...] = (2, 5, 32), seed: int = 3) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_one_hot_coeffs_give_exactly_that_expert(case: Any, reference: Any, close: Any) -> None:
    merger = Merger(case.model)
    x = _x()
    for e in range(4):
        merger.apply(one_hot_plan(merger.blocks, e))
        for block in merger.blocks:
            merged = get_module(case.model, block.name)
            assert isinstance(merged, MergedBlock)
            expected = reference.expected_block(merged.merged_from, e, x)
            close(_h(merged(x)), expected)


@torch.no_grad()
def test_merged_tensors_are_the_weighted_average(case: Any) -> None:
    merger = Merger(case.model)
    plan = _plan(merger.blocks, 0)
    merger.apply(plan)
    for block in merger.blocks:
        merged = get_module(case.model, block.name)
        experts = merged.merged_from.experts
        c = torch.tensor(plan[block.name], dtype=torch.float64)
        for t in block.targets:
            if block.fused:
                stacked = getattr(experts, t.name).double()  # (E, ...)
            else:
                stacked = torch.stack(
                    [m.get_parameter(t.name) for m in experts.children()]
                ).double()
            want = torch.einsum("e,e...->...", c, stacked)
            got = merged.expert.get_parameter(t.name).double()
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_identical_experts_give_the_full_moe_output(case: Any) -> None:
    blocks = find_moe_blocks(case.model)
    for block in blocks:  # every expert becomes a copy of expert 0
        experts = get_module(case.model, block.experts_name)
        for t in block.targets:
            if block.fused:
                p = getattr(experts, t.name)
                p.copy_(p[0:1].expand_as(p))
            else:
                members = list(experts.children())
                for m in members[1:]:
                    m.get_parameter(t.name).copy_(members[0].get_parameter(t.name))
    merger = Merger(case.model)
    if case.normalized:
        full = case.run()
        merger.apply(_plan(blocks, 1))
        torch.testing.assert_close(case.run(), full, atol=1e-5, rtol=1e-5)
        return
    # top-k weights that do not sum to 1 scale the single expert: full = mass * merged
    x = _x()
    block = blocks[0]
    original = get_module(case.model, block.name)
    full = original(x)
    if case.name == "switch":
        _, mass, _ = original.router(x)  # (B, T, 1): the top-1 probability
    else:
        _, weights, _ = original.router(x.reshape(-1, 32))
        mass = weights.sum(-1).reshape(2, 5, 1)
    merger.apply(_plan(blocks, 1))
    merged = get_module(case.model, block.name)
    torch.testing.assert_close(full, mass * merged(x), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_restore_gives_bit_identical_logits(case: Any) -> None:
    before = case.run()
    originals = {b.name: get_module(case.model, b.name) for b in find_moe_blocks(case.model)}
    merger = Merger(case.model)
    merger.apply(_plan(merger.blocks, 0))
    merged = case.run()
    merger.apply(_plan(merger.blocks, 1))  # in place
    assert not torch.equal(case.run(), merged)
    merger.apply_soft()
    case.run()
    merger.apply(_plan(merger.blocks, 2))
    merger.restore()
    assert merger.mode == "full" and not merger.merged
    assert torch.equal(case.run(), before)
    for name, module in originals.items():
        assert get_module(case.model, name) is module


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "switch", "fused_plain", "module_list"])
@torch.no_grad()
def test_re_merging_twenty_times_does_not_leak(make_case: Any, name: str) -> None:
    case = make_case(name)
    merger = Merger(case.model)
    merger.apply(_plan(merger.blocks, 0))

    def snapshot() -> tuple[Any, ...]:
        gc.collect()
        ptrs = tuple(p.data_ptr() for p in case.model.parameters())
        n_tensors = sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, nn.Parameter))
        return ptrs, merger.resident_bytes(), n_tensors

    first = snapshot()
    outputs = set()
    for seed in range(1, 21):
        stats = merger.apply(_plan(merger.blocks, seed))
        assert stats.in_place
        outputs.add(float(case.run().sum()))
    assert snapshot() == first
    assert len(outputs) == 20  # every plan really changed the served model


@torch.no_grad()
def test_merged_model_keeps_one_expert_per_block(case: Any) -> None:
    blocks = find_moe_blocks(case.model)
    n_full = sum(p.numel() for p in case.model.parameters())
    merger = Merger(case.model)
    merger.apply(_plan(blocks, 0))
    n_merged = sum(p.numel() for p in case.model.parameters())
    removed = sum((b.n_experts - 1) * b.expert_numel for b in blocks)
    assert n_full - n_merged == removed
    assert find_moe_blocks(case.model) == blocks  # a merged model still describes its blocks
    with pytest.raises(ValueError, match="already merged"):
        Merger(case.model)


@torch.no_grad()
def test_prepare_then_commit_equals_apply(make_case: Any) -> None:
    case = make_case("qwen2_moe")
    merger = Merger(case.model)
    plan = _plan(merger.blocks, 4)
    prepared = merger.prepare(plan)
    assert merger.mode == "full" and not prepared.stats.in_place
    untouched = case.run()
    merger.commit(prepared)
    committed = case.run()
    merger.restore()
    assert torch.equal(case.run(), untouched)
    merger.apply(plan)
    assert torch.equal(case.run(), committed)
    other = Merger(make_case("qwen2_moe").model)
    with pytest.raises(ValueError, match="another Merger"):
        other.commit(prepared)


@torch.no_grad()
def test_merge_stats_count_only_active_experts(make_case: Any) -> None:
    case = make_case("mixtral")
    merger = Merger(case.model)
    plan = {b.name: np.array([0.0, 0.25, 0.0, 0.75]) for b in merger.blocks}
    first = merger.apply(plan)
    again = merger.apply(plan)
    expert_bytes = merger.blocks[0].expert_bytes
    for stats in (first, again):
        assert stats.bytes_read == 2 * expert_bytes * 2  # two active experts, two blocks
        assert stats.bytes_written == expert_bytes * 2
        assert stats.n_blocks == 2 and not stats.lean and stats.merge_ms >= 0
    assert (first.in_place, again.in_place) == (False, True)


def test_re_merge_outside_inference_mode_after_a_first_merge_inside_it(
    make_case: Any, close: Any
) -> None:
    case, fresh_case = make_case("mixtral"), make_case("mixtral")
    merger, fresh = Merger(case.model), Merger(fresh_case.model)
    first, second = _plan(merger.blocks, 1), _plan(merger.blocks, 2)
    with torch.inference_mode():
        merger.apply(first)
    stats = merger.apply(second)  # in place, into tensors created under inference_mode
    fresh.apply(second)
    assert stats.in_place
    close(case.run(), fresh_case.run())  # two models built apart: the same math


def _one_hot_gate(block: Any, gate: nn.Module, e: int) -> None:
    """Gate weights that put all probability on expert e for any positive input."""
    w = torch.full_like(gate.weight, -4.0)
    w[e] = 4.0
    gate.weight.copy_(w)
    if getattr(gate, "bias", None) is not None:
        gate.bias.zero_()


@torch.no_grad()
def test_soft_merge_with_one_hot_gate_is_that_expert(case: Any, reference: Any, close: Any) -> None:
    merger = Merger(case.model)
    x = _x().abs() + 0.1  # positive inputs: the logit of expert e dominates
    for e in (0, 3):
        for block in merger.blocks:
            _one_hot_gate(block, get_module(case.model, block.gate_name), e)
        merger.apply_soft()
        assert merger.mode == "soft"
        for block in merger.blocks:
            soft = get_module(case.model, block.name)
            assert isinstance(soft, SoftMergedBlock)
            expected = reference.expected_block(soft.merged_from, e, x)
            close(_h(soft(x)), expected)
        merger.restore()


@torch.no_grad()
def test_soft_merge_follows_each_sequence_and_ignores_padding(make_case: Any, close: Any) -> None:
    case = make_case("fused_plain")
    merger = Merger(case.model)
    merger.apply_soft()
    block = get_module(case.model, merger.blocks[0].name)
    x = _x((2, 6, 32))
    alone = [block(x[i : i + 1, :4]) for i in range(2)]
    assert not torch.allclose(alone[0], block(x[1:2, :4]))  # each sequence merges differently
    padded = x.clone()
    padded[:, 4:] = 100.0  # garbage in padding positions
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]])
    merger.set_token_mask(mask)
    out = block(padded)
    for i in range(2):
        close(out[i : i + 1, :4], alone[i])
    merger.set_token_mask(torch.ones(3, 6))
    with pytest.raises(ValueError, match="token mask has shape"):
        block(padded)


@torch.no_grad()
def test_half_precision_experts_are_summed_in_float32(make_case: Any) -> None:
    case = make_case("mixtral")
    blocks = find_moe_blocks(case.model)
    g = torch.Generator().manual_seed(0)
    for b in blocks:  # weights with 8 significant bits, exact in bfloat16
        experts = get_module(case.model, b.experts_name)
        for t in b.targets:
            p = experts.get_parameter(t.name)
            p.copy_(torch.randint(-128, 128, p.shape, generator=g) / 128)
    case.model.to(torch.bfloat16)
    merger = Merger(case.model)
    merger.apply(one_hot_plan(merger.blocks, 2))
    block = merger.blocks[0]
    merged = get_module(case.model, block.name)
    experts = merged.merged_from.experts
    assert merged.expert.gate_up_proj.dtype == torch.bfloat16
    assert torch.equal(merged.expert.gate_up_proj, experts.gate_up_proj[2])  # an exact copy
    # dyadic coeffs: every product and partial sum is exact in float32 (not in bfloat16), so a
    # sum in float32 rounded once is the correctly rounded average, in any summation order
    plan = {b.name: np.array([0.5, 0.25, 0.125, 0.125]) for b in merger.blocks}
    merger.apply(plan)
    c = torch.tensor(plan[block.name], dtype=torch.float64)
    for name in ("gate_up_proj", "down_proj"):
        want = torch.einsum("e,e...->...", c, getattr(experts, name).double())
        got = merged.expert.get_parameter(name)
        assert torch.equal(got, want.to(torch.bfloat16))
        per_expert = torch.zeros_like(got)  # what rounding to bfloat16 after each expert gives
        for e in range(4):
            per_expert = per_expert + (getattr(experts, name)[e] * c[e].item()).bfloat16()
        assert not torch.equal(got, per_expert)  # the check can tell the two apart
