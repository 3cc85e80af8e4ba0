"""Grouped merges: m merged experts per block, routed by the block's own gate."""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tanbr.model import (
    GateRecorder,
    GroupedBlock,
    MergedBlock,
    Merger,
    find_moe_blocks,
    group_coeffs,
    grouped_plan,
    groups_of,
    identity_plan,
    load_checkpoint,
    validate_plan,
)
from tanbr.model.discovery import get_module

GROUPS_3 = ((0, 2), (1,), (3,))
GROUPS_2 = ((0, 1), (2, 3))
# gates whose top-k weights are the renormalised top-k softmax (or sigmoid) probabilities
EXACT = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"]
EXACT += ["fused_plain", "module_list"]


def _grouped(blocks: Any, seed: int, groups: Any = GROUPS_3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {b.name: group_coeffs(rng.dirichlet(np.ones(b.n_experts)), groups) for b in blocks}


def _x(shape: tuple[int, ...] = (2, 5, 32), seed: int = 3) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _h(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _probs(block: Any, gate: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The gate's probabilities over the E experts, written out here: (N, E)."""
    bias = getattr(gate, "bias", None)
    logits = x.float() @ gate.weight.float().T + (bias.float() if bias is not None else 0.0)
    if block.score_fn == "sigmoid":
        s = torch.sigmoid(logits)
        return s / s.sum(-1, keepdim=True)
    return torch.softmax(logits, dim=-1)


# --- plans ------------------------------------------------------------------------------------


def test_group_coeffs_splits_a_point_of_the_simplex() -> None:
    c = np.array([0.1, 0.2, 0.3, 0.4])
    rows = group_coeffs(c, GROUPS_3)
    assert np.allclose(rows, [[0.25, 0, 0.75, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    assert groups_of(rows) == GROUPS_3 and groups_of(c) == ((0, 1, 2, 3),)
    lonely = group_coeffs([0.5, 0.5, 0.0, 0.0], GROUPS_2)  # no weight on group 1: plain average
    assert np.allclose(lonely, [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])
    partial = group_coeffs(c, ((0,), (3,)))  # experts 1 and 2 in no group: dropped
    assert np.allclose(partial, [[1, 0, 0, 0], [0, 0, 0, 1]])
    for groups, message in [
        ((), "need.* m >= 1"),
        (((0,), ()), "group 1 .*has no expert"),
        (((0, 4),), r"expert 4, outside \[0, 4\)"),
        (((0, 1), (1, 2)), "groups 0 and 1 .*both hold expert 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            group_coeffs(c, groups, block="b0")
    with pytest.raises(ValueError, match="splits coeffs"):
        group_coeffs(rows, GROUPS_3)


def test_grouped_plans_are_validated_per_block(make_case: Any) -> None:
    blocks = find_moe_blocks(make_case("mixtral").model)
    a, b = (blk.name for blk in blocks)
    plan = grouped_plan({a: np.full(4, 0.25), b: np.full(4, 0.25)}, {a: GROUPS_2, b: GROUPS_3})
    assert [v.shape for v in validate_plan(plan, blocks).values()] == [(2, 4), (3, 4)]
    mixed = {a: np.full(4, 0.25), b: plan[b]}  # one merged expert here, three there
    assert [v.ndim for v in validate_plan(mixed, blocks).values()] == [1, 2]
    with pytest.raises(ValueError, match=f"no groups given for block '{b}'"):
        grouped_plan(mixed, {a: GROUPS_2})
    overlapping = mixed | {b: np.array([[0.5, 0.5, 0, 0], [0, 0.5, 0.5, 0]])}
    with pytest.raises(ValueError, match=rf"block '{b}': rows \[0, 1\] all give weight"):
        validate_plan(overlapping, blocks)
    assert all(np.array_equal(v, np.eye(4)) for v in identity_plan(blocks).values())


# --- the exact limits -------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXACT)
@torch.no_grad()
def test_every_expert_its_own_group_is_the_full_moe(make_case: Any, name: str, close: Any) -> None:
    """m = E, one-hot rows, k' = the model's top-k: the full MoE's output.

    Exact (up to float rounding) for gates whose combine weights are the top-k probabilities
    renormalised: the chosen groups are the chosen experts and the weights are the same.
    """
    case = make_case(name)
    blocks = find_moe_blocks(case.model)
    if name == "deepseek_v3":  # its group-limited top-k is another rule: switch it off
        for b in blocks:
            gate = get_module(case.model, b.gate_name)
            gate.num_group, gate.topk_group = 1, 1
    top_k = {b.top_k for b in blocks}.pop()
    assert top_k == 2
    with GateRecorder(case.model) as rec:
        full = case.run()
    for b in blocks:  # precondition: no near-tie at the k-th choice that rounding could flip
        ranked = rec.token_probs(b.name).sort(dim=-1, descending=True).values
        assert float((ranked[:, top_k - 1] - ranked[:, top_k]).min()) > 1e-4
    merger = Merger(case.model, group_top_k=top_k)
    merger.apply(identity_plan(blocks))
    assert all(isinstance(get_module(case.model, b.name), GroupedBlock) for b in blocks)
    close(case.run(), full)


@pytest.mark.parametrize("name", ["switch", "phimoe"])
@torch.no_grad()
def test_gates_without_renormalised_weights_choose_the_same_experts(
    make_case: Any, name: str, close: Any, reference: Any
) -> None:
    """Switch (top-1 scaled by its probability) and PhiMoE (sparsemixer multipliers): the
    grouped block picks the experts the model picks, and weighs them by renormalised gate
    probabilities instead of the model's own multipliers."""
    case = make_case(name)
    blocks = find_moe_blocks(case.model)
    block = blocks[0]
    original = get_module(case.model, block.name)
    x = _x()
    flat = x.reshape(-1, 32)
    full = original(x).reshape(-1, 32)
    merger = Merger(case.model, group_top_k=block.top_k or 1)
    merger.apply(identity_plan(blocks))
    grouped = get_module(case.model, block.name)
    chosen, weights = grouped.route(flat)
    if name == "switch":
        index, mass, _ = original.router(x)  # one-hot (B, T, E) choice and its probability
        assert torch.equal(chosen[:, 0], index.reshape(-1, 4).argmax(-1))
        close(full, mass.reshape(-1, 1) * _h(grouped(x)).reshape(-1, 32))
        return
    _, multipliers, index = original.router(flat)
    assert torch.equal(chosen.sort(-1).values, index.sort(-1).values)
    outputs = torch.stack([reference.expert_output(original, e, flat) for e in range(4)])
    tokens = torch.arange(len(flat))
    own = sum(multipliers[:, k, None] * outputs[index[:, k], tokens] for k in range(2))
    close(full, own)  # the model's rule, written out
    ours = sum(weights[:, k, None] * outputs[chosen[:, k], tokens] for k in range(2))
    close(_h(grouped(x)).reshape(-1, 32), ours)


@torch.no_grad()
def test_one_group_is_the_single_merge(case: Any) -> None:
    """m = 1: a (1, E) plan serves exactly what the (E,) plan serves (same tensors, same
    forward: the single merged expert on every token)."""
    merger = Merger(case.model)
    plan = {b.name: np.random.default_rng(0).dirichlet(np.ones(4)) for b in merger.blocks}
    merger.apply(plan)
    single = case.run()
    tensors = [
        get_module(case.model, b.name).expert.get_parameter(t.name).clone()
        for b in merger.blocks
        for t in b.targets
    ]
    stats = merger.apply({k: v[None, :] for k, v in plan.items()})
    assert not stats.in_place  # another form: the blocks are rebuilt
    for b in merger.blocks:
        assert isinstance(get_module(case.model, b.name), GroupedBlock)
    again = [
        get_module(case.model, b.name).merged[0].get_parameter(t.name)
        for b in merger.blocks
        for t in b.targets
    ]
    assert all(torch.equal(a, b) for a, b in zip(tensors, again, strict=True))
    assert torch.equal(case.run(), single)


@pytest.mark.parametrize("top_k", [1, 2])
@torch.no_grad()
def test_grouped_block_follows_its_routing_rule(case: Any, top_k: int, close: Any) -> None:
    """Every family: merged tensors are the rows' averages, and the output is
    ``scale * sum_{g in top-k'} w_g f_g(x) + shared(x)`` with group scores summed from the
    gate's probabilities, computed densely here (every merged expert on every token)."""
    merger = Merger(case.model, group_top_k=top_k)
    plan = _grouped(merger.blocks, 0)
    merger.apply(plan)
    x = _x()
    flat = x.reshape(-1, 32)
    for block in merger.blocks:
        grouped = get_module(case.model, block.name)
        assert isinstance(grouped, GroupedBlock) and grouped.n_groups == 3
        experts = grouped.merged_from.experts
        for g, row in enumerate(plan[block.name]):
            c = torch.tensor(row)
            for t in block.targets:
                if block.fused:
                    stacked = getattr(experts, t.name).double()
                else:
                    stacked = torch.stack([m.get_parameter(t.name) for m in experts.children()])
                want = torch.einsum("e,e...->...", c, stacked.double())
                close(grouped.merged[g].get_parameter(t.name).double(), want)
        gate = get_module(case.model, block.gate_name)
        probs = _probs(block, gate, flat)  # (N, E)
        scores = torch.stack([probs[:, list(g)].sum(-1) for g in GROUPS_3], dim=-1)  # (N, 3)
        top, chosen = scores.topk(top_k, dim=-1)
        weights = top / top.sum(-1, keepdim=True)
        every = torch.stack([grouped.merged[g](flat) for g in range(3)])  # (3, N, H)
        tokens = torch.arange(len(flat))
        routed = sum(weights[:, k, None] * every[chosen[:, k], tokens] for k in range(top_k))
        original = grouped.merged_from
        scale = block.routed_scale
        want = scale * routed + _shared(original, flat)
        close(_h(grouped(x)).reshape(-1, 32), want)


def _shared(original: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    if hasattr(original, "shared_expert"):
        out = torch.sigmoid(original.shared_expert_gate(x)) * original.shared_expert(x)
    if hasattr(original, "shared_experts"):
        out = out + original.shared_experts(x)
    return out


# --- serving: restore, re-merge in place, settings ---------------------------------------------


@torch.no_grad()
def test_restore_is_bit_identical_after_grouped_merges(case: Any) -> None:
    before = case.run()
    originals = {b.name: get_module(case.model, b.name) for b in find_moe_blocks(case.model)}
    merger = Merger(case.model, group_top_k=2)
    merger.apply(_grouped(merger.blocks, 0))
    first = case.run()
    merger.apply(_grouped(merger.blocks, 1))  # in place
    assert not torch.equal(case.run(), first)
    merger.apply(_grouped(merger.blocks, 2, GROUPS_2))  # another m: rebuilt
    merger.restore()
    assert torch.equal(case.run(), before)
    for name, module in originals.items():
        assert get_module(case.model, name) is module


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "switch", "fused_plain"])
@torch.no_grad()
def test_re_merging_with_the_same_m_is_in_place(make_case: Any, name: str) -> None:
    case = make_case(name)
    merger = Merger(case.model, group_top_k=2)
    merger.apply(_grouped(merger.blocks, 0))

    def snapshot() -> tuple[Any, ...]:
        gc.collect()
        ptrs = tuple(p.data_ptr() for p in case.model.parameters())
        n_tensors = sum(1 for o in gc.get_objects() if type(o) in (torch.Tensor, nn.Parameter))
        return ptrs, merger.resident_bytes(), n_tensors

    first = snapshot()
    outputs = set()
    for seed in range(1, 11):  # new coeffs, and every other slot a new grouping of 3 groups
        groups = GROUPS_3 if seed % 2 else ((1, 3), (0,), (2,))
        plan = _grouped(merger.blocks, seed, groups)
        stats = merger.apply(plan)
        assert stats.in_place and stats.n_merged == 3 * len(merger.blocks)
        for b in merger.blocks:
            assert get_module(case.model, b.name).groups == groups
        outputs.add(float(case.run().sum()))
    assert snapshot() == first
    assert len(outputs) == 10
    served = case.run()
    merger.restore()  # the last plan merged afresh into new tensors: the same model
    merger.apply(plan)
    assert torch.equal(case.run(), served)
    stats = merger.apply(_grouped(merger.blocks, 0, GROUPS_2))
    assert not stats.in_place and stats.n_merged == 2 * len(merger.blocks)


@torch.no_grad()
def test_group_top_k_is_checked_and_applied(make_case: Any) -> None:
    case = make_case("mixtral")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="group_top_k must be an int >= 1"):
            Merger(case.model, group_top_k=bad)  # type: ignore[arg-type]
    merger = Merger(case.model, group_top_k=5)
    merger.apply(_grouped(merger.blocks, 0))
    block = get_module(case.model, merger.blocks[0].name)
    assert block.top_k == 3  # min(m, group_top_k)
    x = _x().reshape(-1, 32)
    assert block.route(x)[0].shape == (10, 3)
    wide = case.run()
    merger.group_top_k = 1
    assert block.top_k == 1 and block.route(x)[0].shape == (10, 1)
    assert not torch.equal(case.run(), wide)
    with pytest.raises(ValueError, match="group_top_k"):
        merger.group_top_k = 0


@torch.no_grad()
def test_gates_are_recorded_on_a_grouped_model(make_case: Any) -> None:
    case = make_case("olmoe")
    with GateRecorder(case.model) as rec:
        case.run()
    merger = Merger(case.model)
    merger.apply(_grouped(merger.blocks, 0))
    with GateRecorder(case.model) as grouped_rec:
        case.run()
    first = merger.blocks[0].name  # sees the same input in both models
    torch.testing.assert_close(grouped_rec.token_probs(first), rec.token_probs(first))


# --- memory-lean ------------------------------------------------------------------------------


@torch.no_grad()
def test_lean_grouped_merges_keep_only_the_merged_experts(
    hf_case: Any, tmp_path: Path, close: Any
) -> None:
    hf_case.model.save_pretrained(tmp_path)
    before = hf_case.run()
    full = load_checkpoint(tmp_path)
    lean = load_checkpoint(tmp_path, lean=True)
    base = lean.merger.resident_bytes()  # no expert at all before the first merge
    for seed, groups in [(0, GROUPS_3), (1, GROUPS_3), (2, GROUPS_2)]:
        plan = _grouped(full.blocks, seed, groups)
        full.merger.apply(plan)
        stats = lean.merger.apply(plan)
        m = len(groups)
        assert stats.lean and stats.in_place == (seed == 1)
        members = 4 * m * 4  # the (E, m) float32 membership of each block
        expected = base + sum(m * b.expert_bytes + members for b in lean.blocks)
        assert lean.merger.resident_bytes() == expected
        for b in full.blocks:
            ours, theirs = get_module(lean.model, b.name), get_module(full.model, b.name)
            for g in range(m):
                for t in b.targets:
                    close(
                        ours.merged[g].get_parameter(t.name), theirs.merged[g].get_parameter(t.name)
                    )
        with torch.no_grad():
            close(lean.model(**hf_case.inputs).logits, full.model(**hf_case.inputs).logits)
    lean.merger.restore()
    with torch.no_grad():
        close(lean.model(**hf_case.inputs).logits, before)
    lean.merger.apply(_grouped(full.blocks, 3))
    single = {b.name: np.full(4, 0.25) for b in lean.blocks}
    lean.merger.apply(single)  # back to one merged expert: rebuilt, the groups released
    assert isinstance(get_module(lean.model, lean.blocks[0].name), MergedBlock)
    assert lean.merger.resident_bytes() == base + sum(b.expert_bytes for b in lean.blocks)
