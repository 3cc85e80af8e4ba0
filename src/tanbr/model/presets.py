"""Mixtral-style benchmark models with random weights, from tiny to large.

No pre-trained MoE can be downloaded here, so latency and memory are measured on models built
from a config. The shapes follow Mixtral's proportions scaled down: SwiGLU experts with an
intermediate width of 2.75 H, 64-wide attention heads with 4 query heads per key/value head
(grouped-query attention), top-2 of 8 experts.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class BenchPreset:
    """The shape of one benchmark model."""

    name: str
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_experts: int
    top_k: int
    vocab_size: int

    @property
    def n_heads(self) -> int:
        return max(1, self.hidden_size // 64)

    @property
    def n_kv_heads(self) -> int:
        return max(1, self.n_heads // 4)

    def config(self) -> Any:
        """The ``MixtralConfig`` of this preset."""
        from transformers import MixtralConfig

        return MixtralConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            num_local_experts=self.n_experts,
            num_experts_per_tok=self.top_k,
            vocab_size=self.vocab_size,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            use_cache=False,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=None,
        )


PRESETS: dict[str, BenchPreset] = {
    "tiny": BenchPreset("tiny", 64, 176, 2, 4, 2, 1024),
    "small": BenchPreset("small", 256, 704, 4, 8, 2, 8192),
    "medium": BenchPreset("medium", 512, 1408, 6, 8, 2, 8192),
    "large": BenchPreset("large", 1024, 2816, 8, 8, 2, 8192),
}


def get_preset(name: str) -> BenchPreset:
    """A preset by name; ValueError listing the choices otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}") from None


def build_bench_model(preset: BenchPreset, *, seed: int) -> Any:
    """A ``MixtralForCausalLM`` of the preset with seeded random weights, in eval mode."""
    return _seeded_mixtral(preset.config(), seed)


def _seeded_mixtral(config: Any, seed: int) -> Any:
    """A ``MixtralForCausalLM`` of ``config`` with seeded random weights, in eval mode."""
    from transformers import MixtralForCausalLM

    # transformers' initialisers draw from the global torch generator: seed a forked copy of it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MixtralForCausalLM(config)
    model.train(False)
    return model


# files of a causal-LM folder that describe its trained weights, not its interface
_WEIGHT_FILES = ("config.json", "build.json", "evaluation.json")


def write_shaped_lm(source: Path, preset: BenchPreset, out: Path, *, seed: int) -> Path:
    """A checkpoint folder serving ``source``'s tokenizer, prompts and chat template through a
    Mixtral of ``preset``'s shape with seeded random weights; returns ``out``.

    Serving costs (time per token, resident memory) depend on a model's shape and routing,
    not on what its weights learned: this measures them on a model whose experts dominate
    its size, where the trained ``lm`` is too small to show them. Its text is noise.
    """
    from transformers import MixtralConfig

    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {source}: not a checkpoint folder")
    trained = MixtralConfig.from_pretrained(source)
    shaped = preset.config()
    for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(shaped, key, getattr(trained, key))
    shaped.max_position_embeddings = trained.max_position_embeddings
    shaped.use_cache = True
    model = _seeded_mixtral(shaped, seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for path in sorted(source.iterdir()):
        if path.is_file() and path.suffix != ".safetensors" and path.name not in _WEIGHT_FILES:
            shutil.copyfile(path, out / path.name)
    return out
