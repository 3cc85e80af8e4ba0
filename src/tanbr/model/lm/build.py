"""Build (or reuse) a small Mixtral MoE language model trained from scratch on real text.

Recipe (the measured figures are in docs/lm.md):

1. Split every domain of :mod:`tanbr.model.lm.corpora` by document: a seeded few documents give
   the held-out passages (prompt + continuation), the others the training text. A passage whose
   prompt occurs anywhere in the training text is not used.
2. Train a byte-level BPE tokenizer on the training text (:mod:`tanbr.model.lm.tokenizer`).
3. Pack each domain's training documents (``<s> text </s>``, one after the other) into blocks
   of ``seq_len`` tokens. A block holds one domain's text, but nothing tells the model which.
4. Train a ``MixtralForCausalLM`` from a seeded random initialisation: next-token cross-entropy
   plus the family's own load-balancing loss (``router_aux_loss_coef``), AdamW with warm-up and
   a cosine decay, each step one batch with ``per_domain_batch`` blocks of every domain. No task
   tag and no routing supervision: whatever specialisation the experts show is their own.
5. Save the checkpoint with ``save_pretrained`` (config, safetensors, tokenizer), the held-out
   passages as ``tasks.jsonl`` (an lm task file: text = prompt, task = domain, target = the
   continuation), measure it (:func:`tanbr.model.lm.evaluate.evaluate_lm`), write
   ``build.json`` and ``evaluation.json``, and rename the folder into
   ``cache_dir("lm-model", <every input>)``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tanbr.cache import build_once, cache_dir, file_digest
from tanbr.model.lm.corpora import (
    DOMAIN_NAMES,
    DOMAINS,
    DomainSplit,
    check_domains,
    data_files,
    split_corpus,
)
from tanbr.model.lm.evaluate import EvalSettings, evaluate_lm
from tanbr.model.lm.tokenizer import train_tokenizer
from tanbr.tasks import TaskExample, read_task_file, write_task_file

log = logging.getLogger(__name__)

# Bump when the code changes what a spec builds (invalidates cached checkpoints).
RECIPE_VERSION = 2  # 2: the tokenizer has a chat template

TASKS_FILE = "tasks.jsonl"
BUILD_FILE = "build.json"
EVALUATION_FILE = "evaluation.json"


@dataclass(frozen=True, kw_only=True)
class LMSpec:
    """Everything that decides the language model: data, tokenizer, architecture, training."""

    domains: tuple[str, ...] = DOMAIN_NAMES
    seed: int = 0
    # data: held-out passages per domain, training characters per domain, passage sizes
    heldout_per_domain: int = 300
    train_chars: int = 600_000
    min_chars: int = 100
    max_chars: int = 360
    prompt_share: float = 0.4
    # tokenizer
    vocab_size: int = 4096
    # model: a Mixtral, every layer an MoE block
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 256
    num_experts: int = 8
    top_k: int = 2
    router_aux_loss_coef: float = 0.01
    max_position_embeddings: int = 512
    # training
    seq_len: int = 128
    steps: int = 900
    per_domain_batch: int = 1
    lr: float = 4e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 40
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # measured at build time (see EvalSettings)
    eval_rows: int = 0  # served rows per domain scored for each merge (0: all)

    def __post_init__(self) -> None:
        check_domains(self.domains)
        at_least = {
            "heldout_per_domain": (self.heldout_per_domain, 12),  # the task file's minimum
            "train_chars": (self.train_chars, 1000),
            "min_chars": (self.min_chars, 20),
            "vocab_size": (self.vocab_size, 300),
            "hidden_size": (self.hidden_size, 8),
            "num_layers": (self.num_layers, 1),
            "num_heads": (self.num_heads, 1),
            "num_kv_heads": (self.num_kv_heads, 1),
            "intermediate_size": (self.intermediate_size, 1),
            "num_experts": (self.num_experts, 2),
            "top_k": (self.top_k, 1),
            "seq_len": (self.seq_len, 8),
            "steps": (self.steps, 1),
            "per_domain_batch": (self.per_domain_batch, 1),
            "warmup_steps": (self.warmup_steps, 0),
            "eval_rows": (self.eval_rows, 0),
        }
        for name, (value, low) in at_least.items():
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if self.max_chars <= self.min_chars:
            raise ValueError(
                f"max_chars must be > min_chars={self.min_chars}, got {self.max_chars}"
            )
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be <= num_experts={self.num_experts}, got {self.top_k}")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads}), "
                f"and num_heads by num_kv_heads ({self.num_kv_heads})"
            )
        if self.seq_len > self.max_position_embeddings:
            raise ValueError(
                f"seq_len must be <= max_position_embeddings={self.max_position_embeddings}, "
                f"got {self.seq_len}"
            )
        if not 0.0 < self.prompt_share < 1.0:
            raise ValueError(f"prompt_share must be in (0, 1), got {self.prompt_share}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name, rate in {
            "lr": self.lr,
            "router_aux_loss_coef": self.router_aux_loss_coef,
            "weight_decay": self.weight_decay,
            "grad_clip": self.grad_clip,
        }.items():
            if not rate >= 0.0 or (name == "lr" and rate == 0.0):
                raise ValueError(f"{name} must be {'>' if name == 'lr' else '>='} 0, got {rate}")


VARIANTS: dict[str, LMSpec] = {
    # The real model: 8 domains, 4 MoE layers of 8 experts (top-2), ~5M parameters.
    "lm": LMSpec(),
    # For tests: the same recipe on little text with a very small model (seconds).
    "lm-tiny": LMSpec(
        heldout_per_domain=16,
        train_chars=30_000,
        vocab_size=512,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
        seq_len=64,
        steps=30,
        warmup_steps=3,
    ),
}


def spec_for(variant: str) -> LMSpec:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    return VARIANTS[variant]


def cache_key_parts(spec: LMSpec) -> dict[str, Any]:
    """Every input of a build, cheap to compute (file digests, not the parsed text)."""
    import tokenizers
    import transformers

    import tanbr

    return {
        "recipe": RECIPE_VERSION,
        "spec": dataclasses.asdict(spec),
        "data": {f"{p.parent.name}/{p.name}": file_digest(p) for p in data_files(spec.domains)},
        "versions": {
            "tanbr": tanbr.__version__,
            "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }


def build_lm(variant: str = "lm", *, progress: bool = False) -> Path:
    """The checkpoint folder of the MoE language model ``variant``, built on first use and
    cached by its inputs.

    The folder loads like any local Mixtral (``MixtralForCausalLM.from_pretrained``,
    ``AutoTokenizer.from_pretrained``) and holds ``tasks.jsonl``, the held-out lm task file
    of its domains; ``build.json`` and ``evaluation.json`` hold what the build measured.
    """
    return build_lm_from_spec(spec_for(variant), variant=variant, progress=progress)


def build_lm_from_spec(spec: LMSpec, *, variant: str = "custom", progress: bool = False) -> Path:
    """:func:`build_lm` for an explicit spec (to compare recipes)."""
    folder = cache_dir("lm-model", cache_key_parts(spec))
    if not build_once(
        folder, BUILD_FILE, lambda tmp: build_into(tmp, spec, variant=variant, progress=progress)
    ):
        log.info("language model (%s) from cache: %s", variant, folder)
    return folder


# ----------------------------------------------------------------------------------------------
# The pieces


def make_model(spec: LMSpec, tokenizer: Any) -> Any:
    """A freshly initialised ``MixtralForCausalLM`` for the spec (weights from ``spec.seed``)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        num_local_experts=spec.num_experts,
        num_experts_per_tok=spec.top_k,
        router_aux_loss_coef=spec.router_aux_loss_coef,
        output_router_logits=False,  # training asks for them; serving does not need them
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):  # the global state is left as it was
        torch.manual_seed(spec.seed)
        model = MixtralForCausalLM(config)
    return model


def pack(tokenizer: Any, documents: Sequence[str], seq_len: int) -> torch.Tensor:
    """A domain's documents as ``<s> ids </s>`` one after the other, cut into (n, seq_len)
    blocks (the last partial block is dropped)."""
    # the backend tokenizer: no "longer than the model's maximum" warning for whole documents
    encodings = tokenizer.backend_tokenizer.encode_batch(list(documents), add_special_tokens=False)
    ids = [e.ids for e in encodings]
    bos, eos = int(tokenizer.bos_token_id), int(tokenizer.eos_token_id)
    stream = [t for doc in ids for t in (bos, *doc, eos)]
    n = len(stream) // seq_len
    if n < 1:
        raise ValueError(
            f"{len(stream)} tokens of training text are fewer than one block of {seq_len}"
        )
    return torch.as_tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _lr_factor(step: int, spec: LMSpec) -> float:
    """Linear warm-up, then a cosine from 1 down to ``min_lr_ratio``."""
    if step < spec.warmup_steps:
        return (step + 1) / spec.warmup_steps
    span = max(1, spec.steps - spec.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - spec.warmup_steps) / span)))
    return spec.min_lr_ratio + (1.0 - spec.min_lr_ratio) * cosine


@dataclass(frozen=True)
class TrainStats:
    """Smoothed losses at the end of training, and every step's (for the record)."""

    ce: float
    aux: float
    ce_curve: tuple[float, ...]
    seconds: float
    tokens: int


def train(
    model: Any, blocks: Sequence[torch.Tensor], spec: LMSpec, *, progress: bool = False
) -> TrainStats:
    """Train in place: every step ``per_domain_batch`` random blocks of every domain, loss =
    next-token cross-entropy + ``router_aux_loss_coef`` x the load-balancing loss."""
    from tqdm.auto import tqdm

    rng = np.random.default_rng(spec.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "embed" in n]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": spec.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=spec.lr,
        betas=(0.9, 0.95),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, spec))
    model.train()
    curve: list[float] = []
    ce_ema = aux_ema = float("nan")
    started = time.perf_counter()
    bar = tqdm(range(spec.steps), desc="train", unit="step", disable=not progress)
    # The CPU kernels of the expert dispatch may accumulate a backward in any order; the
    # deterministic ones make a spec build the same weights every time.
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            for _ in bar:
                batch = torch.cat(
                    [
                        b[torch.as_tensor(rng.integers(0, len(b), spec.per_domain_batch))]
                        for b in blocks
                    ]
                )
                out = model(
                    input_ids=batch, labels=batch, output_router_logits=True, use_cache=False
                )
                out.loss.backward()
                if spec.grad_clip > 0.0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                aux = out.aux_loss.detach().item()
                ce = out.loss.detach().item() - spec.router_aux_loss_coef * aux
                curve.append(round(ce, 4))
                ce_ema = ce if math.isnan(ce_ema) else 0.9 * ce_ema + 0.1 * ce
                aux_ema = aux if math.isnan(aux_ema) else 0.9 * aux_ema + 0.1 * aux
                bar.set_postfix(ce=f"{ce_ema:.3f}", aux=f"{aux_ema:.3f}")
    finally:
        torch.use_deterministic_algorithms(was_deterministic)
        bar.close()
    model.train(False)
    tokens = spec.steps * spec.per_domain_batch * len(blocks) * spec.seq_len
    return TrainStats(ce_ema, aux_ema, tuple(curve), time.perf_counter() - started, tokens)


def task_rows(splits: Sequence[DomainSplit]) -> list[TaskExample]:
    """The held-out passages as lm task-file rows, domains interleaved in a fixed order."""
    return [
        TaskExample(text=h.prompt, task=h.domain, target=h.target)
        for s in splits
        for h in s.heldout
    ]


def build_into(folder: Path, spec: LMSpec, *, variant: str, progress: bool) -> dict[str, Any]:
    """Build the checkpoint into ``folder`` (created); returns what ``build.json`` holds."""
    started = time.perf_counter()
    cpu_started = time.process_time()
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    splits = split_corpus(
        spec.domains,
        n_heldout=spec.heldout_per_domain,
        train_chars=spec.train_chars,
        min_chars=spec.min_chars,
        max_chars=spec.max_chars,
        prompt_share=spec.prompt_share,
        seed=spec.seed,
    )
    data_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(
        (d for s in splits for d in s.train),
        vocab_size=spec.vocab_size,
        max_length=spec.max_position_embeddings,
    )
    blocks = [pack(tokenizer, s.train, spec.seq_len) for s in splits]
    tokenizer_s = time.perf_counter() - t0
    model = make_model(spec, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("training a %.2fM-parameter Mixtral on %d domains", n_params / 1e6, len(splits))
    stats = train(model, blocks, spec, progress=progress)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    write_task_file(folder / TASKS_FILE, task_rows(splits), fmt="jsonl")
    read_task_file(folder / TASKS_FILE)  # the file must be what the backend accepts
    t0 = time.perf_counter()
    evaluation = evaluate_lm(
        folder, settings=EvalSettings(max_rows=spec.eval_rows), progress=progress
    )
    (folder / EVALUATION_FILE).write_text(json.dumps(evaluation, indent=2) + "\n")
    eval_s = time.perf_counter() - t0
    info: dict[str, Any] = {
        "variant": variant,
        "family": "mixtral",
        "parameters": n_params,
        "active_parameters": _active_parameters(model, spec),
        "domains": {
            s.domain: {
                "description": DOMAINS[s.domain].description,
                "language": DOMAINS[s.domain].language,
                "documents": s.n_documents,
                "train_documents": len(s.train),
                "train_chars": s.train_chars,
                "train_tokens": int(b.numel()),
                "heldout_rows": len(s.heldout),
            }
            for s, b in zip(splits, blocks, strict=True)
        },
        "spec": dataclasses.asdict(spec),
        "build": {
            "data_s": round(data_s, 2),
            "tokenizer_s": round(tokenizer_s, 2),
            "train_s": round(stats.seconds, 2),
            "evaluate_s": round(eval_s, 2),
            "total_s": round(time.perf_counter() - started, 2),
            "cpu_s": round(time.process_time() - cpu_started, 2),
            "threads": torch.get_num_threads(),
            "train_tokens_seen": stats.tokens,
            "final_ce": round(stats.ce, 4),
            "final_aux": round(stats.aux, 4),
        },
        "ce_curve": stats.ce_curve,
    }
    (folder / BUILD_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def _active_parameters(model: Any, spec: LMSpec) -> int:
    """Parameters one token uses: all but the unchosen experts' share."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return int(total - experts * (1.0 - spec.top_k / spec.num_experts))
