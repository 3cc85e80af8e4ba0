"""Merged weights as a plan value, and the static merges that produce them (RegMean, Fisher)."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tanbr.model import (
    Grams,
    MergedBlock,
    MergedWeights,
    Merger,
    RoutingTap,
    expert_fisher,
    find_moe_blocks,
    fisher_merge,
    fisher_plan,
    gate_probs,
    load_checkpoint,
    one_hot_plan,
    regmean_grams,
    regmean_merge,
    regmean_plan,
    sampled_label_log_likelihood,
    sampled_token_log_likelihood,
    validate_plan,
)
from tanbr.model.discovery import MoEBlock, Target, get_module
from tanbr.model.regmean import LinearMap
from tanbr.model.static_merges import stacked_experts

H = 32


def _plan(blocks: Any, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {b.name: rng.dirichlet(np.ones(b.n_experts)) for b in blocks}


def _batches(case: Any, n: int = 2, shape: tuple[int, int] = (4, 12), seed: int = 0) -> list[Any]:
    return list(case.batches(n, seed=seed, shape=shape))


def _token_ll(seed: int = 0) -> Any:
    return functools.partial(
        sampled_token_log_likelihood, generator=torch.Generator().manual_seed(seed)
    )


def _one_expert_weights(model: nn.Module, blocks: Any, e: int) -> dict[str, MergedWeights]:
    return {
        b.name: MergedWeights({n: s[e].clone() for n, s in stacked_experts(model, b).items()})
        for b in blocks
    }


@torch.no_grad()
def _make_identical(model: nn.Module, blocks: Any, source: int = 0) -> None:
    """Every expert becomes a copy of expert ``source``."""
    for block in blocks:
        experts = get_module(model, block.experts_name)
        for t in block.targets:
            if block.fused:
                p = experts.get_parameter(t.name)
                p.copy_(p[source : source + 1].expand_as(p))
            else:
                members = list(experts.children())
                for m in members:
                    m.get_parameter(t.name).copy_(members[source].get_parameter(t.name))


@torch.no_grad()
def _route_all_to(case: Any, e: int) -> None:
    """Top-1 routing with a gate bias that sends every token to expert e (the tiny stacks)."""
    for layer in case.model.layers:
        block = layer["mlp"]
        block.top_k = 1
        if hasattr(block, "gate"):  # the default model's layout: a bias-free gate, replaced
            block.gate = nn.Linear(H, 4, bias=True)
        gate = block.gate if hasattr(block, "gate") else block.router
        gate.weight.zero_()
        gate.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0]).index_fill(0, torch.tensor(e), 8.0))


def _h(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


# --- merged weights as a plan value -----------------------------------------------------------


@torch.no_grad()
def test_weights_of_one_expert_give_exactly_the_one_hot_merge(case: Any) -> None:
    merger = Merger(case.model)
    for e in (0, 3):
        stats = merger.apply(_one_expert_weights(case.model, merger.blocks, e))
        assert stats.n_merged == len(merger.blocks)
        by_weights = case.run()
        assert all(isinstance(get_module(case.model, b.name), MergedBlock) for b in merger.blocks)
        merger.apply(one_hot_plan(merger.blocks, e))  # in place, over the weights
        assert torch.equal(case.run(), by_weights)


@torch.no_grad()
def test_restore_and_re_merging_around_a_weights_plan(case: Any) -> None:
    before = case.run()
    blocks = find_moe_blocks(case.model)
    weights = regmean_plan(case.model, blocks, _batches(case))
    merger = Merger(case.model)
    first = merger.apply(weights)
    assert not first.in_place
    served = case.run()
    merger.apply(_plan(blocks, 0))  # weights -> coeffs, in place
    by_coeffs = case.run()
    again = merger.apply(weights)  # coeffs -> weights, in place
    assert again.in_place
    assert torch.equal(case.run(), served)
    merger.apply(_plan(blocks, 0))
    assert torch.equal(case.run(), by_coeffs)
    merger.restore()
    assert torch.equal(case.run(), before)


@torch.no_grad()
def test_weights_plan_is_copied_prepared_and_mixed_with_coeffs(make_case: Any) -> None:
    case = make_case("qwen2_moe")
    merger = Merger(case.model)
    first, second = merger.blocks
    weights = _one_expert_weights(case.model, merger.blocks, 2)
    mixed = {first.name: weights[first.name], second.name: np.eye(4)[1]}
    prepared = merger.prepare(mixed)
    assert merger.mode == "full"
    merger.commit(prepared)
    out = case.run()
    merger.restore()
    merger.apply({first.name: np.eye(4)[2], second.name: np.eye(4)[1]})
    assert torch.equal(case.run(), out)
    merged = get_module(case.model, first.name).expert.gate_up_proj
    source = weights[first.name].tensors["gate_up_proj"]
    assert merged.data_ptr() != source.data_ptr()  # the plan's tensors are never aliased
    with pytest.raises(ValueError, match="merged weights where coeffs are expected"):
        validate_plan(mixed, merger.blocks)


def test_bad_weights_plans_name_the_block_and_target(make_case: Any) -> None:
    case = make_case("gpt_oss")
    merger = Merger(case.model)
    block = merger.blocks[0]
    good = {t.name: torch.zeros(t.shape) for t in block.targets}
    rest = {b.name: np.full(4, 0.25) for b in merger.blocks[1:]}
    where = r"merged weights of block 'model.layers.0.mlp'"
    bad_values: list[tuple[dict[str, Any], str]] = [
        ({k: v for k, v in good.items() if k != "down_proj"}, r"miss target\(s\) \['down_proj'\]"),
        (good | {"down_proj_weight": torch.zeros(1)}, "unknown target.*did you mean"),
        (good | {"down_proj": torch.zeros(32, 24)}, r"'down_proj' has shape \(32, 24\), expected"),
        (good | {"gate_up_proj_bias": torch.full((48,), float("nan"))}, "1?48 NaN or infinite"),
        (good | {"down_proj": torch.full((24, 32), 1e300, dtype=torch.float64)}, "after the cast"),
        (good | {"down_proj": [[0.0]]}, "'down_proj' is not a tensor"),
        (good | {"down_proj": torch.zeros(24, 32, dtype=torch.int64)}, "must be floating point"),
    ]
    for tensors, message in bad_values:
        with pytest.raises(ValueError, match=f"{where}.*{message}"):
            merger.apply({block.name: MergedWeights(tensors)} | rest)
    with pytest.raises(ValueError, match="map target names to tensors"):
        MergedWeights([torch.zeros(1)])  # type: ignore[arg-type]
    assert merger.mode == "full"


@torch.no_grad()
def test_lean_weights_plan_reads_nothing_and_equals_in_memory(
    hf_case: Any, tmp_path: Path, close: Any
) -> None:
    hf_case.model.save_pretrained(tmp_path)
    full = load_checkpoint(tmp_path)
    lean = load_checkpoint(tmp_path, lean=True)
    plan = regmean_plan(full.model, full.blocks, _batches(hf_case))
    opened: list[str] = []
    store_open = lean.merger.source.open

    def spy(block: MoEBlock) -> Any:
        opened.append(block.name)
        return store_open(block)

    lean.merger.source.open = spy  # type: ignore[method-assign]
    for _ in range(2):  # a first merge, then in place
        stats = lean.merger.apply(plan)
        full.merger.apply(plan)
        assert opened == [] and stats.lean
        for b in full.blocks:
            for t in b.targets:
                a = get_module(full.model, b.name).expert.get_parameter(t.name)
                c = get_module(lean.model, b.name).expert.get_parameter(t.name)
                assert torch.equal(a, c)  # the same bytes, copied from the plan
        close(lean.model(**hf_case.inputs).logits, full.model(**hf_case.inputs).logits)
    lean.merger.apply(_plan(full.blocks, 0))  # coeffs read from disk again
    assert opened == [b.name for b in full.blocks]
    lean.merger.restore()
    full.merger.restore()
    close(lean.model(**hf_case.inputs).logits, hf_case.run())


# --- routing as the static merges see it ------------------------------------------------------


@torch.no_grad()
def test_routing_tap_gives_each_real_token_its_experts(case: Any) -> None:
    blocks = find_moe_blocks(case.model)
    seen: list[tuple[str, torch.Tensor]] = []
    with RoutingTap(case.model, blocks, lambda b, x, hit: seen.append((b.name, hit))) as tap:
        mask = torch.ones(2, 6, dtype=torch.bool)
        mask[1, 4:] = False  # two padding tokens
        tap.set_mask(mask)
        case.run()
    assert sorted(name for name, _ in seen) == sorted(b.name for b in blocks)
    for block in blocks:
        hit = next(h for name, h in seen if name == block.name)
        counts = hit.sum(dim=1)
        assert counts.tolist() == [block.top_k or 1] * 10 + [0, 0]


@torch.no_grad()
def test_routing_tap_follows_the_routers_own_choice(make_case: Any) -> None:
    case = make_case("deepseek_v3")  # group-limited routing: not the top-k of the gate
    blocks = find_moe_blocks(case.model)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    with RoutingTap(case.model, blocks, lambda b, x, hit: seen.update({b.name: (x, hit)})):
        case.run()
    differs = False
    for block in blocks:
        x, hit = seen[block.name]
        _, _, index = get_module(case.model, block.name).gate(x)  # the router itself
        own = torch.zeros_like(hit).scatter_(1, index, True)
        assert torch.equal(hit, own)
        gate = get_module(case.model, block.gate_name)
        top = torch.topk(gate_probs(block, gate, x), 2, dim=-1).indices
        differs |= not torch.equal(hit, torch.zeros_like(hit).scatter_(1, top, True))
    assert differs  # the check can tell the router's choice from the gate's top-k


# --- RegMean ----------------------------------------------------------------------------------


@torch.no_grad()
def test_regmean_of_identical_experts_is_that_expert(case: Any, close: Any) -> None:
    blocks = find_moe_blocks(case.model)
    _make_identical(case.model, blocks, source=1)
    plan = regmean_plan(case.model, blocks, _batches(case))
    for b in blocks:
        stacked = stacked_experts(case.model, b)
        assert plan[b.name].method == "regmean"
        for t in b.targets:
            close(plan[b.name].tensors[t.name], stacked[t.name][1])


@pytest.mark.parametrize("name", ["fused_plain", "module_list"])
@torch.no_grad()
def test_regmean_with_every_token_on_one_expert_is_that_expert(
    make_case: Any, name: str, close: Any
) -> None:
    case = make_case(name)
    _route_all_to(case, 2)
    blocks = find_moe_blocks(case.model)
    assert all(b.top_k == 1 for b in blocks)
    batches = _batches(case, n=2, shape=(4, 16))  # 128 tokens: more than any map's inputs
    grams = regmean_grams(case.model, blocks, batches)
    for b in blocks:
        assert grams[b.name].tokens.tolist() == [0, 0, 128, 0]
        merged = regmean_merge(b, stacked_experts(case.model, b), grams[b.name])
        for t in b.targets:
            close(merged.tensors[t.name], stacked_experts(case.model, b)[t.name][2])


def _subspace_case(seed: int = 0) -> tuple[MoEBlock, dict[str, torch.Tensor], list[torch.Tensor]]:
    """Four experts of one biased map (out 6, in 10); expert 0's inputs span 3 dimensions."""
    g = torch.Generator().manual_seed(seed)
    block = MoEBlock(
        name="b",
        n_experts=4,
        layout="fused",
        experts_name="b.experts",
        gate_name="b.gate",
        hidden_size=10,
        targets=(Target("up_proj", (6, 10)), Target("up_proj_bias", (6,))),
    )
    stacked = {"up_proj": torch.randn(4, 6, 10, generator=g), "up_proj_bias": torch.randn(4, 6)}
    basis = torch.randn(3, 10, generator=g)
    inputs = [torch.randn(40, 3, generator=g) @ basis]
    inputs += [torch.randn(40, 10, generator=g) * (1.0 + e) for e in range(1, 4)]
    return block, stacked, inputs


def _grams_of(inputs: list[torch.Tensor], maps: tuple[LinearMap, ...]) -> Grams:
    aug = [torch.cat([x, torch.ones(x.shape[0], 1)], 1).double() for x in inputs]
    gram = torch.stack([a.T @ a for a in aug])
    tokens = torch.tensor([x.shape[0] for x in inputs])
    return Grams("b", maps, {maps[0].name: gram}, tokens)


def _error(w: torch.Tensor, b: torch.Tensor, stacked: Any, inputs: list[torch.Tensor]) -> float:
    """sum_e || X_e W^T + b - (X_e W_e^T + b_e) ||^2: the merged map against every expert."""
    total = 0.0
    for e, x in enumerate(inputs):
        want = x.double() @ stacked["up_proj"][e].double().T + stacked["up_proj_bias"][e].double()
        total += float(((x.double() @ w.double().T + b.double()) - want).square().sum())
    return total


def test_regmean_beats_the_plain_average_on_each_experts_inputs() -> None:
    block, stacked, inputs = _subspace_case()
    maps = (LinearMap("up_proj", "up_proj", "up_proj_bias", False, 10),)
    grams = _grams_of(inputs, maps)
    plain = _error(stacked["up_proj"].mean(0), stacked["up_proj_bias"].mean(0), stacked, inputs)
    exact = regmean_merge(block, stacked, grams, alpha=1.0).tensors
    shrunk = regmean_merge(block, stacked, grams, alpha=0.9).tensors
    best = _error(exact["up_proj"], exact["up_proj_bias"], stacked, inputs)
    assert best < _error(shrunk["up_proj"], shrunk["up_proj_bias"], stacked, inputs) < plain
    # alpha = 1 is the least-squares fit of every expert's outputs on its own inputs
    x = torch.cat([torch.cat([i, torch.ones(40, 1)], 1) for i in inputs]).double()
    y = torch.cat(
        [
            i.double() @ stacked["up_proj"][e].double().T + stacked["up_proj_bias"][e].double()
            for e, i in enumerate(inputs)
        ]
    )
    lstsq = torch.linalg.lstsq(x, y).solution.T  # (6, 11)
    torch.testing.assert_close(exact["up_proj"], lstsq[:, :10].float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(exact["up_proj_bias"], lstsq[:, 10].float(), atol=1e-5, rtol=1e-5)
    # one expert's Gram alone: that expert, whatever the others hold
    alone = _grams_of([inputs[1] if e == 1 else torch.zeros(0, 10) for e in range(4)], maps)
    one = regmean_merge(block, stacked, alone).tensors
    torch.testing.assert_close(one["up_proj"], stacked["up_proj"][1], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_regmean_up_projection_fits_each_expert_better_than_the_average(
    make_case: Any,
) -> None:
    case = make_case("fused_plain")
    blocks = find_moe_blocks(case.model)
    batches = _batches(case, n=2, shape=(4, 16))
    inputs: dict[str, list[torch.Tensor]] = {b.name: [] for b in blocks}
    hooks = [  # the block inputs, by hand
        get_module(case.model, b.name).register_forward_pre_hook(
            lambda m, args, name=b.name: inputs[name].append(args[0].reshape(-1, H))
        )
        for b in blocks
    ]
    for batch in batches:
        case.model(**batch)
    for h in hooks:
        h.remove()
    plans = [regmean_plan(case.model, blocks, batches, alpha=a) for a in (1.0, 0.9)]
    for b in blocks:
        x = torch.cat(inputs[b.name])
        gate = get_module(case.model, b.gate_name)
        top = torch.topk(gate_probs(b, gate, x), 2, dim=-1).indices
        routed = [x[(top == e).any(-1)] for e in range(4)]
        stacked = {
            "up_proj": stacked_experts(case.model, b)["up_proj"],
            "up_proj_bias": stacked_experts(case.model, b)["up_proj_bias"],
        }
        plain = _error(stacked["up_proj"].mean(0), stacked["up_proj_bias"].mean(0), stacked, routed)
        errors = []
        for plan in plans:
            merged = plan[b.name].tensors
            errors.append(_error(merged["up_proj"], merged["up_proj_bias"], stacked, routed))
        assert errors[0] < errors[1] < plain  # the exact fit, the shrunk one, the average


def test_regmean_singular_grams_take_a_ridge_or_raise(caplog: Any) -> None:
    block, stacked, inputs = _subspace_case()
    maps = (LinearMap("up_proj", "up_proj", "up_proj_bias", False, 10),)
    dead = [x.clone() for x in inputs]
    for x in dead:
        x[:, 7] = 0.0  # an input no token ever sets
    grams = _grams_of(dead, maps)
    with caplog.at_level(logging.WARNING, logger="tanbr.model.regmean"):
        merged = regmean_merge(block, stacked, grams).tensors
    assert "span 10 of 11 dimensions" in caplog.text and "added a ridge" in caplog.text
    column = merged["up_proj"][:, 7].double()
    torch.testing.assert_close(column, stacked["up_proj"][:, :, 7].double().mean(0))
    with pytest.raises(ValueError, match=r"block 'b' target 'up_proj'.*singular.*ridge > 0"):
        regmean_merge(block, stacked, grams, ridge=0.0)
    empty = _grams_of([torch.zeros(0, 10)] * 4, maps)
    with pytest.raises(ValueError, match="no calibration token reached any expert"):
        regmean_merge(block, stacked, empty)
    with pytest.raises(ValueError, match=r"alpha must be in \[0.0, 1.0\]"):
        regmean_merge(block, stacked, grams, alpha=1.5)


def test_static_merges_need_the_full_moe_in_memory(make_case: Any, tmp_path: Path) -> None:
    case = make_case("mixtral")
    merger = Merger(case.model)
    merger.apply(_plan(merger.blocks, 0))
    with pytest.raises(ValueError, match=r"block 'model.layers.0.mlp' is merged.*restore"):
        regmean_plan(case.model, merger.blocks, _batches(case))
    merger.restore()
    with pytest.raises(ValueError, match="no calibration batch"):
        regmean_plan(case.model, merger.blocks, [])
    with pytest.raises(ValueError, match="calibration batch 0 is a Tensor"):
        regmean_plan(case.model, merger.blocks, [torch.zeros(1)])  # type: ignore[list-item]
    case.model.save_pretrained(tmp_path)
    lean = load_checkpoint(tmp_path, lean=True)
    with pytest.raises(ValueError, match=r"not resident.*Merger\.restore"):
        fisher_plan(lean.model, lean.blocks, _batches(case), _token_ll())
    lean.merger.restore()  # the experts read back: now it calibrates
    with torch.inference_mode(), pytest.raises(ValueError, match=r"outside torch\.inference_mode"):
        fisher_plan(lean.model, lean.blocks, _batches(case), _token_ll())
    plan = fisher_plan(lean.model, lean.blocks, _batches(case), _token_ll())
    lean.merger.apply(plan)


# --- Fisher -----------------------------------------------------------------------------------


def test_fisher_merge_follows_the_fisher_mass() -> None:
    block, stacked, _ = _subspace_case()
    g = torch.Generator().manual_seed(1)
    on_one = {n: torch.zeros_like(s) for n, s in stacked.items()}
    for n in on_one:
        on_one[n][3] = torch.rand(on_one[n][3].shape, generator=g) + 0.1
    merged = fisher_merge(block, stacked, on_one).tensors
    for n, s in stacked.items():
        torch.testing.assert_close(merged[n], s[3])
    equal = {n: torch.rand(s.shape[1:], generator=g).expand_as(s) for n, s in stacked.items()}
    merged = fisher_merge(block, stacked, equal).tensors
    for n, s in stacked.items():
        torch.testing.assert_close(merged[n], s.mean(0))
    none = {n: torch.zeros_like(s) for n, s in stacked.items()}
    merged = fisher_merge(block, stacked, none).tensors  # no mass anywhere: the plain average
    for n, s in stacked.items():
        torch.testing.assert_close(merged[n], s.mean(0))


@pytest.mark.parametrize("name", ["fused_plain", "module_list"])
def test_fisher_with_every_token_on_one_expert_is_that_expert(make_case: Any, name: str) -> None:
    case = make_case(name)
    _route_all_to(case, 1)
    blocks = find_moe_blocks(case.model)
    batches = _batches(case, n=2, shape=(3, 8))
    fisher = expert_fisher(case.model, blocks, batches, _token_ll())
    plan = fisher_plan(case.model, blocks, batches, _token_ll())
    for b in blocks:
        stacked = stacked_experts(case.model, b)
        for t in b.targets:
            f = fisher[b.name][t.name]
            assert float(f[1].sum()) > 0 and float(f[[0, 2, 3]].abs().sum()) == 0.0
            total = f.sum(0)
            reached = total > 1e-8 * total.mean()
            want = torch.where(reached, stacked[t.name][1], stacked[t.name].mean(0))
            torch.testing.assert_close(plan[b.name].tensors[t.name], want)


def test_fisher_is_an_elementwise_convex_combination(case: Any) -> None:
    blocks = find_moe_blocks(case.model)
    grads_before = [(p.requires_grad, p.grad) for p in case.model.parameters()]
    with torch.no_grad():  # the caller's no_grad: the Fisher enables what it needs
        plan = fisher_plan(case.model, blocks, _batches(case, shape=(2, 6)), _token_ll())
    assert [(p.requires_grad, p.grad) for p in case.model.parameters()] == grads_before
    for b in blocks:
        for t in b.targets:
            s = stacked_experts(case.model, b)[t.name]
            w = plan[b.name].tensors[t.name]
            slack = 1e-6 * float(s.abs().max())
            assert bool((w >= s.min(0).values - slack).all())
            assert bool((w <= s.max(0).values + slack).all())
    Merger(case.model).apply(plan)
    assert bool(torch.isfinite(case.run()).all())


def test_sampled_log_likelihoods_are_reproducible_per_sample() -> None:
    model = nn.Sequential(nn.Linear(5, 3))
    batch = {"input": torch.randn(4, 5, generator=torch.Generator().manual_seed(0))}

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, input: torch.Tensor) -> torch.Tensor:
            return self.inner(input)  # type: ignore[no-any-return]

    wrap = Wrap()
    a = sampled_label_log_likelihood(wrap, batch, generator=torch.Generator().manual_seed(3))
    b = sampled_label_log_likelihood(wrap, batch, generator=torch.Generator().manual_seed(3))
    assert a.requires_grad and a.shape == (4,) and torch.equal(a, b) and bool((a <= 0).all())
    with pytest.raises(ValueError, match=r"logits are \(B, C\)"):
        sampled_label_log_likelihood(
            wrap, {"input": torch.randn(2, 3, 5)}, generator=torch.Generator()
        )


def test_sampled_token_log_likelihood_leaves_padding_out() -> None:
    class TinyLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 7)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.embed(input_ids)  # type: ignore[no-any-return]  # logits (B, T, V = 7)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lm = TinyLM()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])

    def ll(m: torch.Tensor) -> torch.Tensor:
        batch = {"input_ids": ids, "attention_mask": m}
        return sampled_token_log_likelihood(lm, batch, generator=torch.Generator().manual_seed(0))

    padded, unpadded = ll(mask), ll(torch.ones_like(mask))  # the same draws
    assert padded.requires_grad
    padded, unpadded = padded.detach(), unpadded.detach()
    assert padded.shape == (2,) and bool((padded < 0).all())
    assert float(padded[0]) == float(unpadded[0])
    assert float(padded[1]) > float(unpadded[1])  # two log-probabilities fewer
