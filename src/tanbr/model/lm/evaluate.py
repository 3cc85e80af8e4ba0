"""What the language model is: per-domain loss, expert specialisation, and plain merges.

Given a checkpoint folder and an lm task file (the folder's ``tasks.jsonl`` by default), the
file is split as the backend splits it (:func:`tanbr.tasks.split_tasks`):

* the *train* split, which the backend never serves, gives each domain's expert usage: the
  mean gate probabilities of every block over the tokens of the domain's passages (prompt and
  continuation), recorded label-free with :class:`~tanbr.model.GateRecorder`;
* the *calib* and *test* splits, the rows the backend serves, are scored: the loss of a domain
  is the mean negative log-likelihood per token of the continuations given their prompts (the
  tokens are counted over the whole domain, so its perplexity is ``exp(loss)``).

The model is scored in full (real top-k routing) and under plain merges built with
:class:`~tanbr.model.Merger`: uniform coefficients; the usage-frequency merge of all domains
(their usage averaged); and each domain's own usage-frequency merge (coefficients = that
domain's usage, per block), which is scored on every domain (the cross table). A domain's
*best* merge is the best of these for it.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tanbr.model import GateRecorder, LoadedModel, load_checkpoint, uniform_plan
from tanbr.tasks import TaskExample, read_task_file, split_tasks

log = logging.getLogger(__name__)

Plan = dict[str, np.ndarray]

#: A domain's own merge losing more than this share of loss against the full model is the
#: issue's signal that plain merges need an adaptation step.
ADAPTATION_THRESHOLD = 0.15


@dataclass(frozen=True)
class EvalSettings:
    """``max_rows``: served rows (calib + test) scored per domain (0: all); ``batch_size``:
    sequences per forward pass; ``seed``: the task file's split seed."""

    max_rows: int = 0
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_rows < 0:
            raise ValueError(f"max_rows must be >= 0 (0: all rows), got {self.max_rows}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class Scored:
    """Token ids of rows, where each row's scored tokens start, and each row's domain."""

    ids: tuple[tuple[int, ...], ...]
    starts: tuple[int, ...]
    domains: tuple[str, ...]


def encode_rows(tokenizer: Any, rows: Sequence[TaskExample], max_length: int) -> Scored:
    """Prompt (with ``<s>``) then continuation, as the backend encodes them; a row without a
    target scores its own text. Too long a row keeps the prompt's end and the target's start."""
    ids, starts = [], []
    for row in rows:
        prompt = list(tokenizer(row.text)["input_ids"])
        if row.target is None:
            seq, start = prompt[:max_length], 1
        else:
            cont = list(tokenizer(row.target, add_special_tokens=False)["input_ids"])
            cont = cont[: max(1, max_length - 2)]
            keep = max(1, max_length - len(cont))
            prompt = prompt[-keep:] if len(prompt) > keep else prompt
            seq, start = prompt + cont, len(prompt)
        if len(seq) - start < 1:
            raise ValueError(f"row at line {row.line} ({row.task!r}) has no token to score")
        ids.append(tuple(seq))
        starts.append(start)
    return Scored(tuple(ids), tuple(starts), tuple(r.task for r in rows))


def _batches(
    scored: Scored, batch_size: int, pad_id: int
) -> list[tuple[np.ndarray, torch.Tensor, torch.Tensor]]:
    """Length-sorted right-padded batches: (positions, input ids (b, T), mask (b, T))."""
    lengths = np.array([len(s) for s in scored.ids])
    order = np.argsort(lengths, kind="stable")
    out = []
    for i in range(0, len(order), batch_size):
        pos = order[i : i + batch_size]
        width = int(lengths[pos].max())
        ids = torch.full((len(pos), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(pos), width), dtype=torch.long)
        for r, p in enumerate(pos.tolist()):
            ids[r, : lengths[p]] = torch.as_tensor(scored.ids[p])
            mask[r, : lengths[p]] = 1
        out.append((pos, ids, mask))
    return out


@torch.inference_mode()
def nll_sums(
    model: torch.nn.Module, scored: Scored, *, batch_size: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the summed negative log-likelihood of its scored tokens, and their count."""
    sums = np.zeros(len(scored.ids))
    counts = np.zeros(len(scored.ids), dtype=np.int64)
    starts = np.asarray(scored.starts)
    for pos, ids, mask in _batches(scored, batch_size, pad_id):
        # position t predicts token t + 1: logits only where the next token is scored
        cols = torch.arange(ids.shape[1])
        first = torch.as_tensor(starts[pos])[:, None]
        scored_tokens = (cols >= first) & (mask == 1)  # (b, T)
        keep = torch.zeros_like(scored_tokens)
        keep[:, :-1] = scored_tokens[:, 1:]
        logits = model(
            input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep
        ).logits  # (scored tokens, V), row-major over (b, T)
        logp = torch.log_softmax(logits.float(), dim=-1)
        nll = -logp.gather(1, ids[scored_tokens][:, None]).squeeze(1).double()
        owner = scored_tokens.nonzero()[:, 0]  # the batch row of each scored token
        sums[pos] = torch.zeros(len(pos), dtype=torch.float64).index_add_(0, owner, nll).numpy()
        counts[pos] = scored_tokens.sum(dim=1).numpy()
    return sums, counts


def domain_losses(
    model: torch.nn.Module, scored: Scored, domains: Sequence[str], *, batch_size: int, pad_id: int
) -> dict[str, float]:
    """Mean NLL per scored token of each domain."""
    sums, counts = nll_sums(model, scored, batch_size=batch_size, pad_id=pad_id)
    where = np.asarray(scored.domains)
    return {d: float(sums[where == d].sum() / max(1, counts[where == d].sum())) for d in domains}


@torch.inference_mode()
def domain_usage(
    loaded: LoadedModel, scored: Scored, domains: Sequence[str], *, batch_size: int, pad_id: int
) -> dict[str, Plan]:
    """Each domain's mean gate probabilities per block over all real tokens of its rows."""
    if loaded.merger.mode != "full":
        raise ValueError("usage is measured on the full model: restore the merger first")
    where = np.asarray(scored.domains)
    usage: dict[str, Plan] = {}
    for domain in domains:
        rows = np.flatnonzero(where == domain)
        if not len(rows):
            raise ValueError(f"domain {domain!r} has no row to measure its expert usage on")
        subset = Scored(
            tuple(scored.ids[i] for i in rows),
            tuple(scored.starts[i] for i in rows),
            tuple(scored.domains[i] for i in rows),
        )
        with GateRecorder(loaded.model, blocks=loaded.blocks) as recorder:
            for _, ids, mask in _batches(subset, batch_size, pad_id):
                recorder.set_mask(mask)
                loaded.model(
                    input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1
                )  # the gates see every token; one logit row is enough
            usage[domain] = recorder.profiles()
    return usage


def _mean_plan(plans: Sequence[Plan]) -> Plan:
    return {name: np.mean([p[name] for p in plans], axis=0) for name in plans[0]}


def specialisation(usage: Mapping[str, Plan], blocks: Sequence[str]) -> dict[str, Any]:
    """Which experts each domain uses per block: its top expert and that expert's share, and
    how far apart the domains' usages are (mean pairwise total-variation distance, 0 when every
    domain uses the experts alike, 1 when no two share an expert)."""
    top: dict[str, dict[str, list[float]]] = {}
    tv: dict[str, float] = {}
    lines = []
    for layer, name in enumerate(blocks):
        top[name] = {}
        parts = []
        for domain, plan in usage.items():
            e = int(np.argmax(plan[name]))
            share = float(plan[name][e])
            top[name][domain] = [e, round(share, 3)]
            parts.append(f"{domain} e{e} {share:.2f}")
        pairs = list(itertools.combinations(usage.values(), 2))
        tv[name] = round(
            float(np.mean([0.5 * np.abs(a[name] - b[name]).sum() for a, b in pairs])), 4
        )
        lines.append(f"layer {layer} (TV {tv[name]:.2f}): " + ", ".join(parts))
    return {"top": top, "tv": tv, "summary": "; ".join(lines)}


def _rounded(values: Mapping[str, float], digits: int = 4) -> dict[str, float]:
    return {k: round(v, digits) for k, v in values.items()}


def evaluate_lm(
    folder: str | Path,
    *,
    tasks: str | Path | None = None,
    settings: EvalSettings | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Per-domain loss of the full model and of plain merges, and the domains' expert usage.

    Returns a JSON-serialisable dict: ``loss`` (``full``, ``uniform``, ``usage_all``, ``own``
    per domain, and ``best`` with the merge that gives it), ``perplexity`` (of the same),
    ``gap`` (relative loss increase over the full model), ``cross`` (each domain's merge scored
    on every domain), ``usage`` (per domain and block, the mean gate probabilities),
    ``specialisation`` (:func:`specialisation`), ``max_own_gap`` and ``needs_adaptation``
    (whether some domain's own merge loses more than :data:`ADAPTATION_THRESHOLD`).
    """
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    settings = settings or EvalSettings()
    folder = Path(folder)
    task_file = read_task_file(tasks if tasks is not None else folder / "tasks.jsonl")
    if task_file.kind != "lm":
        raise ValueError(f"{task_file.path}: a language model is scored on an lm task file")
    loaded = load_checkpoint(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    max_length = int(getattr(loaded.config, "max_position_embeddings", 512))
    domains = task_file.tasks
    splits = split_tasks(task_file, seed=settings.seed)
    served = [*splits.calib, *splits.test]
    if settings.max_rows:
        taken = dict.fromkeys(domains, 0)
        kept = []
        for row in served:
            if taken[row.task] < settings.max_rows:
                taken[row.task] += 1
                kept.append(row)
        served = kept
    profile_rows = encode_rows(tokenizer, splits.train, max_length)
    scored = encode_rows(tokenizer, served, max_length)
    block_names = [b.name for b in loaded.blocks]
    merger = loaded.merger
    kw = {"batch_size": settings.batch_size, "pad_id": int(pad_id)}

    steps = 2 + 2 + len(domains)
    bar = tqdm(total=steps, desc="evaluate", unit="pass", disable=not progress)
    try:
        usage = domain_usage(loaded, profile_rows, domains, **kw)
        bar.update()
        full = domain_losses(loaded.model, scored, domains, **kw)
        bar.update()
        plans: dict[str, Plan] = {
            "uniform": uniform_plan(loaded.blocks),
            "usage_all": _mean_plan(list(usage.values())),
        }
        plans.update({f"own:{d}": usage[d] for d in domains})
        merged: dict[str, dict[str, float]] = {}
        for name, plan in plans.items():
            merger.apply(plan)
            merged[name] = domain_losses(loaded.model, scored, domains, **kw)
            bar.update()
    finally:
        merger.restore()
        bar.close()

    own = {d: merged[f"own:{d}"][d] for d in domains}
    best: dict[str, dict[str, Any]] = {}
    for d in domains:
        candidates = {name: merged[name][d] for name in plans}
        name = min(candidates, key=lambda k: candidates[k])
        best[d] = {"merge": name, "loss": round(candidates[name], 4)}

    def gap(losses: Mapping[str, float]) -> dict[str, float]:
        return {d: round(losses[d] / full[d] - 1.0, 4) for d in domains}

    best_loss = {d: float(best[d]["loss"]) for d in domains}
    max_own_gap = max(own[d] / full[d] - 1.0 for d in domains)
    result = {
        "domains": list(domains),
        "blocks": block_names,
        "rows": {
            "usage": len(profile_rows.ids),
            "scored": {d: scored.domains.count(d) for d in domains},
            "scored_tokens": int(
                sum(len(s) - st for s, st in zip(scored.ids, scored.starts, strict=True))
            ),
        },
        "loss": {
            "full": _rounded(full),
            "uniform": _rounded(merged["uniform"]),
            "usage_all": _rounded(merged["usage_all"]),
            "own": _rounded(own),
            "best": best,
        },
        "perplexity": {
            name: {d: round(math.exp(v), 2) for d, v in losses.items()}
            for name, losses in (
                ("full", full),
                ("uniform", merged["uniform"]),
                ("usage_all", merged["usage_all"]),
                ("own", own),
                ("best", best_loss),
            )
        },
        "gap": {
            "uniform": gap(merged["uniform"]),
            "usage_all": gap(merged["usage_all"]),
            "own": gap(own),
            "best": gap(best_loss),
        },
        "cross": {d: _rounded(merged[f"own:{d}"]) for d in domains},
        "usage": {
            d: {name: [round(float(x), 6) for x in p] for name, p in usage[d].items()}
            for d in domains
        },
        "specialisation": specialisation(usage, block_names),
        "max_own_gap": round(max_own_gap, 4),
        "adaptation_threshold": ADAPTATION_THRESHOLD,
        "needs_adaptation": bool(max_own_gap > ADAPTATION_THRESHOLD),
    }
    log.info(
        "evaluated %s: full loss %s, own-merge gap up to %.1f%%",
        folder,
        _rounded(full, 3),
        100 * max_own_gap,
    )
    return result
