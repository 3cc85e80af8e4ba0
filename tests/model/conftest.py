"""Tiny random MoE models of every layout the merging engine supports (no downloads).

Each case is built fresh for every test (they take milliseconds), from a fixed seed, so tests
may merge, break or overwrite weights freely. A case knows how to call its model, how to read
one expert's output by hand (the reference math the merge is checked against) and whether its
gate's top-k weights sum to 1 (so that identical experts must give the full MoE output).
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

H = 32  # hidden size of every tiny case


@dataclass
class Case:
    name: str
    model: nn.Module
    inputs: dict[str, torch.Tensor]
    layout: str
    n_blocks: int
    hf: bool = True  # a transformers PreTrainedModel (save_pretrained / load_checkpoint work)
    normalized: bool = True  # the gate's combine weights sum to 1 per token
    extra: dict[str, Any] = field(default_factory=dict)

    def batches(
        self, n: int = 2, *, seed: int = 0, shape: tuple[int, int] = (4, 12)
    ) -> list[dict[str, torch.Tensor]]:
        """``n`` calibration batches shaped like the case's inputs (token ids, or hidden states
        in the model's dtype)."""
        dtype = next(self.model.parameters()).dtype
        g = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(n):
            batch = {}
            for key in self.inputs:
                if key == "hidden":
                    batch[key] = torch.randn(*shape, H, generator=g, dtype=dtype)
                else:
                    batch[key] = torch.randint(3, 64, shape, generator=g)
            out.append(batch)
        return out

    def run(self) -> torch.Tensor:
        with torch.no_grad():
            out = self.model(**self.inputs)
        return out.logits if hasattr(out, "logits") else out


def _lm_inputs(vocab: int = 64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, vocab, (2, 6), generator=g)}


def _common() -> dict[str, Any]:
    return {
        "hidden_size": H,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 64,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }


def _mixtral() -> Case:
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(
        intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **_common()
    )
    return Case("mixtral", MixtralForCausalLM(cfg).eval(), _lm_inputs(), "fused-gated", 2)


def _qwen2_moe() -> Case:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(
        intermediate_size=48,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        **_common(),
    )
    return Case("qwen2_moe", Qwen2MoeForCausalLM(cfg).eval(), _lm_inputs(), "fused-gated", 2)


def _qwen3_moe() -> Case:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        intermediate_size=48,
        moe_intermediate_size=24,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        head_dim=8,
        **_common(),
    )
    return Case("qwen3_moe", Qwen3MoeForCausalLM(cfg).eval(), _lm_inputs(), "fused-gated", 2)


def _olmoe() -> Case:
    from transformers import OlmoeConfig, OlmoeForCausalLM

    cfg = OlmoeConfig(
        intermediate_size=48, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, **_common()
    )
    return Case("olmoe", OlmoeForCausalLM(cfg).eval(), _lm_inputs(), "fused-gated", 2)


def _deepseek_v3() -> Case:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    common = _common() | {"num_hidden_layers": 3, "num_key_value_heads": 4}
    cfg = DeepseekV3Config(
        intermediate_size=48,
        moe_intermediate_size=24,
        n_routed_experts=4,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,  # layer 0 is a dense MLP, not an MoE block
        n_group=2,
        topk_group=1,
        norm_topk_prob=True,
        kv_lora_rank=16,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        **common,
    )
    model = DeepseekV3ForCausalLM(cfg).eval()
    return Case("deepseek_v3", model, _lm_inputs(), "fused-gated", 2)


def _phimoe() -> Case:
    from transformers import PhimoeConfig, PhimoeForCausalLM

    cfg = PhimoeConfig(
        intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **_common()
    )
    # sparsemixer's two multipliers do not sum to 1
    return Case(
        "phimoe", PhimoeForCausalLM(cfg).eval(), _lm_inputs(), "fused-gated", 2, normalized=False
    )


def _gpt_oss() -> Case:
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(
        intermediate_size=24,
        head_dim=8,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["full_attention", "full_attention"],
        **_common(),
    )
    # transposed (E, H, 2I) experts with biases, interleaved gate/up and a clamped GLU
    return Case("gpt_oss", GptOssForCausalLM(cfg).eval(), _lm_inputs(), "fused-gated", 2)


def _switch() -> Case:
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    cfg = SwitchTransformersConfig(
        d_model=H,
        d_ff=48,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        num_decoder_layers=2,
        num_sparse_encoder_layers=1,
        num_sparse_decoder_layers=1,
        num_experts=4,
        vocab_size=64,
        expert_capacity=64,  # no token dropped at these sizes
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    model = SwitchTransformersForConditionalGeneration(cfg).eval()
    ids = _lm_inputs()["input_ids"]
    inputs = {"input_ids": ids, "decoder_input_ids": ids.flip(1)}
    # the single expert's output is scaled by its (not renormalised) top-1 probability
    return Case("switch", model, inputs, "per-expert", 2, normalized=False)


# --- layouts written here (no transformers model class) -----------------------------------------


def _plain_experts_class() -> type[nn.Module]:
    """The default model's experts layout: fused, non-gated, with biases, GELU."""
    from transformers.integrations.moe import use_experts_implementation

    @use_experts_implementation(has_bias=True, has_gate=False)
    class PlainExperts(nn.Module):
        def __init__(self, config: Any) -> None:
            super().__init__()
            e, h, i = config.num_experts, config.hidden_size, config.intermediate_size
            self.num_experts = e
            self.up_proj = nn.Parameter(torch.randn(e, i, h) / h**0.5)  # (E, I, H)
            self.up_proj_bias = nn.Parameter(torch.randn(e, i) * 0.1)  # (E, I)
            self.down_proj = nn.Parameter(torch.randn(e, h, i) / i**0.5)  # (E, H, I)
            self.down_proj_bias = nn.Parameter(torch.randn(e, h) * 0.1)  # (E, H)
            self.act_fn = nn.GELU()

        def forward(
            self,
            hidden_states: torch.Tensor,
            top_k_index: torch.Tensor,
            top_k_weights: torch.Tensor,
        ) -> torch.Tensor:
            out = torch.zeros_like(hidden_states)
            for e in torch.unique(top_k_index).tolist():
                token, slot = torch.where(top_k_index == e)
                x = F.linear(hidden_states[token], self.up_proj[e], self.up_proj_bias[e])
                x = F.linear(self.act_fn(x), self.down_proj[e], self.down_proj_bias[e])
                out.index_add_(0, token, x * top_k_weights[token, slot, None])
            return out

    return PlainExperts


class PlainMoEBlock(nn.Module):
    """The default model's block contract: gate Linear (logits), experts, top_k; tensor out."""

    def __init__(self, config: Any, experts_class: type[nn.Module]) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = experts_class(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        b, t, h = hidden_states.shape
        flat = hidden_states.reshape(-1, h)
        probs = F.softmax(self.gate(flat), dim=-1, dtype=torch.float32)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return self.experts(flat, index, weights).reshape(b, t, h)


class SwiGLU(nn.Module):
    def __init__(self, h: int, i: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(h, i, bias=False)
        self.w3 = nn.Linear(h, i, bias=False)
        self.w2 = nn.Linear(i, h, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # type: ignore[no-any-return]


class ListMoEBlock(nn.Module):
    """A hand-written MoE: a ModuleList of SwiGLU experts and a biased router."""

    def __init__(self, h: int, i: int, n_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(h, n_experts, bias=True)
        self.experts = nn.ModuleList(SwiGLU(h, i) for _ in range(n_experts))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(self.router(hidden_states), dim=-1)  # (B, T, E)
        weights, index = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(hidden_states)
        for k in range(self.top_k):
            for e, expert in enumerate(self.experts):
                sel = (index[..., k] == e).unsqueeze(-1)
                out = out + torch.where(sel, expert(hidden_states) * weights[..., k : k + 1], 0.0)
        return out


class TinyStack(nn.Module):
    """Residual stack of MoE blocks with a head: ``forward(hidden (B, T, H)) -> (B, T, 8)``."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"norm": nn.LayerNorm(H), "mlp": b}) for b in blocks
        )
        self.head = nn.Linear(H, 8)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden = hidden + layer["mlp"](layer["norm"](hidden))
        return self.head(hidden)  # type: ignore[no-any-return]


def _hidden_inputs() -> dict[str, torch.Tensor]:
    return {"hidden": torch.randn(2, 6, H, generator=torch.Generator().manual_seed(1))}


def _fused_plain() -> Case:
    config = types.SimpleNamespace(
        num_experts=4,
        hidden_size=H,
        intermediate_size=40,
        num_experts_per_tok=2,
        _experts_implementation="eager",
    )
    cls = _plain_experts_class()
    model = TinyStack([PlainMoEBlock(config, cls), PlainMoEBlock(config, cls)]).eval()
    return Case("fused_plain", model, _hidden_inputs(), "fused", 2, hf=False)


def _module_list() -> Case:
    model = TinyStack([ListMoEBlock(H, 40, 4, 2), ListMoEBlock(H, 40, 4, 2)]).eval()
    return Case("module_list", model, _hidden_inputs(), "per-expert", 2, hf=False)


BUILDERS: dict[str, Callable[[], Case]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "deepseek_v3": _deepseek_v3,
    "phimoe": _phimoe,
    "gpt_oss": _gpt_oss,
    "switch": _switch,
    "fused_plain": _fused_plain,
    "module_list": _module_list,
}
HF_CASES = [n for n in BUILDERS if n not in ("fused_plain", "module_list")]


def build_case(name: str, seed: int = 0) -> Case:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BUILDERS[name]()


@pytest.fixture(params=list(BUILDERS))
def case(request: pytest.FixtureRequest) -> Case:
    return build_case(request.param)


@pytest.fixture(params=HF_CASES)
def hf_case(request: pytest.FixtureRequest) -> Case:
    return build_case(request.param)


@pytest.fixture
def make_case() -> Callable[..., Case]:
    return build_case


# --- reference math, written independently of the engine -------------------------------------


def expert_output(block_module: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of an original block on tokens x (N, H), by hand from its raw tensors."""
    experts = block_module.experts
    if isinstance(experts, (nn.ModuleList, nn.ModuleDict)):
        return list(experts.children())[e](x)  # type: ignore[no-any-return]
    if getattr(experts, "is_transposed", False):  # (E, in, out) with biases, the model's own GLU
        h = experts._apply_gate(x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e])
        return h @ experts.down_proj[e] + experts.down_proj_bias[e]  # type: ignore[no-any-return]
    act = experts.act_fn
    if hasattr(experts, "gate_up_proj"):
        g, u = (x @ experts.gate_up_proj[e].T).chunk(2, dim=-1)
        return (act(g) * u) @ experts.down_proj[e].T  # type: ignore[no-any-return]
    h = act(x @ experts.up_proj[e].T + experts.up_proj_bias[e])
    return h @ experts.down_proj[e].T + experts.down_proj_bias[e]  # type: ignore[no-any-return]


def shared_output(block_module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The always-on shared experts' contribution for tokens x (N, H)."""
    out = torch.zeros_like(x)
    if hasattr(block_module, "shared_expert"):
        out = torch.sigmoid(block_module.shared_expert_gate(x)) * block_module.shared_expert(x)
    if hasattr(block_module, "shared_experts"):
        out = out + block_module.shared_experts(x)
    return out


def routed_scale(block_module: nn.Module) -> float:
    return (
        float(getattr(block_module.gate, "routed_scaling_factor", 1.0))
        if hasattr(block_module, "gate")
        else 1.0
    )


def expected_block(block_module: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """What a block merged one-hot on expert e must output for x (..., H)."""
    flat = x.reshape(-1, x.shape[-1])
    y = routed_scale(block_module) * expert_output(block_module, e, flat) + shared_output(
        block_module, flat
    )
    return y.reshape(x.shape)


# --- comparing two computations of the same math -------------------------------------------

REORDER_RTOL = 1e-5


def assert_reordered_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to the order of float operations.

    Exact equality is only a guarantee when the very same kernels run on the very same data
    (one model restored, or merged twice the same way). Two separately loaded models, two
    layouts of the same weights, or another kernel choice (MKL picks code paths per CPU, per
    alignment and per shape) sum in another order: a float32 sum of n terms then moves by up
    to about n * eps * sum |terms|, which in these tiny models (widths <= 96, <= 3 layers) is
    below 1e-6 of the output's scale (6e-7 was measured between two x86 CPUs). A tolerance of
    1e-5 of the scale keeps a tenfold margin, while a wrong computation moves outputs by 1e-2.
    """
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    atol = REORDER_RTOL * max(1.0, scale)
    torch.testing.assert_close(actual, expected, rtol=REORDER_RTOL, atol=atol)


@pytest.fixture
def close() -> Callable[[torch.Tensor, torch.Tensor], None]:
    """:func:`assert_reordered_close`: the same math computed by other kernels or layouts."""
    return assert_reordered_close


@pytest.fixture
def reference() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        expert_output=expert_output,
        shared_output=shared_output,
        routed_scale=routed_scale,
        expected_block=expected_block,
    )


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Any:
    """Tiny models run faster on one thread than on a pool shared with other processes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
