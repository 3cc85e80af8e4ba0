"""How good the default model is, and how much the choice of merge matters (``eval-model``).

On the test split of every task it reports:

* ``probe``: a linear softmax probe over all joint labels on the frozen MiniLM sentence
  embedding (mean-pooled, L2-normalised), the no-MoE reference;
* ``full_moe``: the MoE with real top-k dispatch (the experts implementation transformers picks);
* ``uniform``: every block merged with equal coefficients;
* ``frequency``: every block merged with its overall mean gate probabilities (MC-SMoE style);
* ``oracle``: each task served by its own merge (its mean gate probabilities on calibration
  data), which needs the true task tags;
* ``best_static``: the single merge that is best on calibration data among uniform, frequency,
  every task's merge and Dirichlet samples of task mixes and of direct coefficients.

``cross_merge[a][b]`` is the accuracy on task b of the merge of task a. ``latency`` holds medians
at batch 32, full MoE vs the merged model, end to end (token ids to logits) and for the MoE
layers alone, and ``paired_ratio``, the median of merged / full within each repeat (steadier
on a loaded machine than the ratio of the two medians). With ``routing`` set, ``routing``
explains the gap between the full MoE and the task-tag oracle: how often each block's gate
picks the home expert of a request's task (the task the tag-free model recognises), the full
MoE's accuracy on the requests the last block routes home and on the others, and how well a
linear probe on the frozen sentence embedding tells the task from the text alone. Merging uses
the engine's public API (:class:`tanbr.model.Merger`, :class:`tanbr.model.GateRecorder`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tanbr.model.default.build import built_suite, encoder_path, suite_texts
from tanbr.model.default.data import TaskSuite
from tanbr.model.default.modeling import DefaultModel, LowerStates, StateBank
from tanbr.model.precision import DTYPES

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("probe", "full_moe", "uniform", "frequency", "oracle", "best_static")

Plan = dict[str, np.ndarray]


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """Knobs of the evaluation; the defaults are what ``tanbr eval-model`` reports."""

    batch_size: int = 32
    n_candidates: int = 24
    latency_repeats: int = 15
    seed: int = 0
    latency_dtype: str = "float32"  # serving precision of the latency runs (model.precision)
    routing: bool = False  # add the "routing" diagnostics to the report

    def __post_init__(self) -> None:
        for name in ("batch_size", "latency_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_candidates < 0:
            raise ValueError(f"n_candidates must be >= 0, got {self.n_candidates}")
        if self.latency_dtype not in DTYPES:
            raise ValueError(f"latency_dtype must be one of {DTYPES}, got {self.latency_dtype!r}")


def suite_of(dm: DefaultModel, *, tasks: str = "") -> TaskSuite:
    """Rebuild the exact task suite a checkpoint was trained on (checked by digest)."""
    suite = built_suite(dm.info, Path(dm.path or "."), tasks=tasks)
    if suite.labels != dm.labels:
        raise ValueError(f"{dm.path}: label set of the checkpoint differs from the data's")
    return suite


def per_task_accuracy(
    pred: np.ndarray, targets: np.ndarray, task_ids: np.ndarray, tasks: Sequence[str]
) -> dict[str, float]:
    """Accuracy per task: a prediction is right iff it is the request's joint label."""
    right = pred == targets
    return {t: float(right[task_ids == i].mean()) for i, t in enumerate(tasks)}


class _Evaluator:
    """Holds the model, the states of every split and the merger for one evaluation."""

    def __init__(self, dm: DefaultModel, suite: TaskSuite, bank: StateBank, settings: EvalSettings):
        from tanbr.model import Merger

        self.dm = dm
        self.suite = suite
        self.bank = bank
        self.settings = settings
        _, self.where = suite_texts(suite)
        self.targets = {s: suite.targets(s) for s in self.where}
        self.task_ids = {s: suite.task_ids(s) for s in self.where}
        self.merger = Merger(dm.model)

    @torch.inference_mode()
    def predict(
        self, split: str, *, on_batch: Callable[[np.ndarray, LowerStates], None] | None = None
    ) -> np.ndarray:
        """Joint-label predictions (N,) of a split; ``on_batch(positions, states)`` runs before
        each batch's forward (a gate recorder sets its mask there)."""
        index = self.where[split]
        pred = np.zeros(len(index), dtype=np.int64)
        for pos, states in self.bank.batches(index, 64):
            if on_batch is not None:
                on_batch(pos, states)
            pred[pos] = self.dm.model.forward_upper(states).argmax(-1).numpy()
        return pred

    def accuracy(self, split: str) -> dict[str, float]:
        return per_task_accuracy(
            self.predict(split), self.targets[split], self.task_ids[split], self.suite.tasks
        )

    def merged_accuracy(self, plan: Plan, split: str) -> dict[str, float]:
        self.merger.apply(plan)
        try:
            return self.accuracy(split)
        finally:
            self.merger.restore()

    @torch.inference_mode()
    def profiles(self) -> tuple[dict[str, Plan], Plan]:
        """Each task's plan (mean gate probabilities on its calib texts) and the overall one
        (the token-weighted mean over all calib texts: the usage-frequency merge)."""
        from tanbr.model import GateRecorder

        index = self.where["calib"]
        tasks = self.task_ids["calib"]
        per_task: dict[str, Plan] = {}
        weights: list[int] = []
        for i, task in enumerate(self.suite.tasks):
            with GateRecorder(self.dm.model) as rec:
                for _, states in self.bank.batches(index[tasks == i], 64):
                    rec.set_mask(states.attention_mask)
                    self.dm.model.forward_upper(states)
            per_task[task] = rec.profiles()
            weights.append(int(rec.token_probs(rec.block_names[0]).shape[0]))
        shares = np.asarray(weights, dtype=np.float64) / float(sum(weights))
        frequency: Plan = {}
        for name in next(iter(per_task.values())):
            stacked = np.stack([per_task[t][name] for t in per_task])  # (K, E)
            c = shares @ stacked  # (E,)
            frequency[name] = c / c.sum()
        return per_task, frequency


@torch.inference_mode()
def routing_report(
    ev: _Evaluator, homes: Mapping[str, int], task_id_probe: float
) -> dict[str, Any]:
    """How well the tag-free gates recognise a test request's task, and what that costs.

    A request is *routed home* in a block when the top expert of its mean gate probabilities
    (over its real tokens) is its task's home expert.
    """
    from tanbr.model import GateRecorder

    index = ev.where["test"]
    tasks = ev.task_ids["test"]
    home = np.array([homes[t] for t in ev.suite.tasks])[tasks]  # (N,)
    with GateRecorder(ev.dm.model) as rec:
        order: list[np.ndarray] = []

        def note(pos: np.ndarray, states: LowerStates) -> None:
            rec.set_mask(states.attention_mask)
            order.append(pos)

        pred = ev.predict("test", on_batch=note)
        positions = np.concatenate(order)
        top: dict[str, np.ndarray] = {}
        for name in rec.block_names:
            top_expert = np.zeros(len(index), dtype=np.int64)
            top_expert[positions] = rec.sequence_probs(name).argmax(-1).numpy()
            top[name] = top_expert
    right = pred == ev.targets["test"]
    home_last = top[list(top)[-1]] == home
    return {
        "task_id_accuracy": {name: round(float((t == home).mean()), 4) for name, t in top.items()},
        "share_routed_home": round(float(home_last.mean()), 4),
        "full_moe_routed_home": round(float(right[home_last].mean()), 4)
        if home_last.any()
        else None,
        "full_moe_routed_away": round(float(right[~home_last].mean()), 4)
        if (~home_last).any()
        else None,
        "text_task_id_probe": round(task_id_probe, 4),
    }


def _mix_plan(mix: np.ndarray, profiles: Sequence[Plan]) -> Plan:
    """Coefficients of a task mix: per block, normalize(sum_k mix_k * profile_k)."""
    plan: Plan = {}
    for name in profiles[0]:
        c = sum(w * p[name] for w, p in zip(mix, profiles, strict=True))
        plan[name] = np.asarray(c / c.sum())
    return plan


def candidate_plans(
    task_plans: Mapping[str, Plan], frequency: Plan, n: int, rng: np.random.Generator
) -> dict[str, Plan]:
    """The static merges searched by ``best_static``: uniform, frequency, each task's merge,
    Dirichlet task mixes (through the task profiles) and Dirichlet direct coefficients."""
    names = list(frequency)
    n_experts = len(next(iter(frequency.values())))
    out: dict[str, Plan] = {
        "uniform": {b: np.full(n_experts, 1.0 / n_experts) for b in names},
        "frequency": dict(frequency),
    }
    out.update({f"task:{t}": dict(p) for t, p in task_plans.items()})
    profiles = list(task_plans.values())
    for i in range(n):
        if i % 2 == 0:
            out[f"mix:{i}"] = _mix_plan(rng.dirichlet(np.ones(len(profiles))), profiles)
        else:
            coeffs = rng.dirichlet(np.ones(n_experts))
            out[f"coeffs:{i}"] = {b: coeffs.copy() for b in names}
    return out


# ----------------------------------------------------------------------------------------------
# The probe on the frozen encoder


@torch.inference_mode()
def sentence_embeddings(bank: StateBank, n_lower: int, *, batch_size: int = 64) -> np.ndarray:
    """all-MiniLM-L6-v2 sentence embeddings (N, H) from lower states after ``n_lower`` layers:
    MiniLM's own remaining layers, mean pooling, L2 normalisation (as sentence-transformers)."""
    from transformers import BertModel
    from transformers.masking_utils import create_bidirectional_mask

    bert = BertModel.from_pretrained(encoder_path())
    bert.train(False)
    upper = list(bert.encoder.layer)[n_lower:]
    out = np.zeros((len(bank), bert.config.hidden_size), dtype=np.float32)
    for pos, states in bank.batches(np.arange(len(bank)), batch_size):
        hidden = states.hidden.float()  # (B, T, H)
        mask = create_bidirectional_mask(
            config=bert.config, inputs_embeds=hidden, attention_mask=states.attention_mask
        )
        for layer in upper:
            hidden = layer(hidden, mask)
        keep = states.attention_mask.float()[..., None]  # (B, T, 1)
        pooled = (hidden * keep).sum(1) / keep.sum(1)  # (B, H)
        out[pos] = F.normalize(pooled, dim=-1).numpy()
    return out


def fit_probe(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_calib: np.ndarray,
    y_calib: np.ndarray,
    n_classes: int,
    *,
    decays: Sequence[float] = (1e-4, 1e-3, 1e-2),
) -> Callable[[np.ndarray], np.ndarray]:
    """Multinomial logistic regression on standardised features (full-batch L-BFGS); the L2
    weight is picked on calibration data. Returns a predictor of class ids."""
    mean = x_train.mean(0)
    std = x_train.std(0) + 1e-6

    def features(x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((x - mean) / std, dtype=torch.float32)

    xt, yt, xc = features(x_train), torch.as_tensor(y_train), features(x_calib)
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    for decay in decays:
        w = torch.zeros(xt.shape[1], n_classes, requires_grad=True)
        b = torch.zeros(n_classes, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

        def closure(
            w: torch.Tensor = w,
            b: torch.Tensor = b,
            decay: float = decay,
            opt: torch.optim.LBFGS = opt,
        ) -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(xt @ w + b, yt) + decay * (w * w).sum()
            loss.backward()  # type: ignore[no-untyped-call]
            return loss

        opt.step(closure)  # type: ignore[no-untyped-call]
        with torch.no_grad():
            acc = float(((xc @ w + b).argmax(-1).numpy() == y_calib).mean())
        log.debug("probe decay %g: calib accuracy %.3f", decay, acc)
        if best is None or acc > best[0]:
            best = (acc, w.detach(), b.detach())
    if best is None:
        raise ValueError("decays must not be empty")
    _, w_best, b_best = best

    def predict(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.asarray((features(x) @ w_best + b_best).argmax(-1).numpy())

    return predict


# ----------------------------------------------------------------------------------------------
# Latency


def _median_ms(samples: Sequence[float]) -> float:
    return round(float(np.median(samples)) * 1e3, 3)


def paired_ratio(full: Sequence[float], merged: Sequence[float]) -> float:
    """Median over repeats of merged / full within each repeat.

    A repeat runs the full and the merged model back to back, so a burst of load from other
    processes slows both; the ratio of one repeat cancels it, where a ratio of two medians can
    pair a quiet full run with a loaded merged one.
    """
    if len(full) != len(merged) or not len(full):
        raise ValueError(
            f"need the same number (>= 1) of full and merged samples, got {len(full)} and "
            f"{len(merged)}"
        )
    return round(float(np.median(np.asarray(merged) / np.asarray(full))), 4)


@torch.inference_mode()
def measure_latency(
    dm: DefaultModel,
    texts: Sequence[str],
    plan: Plan,
    *,
    repeats: int = 15,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Median latency of one batch, full MoE (real top-k dispatch) vs merged with ``plan``.

    ``end_to_end``: token ids to logits (tokenisation excluded). ``moe_layers``: only the MoE
    blocks, on the hidden states that reach them. Full and merged runs alternate so that load
    from other processes hits both alike. Both run in the serving precision ``dtype`` (a copy
    of the model when it is not float32; merges are summed in float32 and rounded once).
    """
    from tanbr.model import Merger, find_moe_blocks
    from tanbr.model.discovery import get_module
    from tanbr.model.precision import in_dtype, serving_dtype

    torch_dtype = serving_dtype(dtype)
    model = in_dtype(dm.model, torch_dtype)
    if model.config._experts_implementation == "batched_mm":
        raise ValueError("latency of the full MoE must use real top-k dispatch, not batched_mm")
    enc = dm.tokenizer(
        list(texts), truncation=True, max_length=dm.max_length, padding=True, return_tensors="pt"
    )
    ids, mask = enc["input_ids"], enc["attention_mask"]
    blocks = find_moe_blocks(model)
    inputs: dict[str, torch.Tensor] = {}
    handles = [
        get_module(model, b.name).register_forward_pre_hook(
            lambda m, args, name=b.name: inputs.__setitem__(name, args[0].detach().clone())
        )
        for b in blocks
    ]
    model(ids, mask)
    for h in handles:
        h.remove()
    merger = Merger(model)

    def run_blocks() -> None:
        for b in blocks:
            get_module(model, b.name)(inputs[b.name])

    samples: dict[str, list[float]] = {
        k: [] for k in ("e2e_full", "e2e_merged", "moe_full", "moe_merged")
    }
    try:
        for _ in range(2):  # warm-up both paths
            model(ids, mask)
            run_blocks()
        for _ in range(repeats):
            for mode in ("full", "merged"):
                if mode == "merged":
                    merger.apply(plan)
                t0 = time.perf_counter()
                model(ids, mask)
                t1 = time.perf_counter()
                run_blocks()
                t2 = time.perf_counter()
                samples[f"e2e_{mode}"].append(t1 - t0)
                samples[f"moe_{mode}"].append(t2 - t1)
                if mode == "merged":
                    merger.restore()
    finally:
        if merger.mode != "full":
            merger.restore()
    return {
        "dtype": str(torch_dtype).removeprefix("torch."),
        "end_to_end": {
            "full_ms": _median_ms(samples["e2e_full"]),
            "merged_ms": _median_ms(samples["e2e_merged"]),
            "paired_ratio": paired_ratio(samples["e2e_full"], samples["e2e_merged"]),
        },
        "moe_layers": {
            "full_ms": _median_ms(samples["moe_full"]),
            "merged_ms": _median_ms(samples["moe_merged"]),
            "paired_ratio": paired_ratio(samples["moe_full"], samples["moe_merged"]),
        },
    }


# ----------------------------------------------------------------------------------------------
# The whole evaluation


def _mean(values: Mapping[str, float]) -> float:
    return float(np.mean(list(values.values())))


def evaluate_model(
    path: str | Path,
    settings: EvalSettings | None = None,
    *,
    progress: bool = False,
    task_file: str = "",
) -> dict[str, Any]:
    """The ``eval-model`` report of the checkpoint at ``path`` (see the module docstring);
    ``task_file``: where the task file a model was built on is now."""
    from tqdm.auto import tqdm

    settings = settings or EvalSettings()
    dm = DefaultModel.load(path)
    suite = suite_of(dm, tasks=task_file)
    texts, where = suite_texts(suite)
    bank = dm.lower_states(texts, progress=progress)
    ev = _Evaluator(dm, suite, bank, settings)
    tasks = suite.tasks
    steps = tqdm(
        total=4 + len(tasks) + settings.n_candidates + 2, desc="eval", disable=not progress
    )

    emb = sentence_embeddings(bank, dm.model.n_lower)
    probe = fit_probe(
        emb[where["train"]],
        ev.targets["train"],
        emb[where["calib"]],
        ev.targets["calib"],
        len(suite.labels),
    )
    results: dict[str, dict[str, float]] = {
        "probe": per_task_accuracy(
            probe(emb[where["test"]]), ev.targets["test"], ev.task_ids["test"], tasks
        )
    }
    steps.update()
    results["full_moe"] = ev.accuracy("test")
    steps.update()

    task_plans, frequency = ev.profiles()
    rng = np.random.default_rng(settings.seed)
    candidates = candidate_plans(task_plans, frequency, settings.n_candidates, rng)
    cross: dict[str, dict[str, float]] = {}
    for task in tasks:
        cross[task] = ev.merged_accuracy(task_plans[task], "test")
        steps.update()
    results["uniform"] = ev.merged_accuracy(candidates["uniform"], "test")
    results["frequency"] = ev.merged_accuracy(frequency, "test")
    results["oracle"] = {t: cross[t][t] for t in tasks}
    steps.update(2)

    scores: dict[str, float] = {}
    for name, plan in candidates.items():
        scores[name] = _mean(ev.merged_accuracy(plan, "calib"))
        if name.startswith(("mix:", "coeffs:")):
            steps.update()
    best = max(scores, key=lambda k: scores[k])
    log.info("best static merge on calibration: %s (%.3f)", best, scores[best])
    results["best_static"] = ev.merged_accuracy(candidates[best], "test")
    steps.update()

    rng_batch = np.random.default_rng(settings.seed)
    batch_texts = [
        suite.test[i].text
        for i in rng_batch.choice(len(suite.test), size=settings.batch_size, replace=False)
    ]
    latency = measure_latency(
        dm,
        batch_texts,
        frequency,
        repeats=settings.latency_repeats,
        dtype=settings.latency_dtype,
    )
    steps.update()
    steps.close()

    report: dict[str, Any] = {
        "tasks": {t: {m: round(results[m][t], 4) for m in METHODS} for t in tasks},
        "mean": {m: round(_mean(results[m]), 4) for m in METHODS},
        "cross_merge": {a: {b: round(v, 4) for b, v in row.items()} for a, row in cross.items()},
        "latency": latency,
    }
    if settings.routing:
        task_probe = fit_probe(
            emb[where["train"]],
            ev.task_ids["train"],
            emb[where["calib"]],
            ev.task_ids["calib"],
            len(tasks),
        )
        probe_id = float((task_probe(emb[where["test"]]) == ev.task_ids["test"]).mean())
        report["routing"] = routing_report(ev, _home_experts(dm), probe_id)
    return report


def _home_experts(dm: DefaultModel) -> dict[str, int]:
    """Each task's home expert, as recorded at build time (task index mod E if absent)."""
    homes = dm.info.get("home_experts")
    n_experts = int(dm.model.config.num_experts)
    if isinstance(homes, Mapping) and set(homes) >= set(dm.tasks):
        return {t: int(homes[t]) for t in dm.tasks}
    return {t: i % n_experts for i, t in enumerate(dm.tasks)}
