"""Normalisation-only adaptation: make a checkpoint's merges lose less, at no serving cost.

A plain merge of an ordinary MoE (one trained with a learned gate, no task tags) loses much of
the full model's quality: the merged expert's output has another scale and direction than the
mixture the next layers were trained on. The paper's remedy tunes only the normalisation layers
while merged weights are in place, so that the layers learn to read a merged expert's output.
Here that is done for *every* merge a policy may serve, not one: every few steps a fresh plan
is drawn from the policies' action space (:class:`PlanSampler`), the model is merged by it, and
the normalisation weights (and biases) take a gradient step on the next-token loss of the
task file's training rows; every other parameter is frozen and is written back bit for bit.

The train split of the task file (:func:`tanbr.tasks.split_tasks`, never served by a backend)
is what the model is tuned and profiled on; the losses reported before and after are on the
served rows (calibration and test), under the full model and the same merges.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tanbr.model.checkpoint import LoadedModel, load_checkpoint
from tanbr.model.coeffs import uniform_plan
from tanbr.model.lm.evaluate import Scored, domain_losses, domain_usage, encode_rows
from tanbr.tasks import TaskExample, read_task_file, split_tasks

log = logging.getLogger(__name__)

Plan = dict[str, np.ndarray]
ADAPT_FILE = "adapt.json"
#: Files of the source folder the adapted folder does not take over (weights and config are
#: written anew; the build's records describe the source model, not this one).
NOT_COPIED = ("config.json", "build.json", "evaluation.json", ADAPT_FILE)


@dataclass(frozen=True)
class AdaptSettings:
    """``steps`` gradient steps of ``batch_size`` training rows at learning rate ``lr`` (AdamW,
    no weight decay), a fresh plan every ``resample`` steps; ``tasks_share`` of the plans mix
    the tasks' usage profiles, the rest are coefficients on the expert simplex; ``full_share``
    of the steps run the full MoE instead (0: merges only). ``eval_plans`` sampled plans and
    ``eval_rows`` served rows per task (0: all) measure before and after; ``seed`` fixes every
    draw."""

    steps: int = 200
    batch_size: int = 16
    lr: float = 5e-3
    resample: int = 2
    tasks_share: float = 0.75
    concentration: float = 0.5
    full_share: float = 0.0
    eval_plans: int = 4
    eval_rows: int = 60
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "resample"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_plans", "eval_rows"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.concentration > 0:
            raise ValueError(f"concentration must be > 0, got {self.concentration}")
        for name in ("tasks_share", "full_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


class PlanSampler:
    """Random feasible plans, drawn as the policies' actions are.

    With probability ``tasks_share``: an action ``a`` ~ Dirichlet(``concentration``) on the
    task simplex and, per block, the coefficients ``normalize(sum_k a_k U_k)`` of the tasks'
    usage profiles ``U_k`` (the task-simplex parameterization Tanbr acts on); otherwise one
    coefficient vector ~ Dirichlet(1) on the expert simplex shared by every block (the
    paper's action). ``None`` (the full MoE) with probability ``full_share``.
    """

    def __init__(
        self,
        profiles: Mapping[str, Plan],
        *,
        rng: np.random.Generator,
        tasks_share: float = 0.75,
        concentration: float = 0.5,
        full_share: float = 0.0,
    ) -> None:
        if not profiles:
            raise ValueError("profiles must name at least one task")
        self.tasks = list(profiles)
        self.blocks = list(next(iter(profiles.values())))
        self.profiles = {
            b: np.stack([np.asarray(profiles[t][b], dtype=np.float64) for t in self.tasks])
            for b in self.blocks
        }  # block -> (K, E)
        self.rng = rng
        self.tasks_share = tasks_share
        self.concentration = concentration
        self.full_share = full_share

    def draw(self) -> Plan | None:
        """One plan (block -> coefficients on the simplex), or None for the full MoE."""
        if self.full_share and self.rng.random() < self.full_share:
            return None
        sizes = {u.shape[1] for u in self.profiles.values()}
        if self.rng.random() >= self.tasks_share and len(sizes) == 1:
            c = self.rng.dirichlet(np.ones(sizes.pop()))  # one expert simplex for all blocks
            return {b: c.copy() for b in self.blocks}
        a = self.rng.dirichlet(np.full(len(self.tasks), self.concentration))
        plan = {}
        for b, u in self.profiles.items():
            c = np.maximum(a @ u, 0.0)
            plan[b] = c / c.sum()
        return plan


def norm_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The normalisation layers' parameters (RMSNorm / LayerNorm weights and biases), by name.

    A normalisation layer is a module of a class named ``...Norm`` whose own parameters are
    all vectors (so a norm-named projection is never taken)."""
    out: dict[str, nn.Parameter] = {}
    for prefix, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not own or not type(module).__name__.endswith("Norm"):
            continue
        if all(p.dim() == 1 for _, p in own):
            out.update({f"{prefix}.{n}" if prefix else n: p for n, p in own})
    return out


def _subset(scored: Scored, rows: Sequence[int]) -> Scored:
    return Scored(
        tuple(scored.ids[i] for i in rows),
        tuple(scored.starts[i] for i in rows),
        tuple(scored.domains[i] for i in rows),
    )


def _first_rows(rows: Sequence[TaskExample], per_task: int) -> list[TaskExample]:
    if per_task <= 0:
        return list(rows)
    taken: dict[str, int] = {}
    out = []
    for row in rows:
        if taken.get(row.task, 0) < per_task:
            taken[row.task] = taken.get(row.task, 0) + 1
            out.append(row)
    return out


def batch_loss(model: nn.Module, scored: Scored, rows: Sequence[int], pad_id: int) -> torch.Tensor:
    """Mean next-token loss over the scored tokens (the continuations) of ``rows``, with
    gradients."""
    seqs = [scored.ids[i] for i in rows]
    starts = torch.as_tensor([scored.starts[i] for i in rows])
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.as_tensor(s)
        mask[r, : len(s)] = 1
    cols = torch.arange(width)
    scored_tokens = (cols >= starts[:, None]) & (mask == 1)  # (b, T) tokens to predict
    keep = torch.zeros_like(scored_tokens)
    keep[:, :-1] = scored_tokens[:, 1:]  # position t predicts token t + 1
    logits = model(
        input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep
    ).logits  # (scored tokens, V)
    return nn.functional.cross_entropy(logits.float(), ids[scored_tokens])


@dataclass(frozen=True)
class Measured:
    """Per task (nats per token): the full MoE, the uniform merge, the tasks' mean usage
    merge, each task's own usage merge on itself, and the mean over the sampled plans; and the
    training rows' loss under the sampled plans (what the tuning lowers)."""

    full: dict[str, float]
    uniform: dict[str, float]
    usage_all: dict[str, float]
    own: dict[str, float]
    sampled: dict[str, float]
    train_sampled: float


def measure(
    loaded: LoadedModel,
    served: Scored,
    train: Scored,
    tasks: Sequence[str],
    profiles: Mapping[str, Plan],
    plans: Sequence[Plan],
    *,
    batch_size: int,
    pad_id: int,
) -> Measured:
    """The losses of :class:`Measured` under the model as it is now (restored afterwards)."""
    model, merger = loaded.model, loaded.merger
    kw: dict[str, Any] = {"batch_size": batch_size, "pad_id": pad_id}
    where = np.asarray(served.domains)
    try:
        merger.restore()
        full = domain_losses(model, served, tasks, **kw)
        merger.apply(uniform_plan(loaded.blocks))
        uniform = domain_losses(model, served, tasks, **kw)
        mean_usage = {
            b: np.mean([profiles[t][b] for t in tasks], axis=0) for b in profiles[tasks[0]]
        }
        merger.apply(mean_usage)
        usage_all = domain_losses(model, served, tasks, **kw)
        own = {}
        for t in tasks:
            merger.apply(profiles[t])
            own[t] = domain_losses(
                model, _subset(served, np.flatnonzero(where == t).tolist()), [t], **kw
            )[t]
        sampled_parts, train_parts = [], []
        train_all = ["all"]
        train_one = Scored(train.ids, train.starts, ("all",) * len(train.ids))
        for plan in plans:
            merger.apply(plan)
            sampled_parts.append(domain_losses(model, served, tasks, **kw))
            train_parts.append(domain_losses(model, train_one, train_all, **kw)["all"])
    finally:
        merger.restore()
    sampled = {t: float(np.mean([p[t] for p in sampled_parts])) for t in tasks}
    return Measured(full, uniform, usage_all, own, sampled, float(np.mean(train_parts)))


@dataclass(frozen=True)
class AdaptResult:
    """What :func:`adapt` wrote and measured (``adapt.json`` of the output folder)."""

    folder: str
    source: str
    tasks_file: str
    settings: AdaptSettings
    tuned: list[str]
    tuned_parameters: int
    frozen_parameters: int
    before: Measured
    after: Measured
    train_curve: list[float]
    seconds: float

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["gap"] = {
            when: {
                kind: {t: round(getattr(m, kind)[t] / m.full[t] - 1.0, 4) for t in getattr(m, kind)}
                for kind in ("uniform", "usage_all", "own", "sampled")
            }
            for when, m in (("before", self.before), ("after", self.after))
        }
        return data


def adapt(
    model_folder: str | Path,
    tasks: str | Path,
    out: str | Path,
    *,
    settings: AdaptSettings | None = None,
    progress: Callable[[int], Any] | None = None,
) -> AdaptResult:
    """Tune the normalisation layers of the checkpoint in ``model_folder`` under random
    merges (see the module doc) on the train split of the lm task file ``tasks``; write the
    tuned checkpoint (same format, its tokenizer and the task file beside it) and
    ``adapt.json`` into ``out``. ``progress``, if given, is called with each step's number."""
    from transformers import AutoTokenizer

    settings = settings or AdaptSettings()
    t_start = time.perf_counter()
    source = Path(model_folder)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output folder {out} exists and is not empty")
    task_file = read_task_file(tasks)
    if task_file.kind != "lm":
        raise ValueError(
            f"{task_file.path}: adaptation needs an lm task file (text, task, target); "
            f"this one is {task_file.kind!r}"
        )
    loaded = load_checkpoint(source)
    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    pad_id = int(
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    max_length = int(getattr(loaded.config, "max_position_embeddings", 512))
    names = list(task_file.tasks)
    splits = split_tasks(task_file, seed=settings.seed)
    train = encode_rows(tokenizer, splits.train, max_length)
    served = encode_rows(
        tokenizer, _first_rows([*splits.calib, *splits.test], settings.eval_rows), max_length
    )
    train_eval = encode_rows(tokenizer, _first_rows(splits.train, settings.eval_rows), max_length)
    kw: dict[str, Any] = {"batch_size": settings.batch_size, "pad_id": pad_id}

    model = loaded.model
    norms = norm_parameters(model)
    if not norms:
        raise ValueError(f"{source}: the model has no normalisation layer to tune")
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    loaded.merger.restore()
    profiles = domain_usage(loaded, train, names, **kw)  # label-free gates, tasks grouped
    sampler = PlanSampler(
        profiles,
        rng=np.random.default_rng([settings.seed, 1]),
        tasks_share=settings.tasks_share,
        concentration=settings.concentration,
    )
    eval_plans = [p for p in (sampler.draw() for _ in range(settings.eval_plans)) if p is not None]
    before = measure(loaded, served, train_eval, names, profiles, eval_plans, **kw)
    log.info("before: full %s, sampled merges %s", _r(before.full), _r(before.sampled))

    for p in model.parameters():
        p.requires_grad_(False)
    for p in norms.values():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(list(norms.values()), lr=settings.lr, weight_decay=0.0)
    train_sampler = PlanSampler(
        profiles,
        rng=np.random.default_rng([settings.seed, 2]),
        tasks_share=settings.tasks_share,
        concentration=settings.concentration,
        full_share=settings.full_share,
    )
    rng = np.random.default_rng([settings.seed, 3])
    order = rng.permutation(len(train.ids))
    cursor = 0
    curve = []
    try:
        for step in range(settings.steps):
            if step % settings.resample == 0:
                plan = train_sampler.draw()
                if plan is None:
                    loaded.merger.restore()
                else:
                    loaded.merger.apply(plan)
            if cursor + settings.batch_size > len(order):
                order, cursor = rng.permutation(len(train.ids)), 0
            rows = order[cursor : cursor + settings.batch_size].tolist()
            cursor += settings.batch_size
            loss = batch_loss(model, train, rows, pad_id)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            curve.append(round(float(loss.detach()), 4))
            if progress is not None:
                progress(step + 1)
    finally:
        loaded.merger.restore()
        for p in model.parameters():
            p.requires_grad_(False)

    after = measure(loaded, served, train_eval, names, profiles, eval_plans, **kw)
    log.info("after: full %s, sampled merges %s", _r(after.full), _r(after.sampled))
    changed = [
        n for n, p in model.named_parameters() if n not in norms and not p.equal(originals[n])
    ]
    if changed:  # the optimiser only holds the norms: anything else moving is a bug
        raise RuntimeError(f"parameters outside the normalisation layers changed: {changed[:3]}")

    frozen = sum(p.numel() for n, p in model.named_parameters() if n not in norms)
    result = AdaptResult(
        folder=str(out),
        source=str(source),
        tasks_file=str(task_file.path),
        settings=settings,
        tuned=sorted(norms),
        tuned_parameters=sum(p.numel() for p in norms.values()),
        frozen_parameters=frozen,
        before=before,
        after=after,
        train_curve=curve,
        seconds=0.0,
    )
    _write(loaded, tokenizer, source, Path(task_file.path), out, result, t_start)
    return dataclasses.replace(result, seconds=round(time.perf_counter() - t_start, 2))


def _write(
    loaded: LoadedModel,
    tokenizer: Any,
    source: Path,
    task_path: Path,
    out: Path,
    result: AdaptResult,
    t_start: float,
) -> None:
    """The checkpoint, tokenizer, task file and ``adapt.json``, written into a temporary
    sibling folder renamed into place (an interrupted run never looks complete)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for path in source.iterdir():  # tokenizer, generation config, task file, ...
            if path.is_file() and path.name not in NOT_COPIED and path.suffix != ".safetensors":
                shutil.copy2(path, tmp / path.name)
        model: Any = loaded.model  # a transformers model
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if not (tmp / "tasks.jsonl").exists() and task_path.suffix == ".jsonl":
            shutil.copy2(task_path, tmp / "tasks.jsonl")
        data = result.to_json()
        data["seconds"] = round(time.perf_counter() - t_start, 2)
        (tmp / ADAPT_FILE).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        if out.exists():
            out.rmdir()  # checked empty above
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _r(losses: Mapping[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in losses.items()}
