"""Tiny random Hugging Face MoE checkpoints, with a tokenizer and task files, built offline.

Other suites (the command line, the service) import :func:`build_checkpoint` and the task-file
writers to get a folder ``tanbr`` can serve in a fraction of a second (pytest imports test
modules without putting their folder on the path, so put this one there)::

    sys.path.insert(0, str(Path(__file__).parents[1] / "backend"))
    from hf_checkpoints import build_checkpoint, write_lm_tasks

    folder = build_checkpoint("mixtral", "lm", tmp_path / "model")
    tasks = write_lm_tasks(tmp_path / "tasks.jsonl")

Every model is built from a fixed seed with hidden size 32, 2 MoE layers, 4 experts and top-2
routing (as the model tests' cases), and saved with ``save_pretrained`` beside a word-level
tokenizer of :data:`WORDS` (no pad token: the backends pad with its end-of-sequence token).
Classifiers name their labels ``task:label`` for the tasks of :func:`write_classification_tasks`.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SPECIALS = ("<unk>", "<s>", "</s>")


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split(" "))


TOPICS: dict[str, tuple[str, ...]] = {
    "sport": _words("ball goal team match score coach player run kick field league cup"),
    "food": _words("bread soup salt sugar cake rice bean apple cheese pepper oven cook"),
    "count": _words("one two three four five six seven eight nine ten"),
    "color": _words("red blue green yellow black white pink brown gray orange"),
}
GLUE = _words("the a and of is was very not to in with at")
WORDS: tuple[str, ...] = (*(w for ws in TOPICS.values() for w in ws), *GLUE)
VOCAB: tuple[str, ...] = SPECIALS + WORDS
CLASS_LABELS = {"sport": ("win", "lose"), "food": ("tasty", "bland")}
ID2LABEL = dict(enumerate(f"{t}:{y}" for t, ys in CLASS_LABELS.items() for y in ys))

#: Families with a causal LM built here, and those with a sequence classifier too.
LM_FAMILIES = (
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "phimoe",
    "gpt_oss", "granitemoe", "minimax", "flex_olmo", "qwen3_next", "jamba",
)  # fmt: skip
CLASSIFIER_FAMILIES = (
    "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "phimoe", "gpt_oss",
    "minimax", "qwen3_next", "jamba",
)  # fmt: skip
KINDS = ("lm", "classifier")


def make_tokenizer() -> Any:
    """A word-level tokenizer of :data:`VOCAB` that prepends ``<s>``, with no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", VOCAB.index("<s>"))]
    )
    core.decoder = None
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _common() -> dict[str, Any]:
    return {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": len(VOCAB),
        "bos_token_id": VOCAB.index("<s>"),
        "eos_token_id": VOCAB.index("</s>"),
        "pad_token_id": None,
        "initializer_range": 0.1,  # peaked enough that a merge changes some predictions
    }


def _config(family: str) -> Any:
    import transformers as tf

    common = _common()
    moe = {"num_experts_per_tok": 2}
    builders: dict[str, Callable[[], Any]] = {
        "mixtral": lambda: tf.MixtralConfig(
            intermediate_size=48, num_local_experts=4, **moe, **common
        ),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(
            intermediate_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=4,
            norm_topk_prob=True,
            **moe,
            **common,
        ),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(
            intermediate_size=48,
            moe_intermediate_size=24,
            num_experts=4,
            norm_topk_prob=True,
            head_dim=8,
            **moe,
            **common,
        ),
        "olmoe": lambda: tf.OlmoeConfig(
            intermediate_size=48, num_experts=4, norm_topk_prob=True, **moe, **common
        ),
        "deepseek_v3": lambda: tf.DeepseekV3Config(
            intermediate_size=48,
            moe_intermediate_size=24,
            n_routed_experts=4,
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
            **moe,
            **(common | {"num_hidden_layers": 3, "num_key_value_heads": 4}),
        ),
        "deepseek_v2": lambda: tf.DeepseekV2Config(
            intermediate_size=48,
            moe_intermediate_size=24,
            n_routed_experts=4,
            n_shared_experts=1,
            first_k_dense_replace=0,
            kv_lora_rank=16,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=8,
            v_head_dim=8,
            **moe,
            **(common | {"num_key_value_heads": 4}),
        ),
        "granitemoe": lambda: tf.GraniteMoeConfig(
            intermediate_size=48, num_local_experts=4, **moe, **common
        ),
        "minimax": lambda: tf.MiniMaxConfig(
            intermediate_size=48,
            num_local_experts=4,
            head_dim=8,
            layer_types=["full_attention", "full_attention"],
            **moe,
            **common,
        ),
        "flex_olmo": lambda: tf.FlexOlmoConfig(
            intermediate_size=48, num_experts=4, **moe, **common
        ),
        "qwen3_next": lambda: tf.Qwen3NextConfig(
            intermediate_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=24,
            num_experts=4,
            head_dim=8,
            layer_types=["full_attention", "full_attention"],
            **moe,
            **common,
        ),
        "jamba": lambda: tf.JambaConfig(  # layer 0 Mamba, layer 1 attention; MoE in both
            intermediate_size=48,
            num_experts=4,
            expert_layer_period=1,
            expert_layer_offset=0,
            attn_layer_period=2,
            attn_layer_offset=1,
            use_mamba_kernels=False,
            **moe,
            **common,
        ),
        "phimoe": lambda: tf.PhimoeConfig(
            intermediate_size=48, num_local_experts=4, **moe, **common
        ),
        "gpt_oss": lambda: tf.GptOssConfig(
            intermediate_size=24,
            head_dim=8,
            num_local_experts=4,
            layer_types=["full_attention", "full_attention"],
            **moe,
            **common,
        ),
    }
    if family not in builders:
        raise ValueError(f"no tiny checkpoint for family {family!r}; known: {sorted(builders)}")
    return builders[family]()


_HEADS = {"lm": "ForCausalLM", "classifier": "ForSequenceClassification"}


def build_checkpoint(
    family: str, kind: str, folder: str | Path, *, seed: int = 0, tokenizer: bool = True
) -> Path:
    """Save a tiny random ``family`` model (``kind`` "lm" or "classifier") and its tokenizer in
    ``folder``; returns the folder."""
    import transformers as tf

    if kind not in _HEADS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    config = _config(family)
    if kind == "classifier":
        config.num_labels = len(ID2LABEL)
        config.id2label = dict(ID2LABEL)
        config.label2id = {v: k for k, v in ID2LABEL.items()}
    prefix = type(config).__name__.removesuffix("Config")
    cls = getattr(tf, prefix + _HEADS[kind])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config).eval()
    folder = Path(folder)
    model.save_pretrained(folder)
    if tokenizer:
        make_tokenizer().save_pretrained(folder)
    return folder


def save_config_only(config: Any, folder: str | Path, *, tokenizer: bool = True) -> Path:
    """A folder with a config (and a tokenizer) but no weights: what a loader's check sees."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    if tokenizer:
        make_tokenizer().save_pretrained(folder)
    return folder


def _sentence(rng: random.Random, words: tuple[str, ...], n: int) -> str:
    return " ".join(rng.choice(words + GLUE[:4]) for _ in range(n))


def write_classification_tasks(path: str | Path, *, per_task: int = 24, seed: int = 0) -> Path:
    """A JSONL classification task file: tasks ``sport`` and ``food``, two labels each."""
    from tanbr.tasks import TaskExample, write_task_file

    rng = random.Random(seed)
    rows = []
    for task, labels in CLASS_LABELS.items():
        for i in range(per_task):
            text = f"{_sentence(rng, TOPICS[task], 3 + i % 6)} {task} {i}"
            rows.append(TaskExample(text=text, task=task, label=labels[i % 2]))
    write_task_file(path, rows, fmt="jsonl")
    return Path(path)


def write_lm_tasks(path: str | Path, *, per_task: int = 24, seed: int = 0) -> Path:
    """A JSONL lm task file: tasks ``count`` and ``color``, prompts with target continuations
    (every fourth row has none: its text is scored)."""
    from tanbr.tasks import TaskExample, write_task_file

    rng = random.Random(seed)
    rows = []
    for task in ("count", "color"):
        words = TOPICS[task]
        for i in range(per_task):
            text = f"{_sentence(rng, words, 2 + i % 5)} {words[i % len(words)]} {i}"
            target = None if i % 4 == 3 else " " + _sentence(rng, words, 1 + i % 3)
            rows.append(TaskExample(text=text, task=task, target=target))
    write_task_file(path, rows, fmt="jsonl")
    return Path(path)
