from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from torch import nn

from tanbr.model import UnsupportedModelError, find_moe_blocks, supports


def test_finds_every_block_with_its_layout(case: Any) -> None:
    blocks = find_moe_blocks(case.model)
    assert len(blocks) == case.n_blocks
    assert {b.layout for b in blocks} == {case.layout}
    for b in blocks:
        assert b.n_experts == 4
        assert b.hidden_size == 32
        block = case.model.get_submodule(b.name)
        assert block.get_submodule(b.gate_name[len(b.name) + 1 :]).weight.shape == (4, 32)
    assert supports(case.model).ok


def test_block_details_per_architecture(make_case: Any) -> None:
    qwen = find_moe_blocks(make_case("qwen2_moe").model)[0]
    assert qwen.shared_names == ("model.layers.0.mlp.shared_expert",)
    assert qwen.shared_gate_name == "model.layers.0.mlp.shared_expert_gate"
    assert qwen.layout == "fused-gated" and qwen.split_gate_up

    deepseek = find_moe_blocks(make_case("deepseek_v3").model)
    assert [b.name for b in deepseek] == [
        "model.layers.1.mlp",
        "model.layers.2.mlp",
    ]  # layer 0 dense
    assert deepseek[0].shared_names == ("model.layers.1.mlp.shared_experts",)
    assert deepseek[0].score_fn == "sigmoid" and deepseek[0].routed_scale == 2.5

    phimoe = find_moe_blocks(make_case("phimoe").model)[0]
    assert phimoe.gate_name == "model.layers.0.mlp.router"

    switch = [b.name for b in find_moe_blocks(make_case("switch").model)]
    assert switch == ["encoder.block.1.layer.1.mlp", "decoder.block.1.layer.2.mlp"]
    assert find_moe_blocks(make_case("switch").model)[0].gate_name.endswith("router.classifier")

    plain = find_moe_blocks(make_case("fused_plain").model)[0]
    assert plain.layout == "fused" and plain.has_bias and plain.top_k == 2
    assert [t.name for t in plain.targets] == [
        "up_proj",
        "down_proj",
        "up_proj_bias",
        "down_proj_bias",
    ]
    assert plain.expert_numel == 40 * 32 + 32 * 40 + 40 + 32


class _Experts(nn.Module):
    def __init__(self, e: int = 4, h: int = 8, i: int = 6) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.zeros(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.zeros(e, h, i))
        self.act_fn = nn.SiLU()


class _Block(nn.Module):
    def __init__(self, **children: nn.Module) -> None:
        super().__init__()
        for k, v in children.items():
            self.add_module(k, v)


class _TwoArgBlock(_Block):
    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return hidden_states


class _TupleBlock(_Block):
    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return hidden_states, hidden_states


def _wrap(block: nn.Module) -> nn.Module:
    return nn.ModuleDict({"mlp": block})


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (nn.Sequential(nn.Linear(8, 8), nn.ReLU()), "no MoE block found in Sequential"),
        (
            _wrap(_Block(gate=nn.Linear(8, 4), experts=nn.Linear(8, 8))),
            "neither fused expert tensors",
        ),
        (_wrap(_Block(experts=_Experts())), "no token gate found"),
        (
            _wrap(
                _Block(gate=nn.Linear(8, 4, bias=False), experts=_Experts(), extra=nn.Linear(8, 8))
            ),
            "child 'extra'",
        ),
        (
            _wrap(
                _Block(
                    gate=nn.Linear(8, 2, bias=False),
                    experts=nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 4)]),
                )
            ),
            "differs in class or parameter shapes",
        ),
        (
            _wrap(_TwoArgBlock(gate=nn.Linear(8, 4, bias=False), experts=_Experts())),
            "takes ['mask'] besides the hidden states",
        ),
    ],
)
def test_unsupported_models_name_the_problem(model: nn.Module, message: str) -> None:
    with pytest.raises(UnsupportedModelError, match=re.escape(message)) as err:
        find_moe_blocks(model)
    assert isinstance(err.value, ValueError)
    if "Sequential" not in message:
        assert "'mlp'" in str(err.value)  # names the module
    support = supports(model)
    assert not support.ok and message in support.reason


def test_unsupported_transformers_model_without_moe() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=32,
    )
    support = supports(LlamaForCausalLM(cfg))
    assert not support.ok
    assert "LlamaForCausalLM" in support.reason and "experts" in support.reason


def test_supports_never_raises_on_broken_modules() -> None:
    class Broken(nn.Module):
        def named_modules(self, *args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("boom")

    support = supports(Broken())
    assert not support.ok and "boom" in support.reason


def test_blocks_returning_tuples_are_mirrored() -> None:
    model = _wrap(_TupleBlock(gate=nn.Linear(8, 4, bias=False), experts=_Experts()))
    block = find_moe_blocks(model)[0]
    assert block.outputs == 2
    from tanbr.model import Merger, uniform_plan

    merger = Merger(model)
    merger.apply(uniform_plan(merger.blocks))
    hidden, extra = model["mlp"](torch.zeros(2, 3, 8))
    assert hidden.shape == (2, 3, 8) and extra is None
