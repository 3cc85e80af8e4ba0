"""Run policies x seeds through the slot loop and write a run folder.

:func:`~tanbr.experiment.setup.prepare` computes once what the policies share;
:func:`execute` then draws one stream per seed (the same for every policy of that seed), runs
each policy with :func:`~tanbr.experiment.loop.run_slot`, joins each slot's regret against the
slot oracle on the very requests the slot scored, times the whole served path on real batches,
measures the resident set of serving processes, and writes ``config.toml``, ``trace.jsonl``,
``summary.json``, ``report.md`` and the plots.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
import shutil
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tanbr.backend.protocol import Backend
from tanbr.backend.requests import Slot
from tanbr.backend.scorers import make_scorer
from tanbr.experiment.config import ExperimentConfig, write_config
from tanbr.experiment.estimator import ClusterEstimator
from tanbr.experiment.loop import Decision, Labelling, System, run_slot
from tanbr.experiment.memory import measure_run_memory
from tanbr.experiment.modes import MODES, PlanOf, make_mode
from tanbr.experiment.parameterization import (
    Direct,
    build_parameterization,
    make_space,
    reads_context,
)
from tanbr.experiment.probes import last_decision, probe_latency, probe_slots, time_probes
from tanbr.experiment.records import SlotRecord, write_json, write_trace
from tanbr.experiment.reward import RewardFn
from tanbr.experiment.setup import evaluation_metric
from tanbr.experiment.summary import Costs, summarize
from tanbr.experiment.values import PolicyRun, Progress, RunResult, Setup, SlotEvaluator
from tanbr.experiment.workload import (
    SCHEDULES,
    draw_slots,
    introduce_task,
    read_mix_trace,
    read_request_trace,
)

log = logging.getLogger(__name__)

#: The yardstick of regret: added to every experiment whose policies do not name it.
YARDSTICK = "slot-oracle"

#: Runs an experiment's (policy, seed) jobs somewhere else: (setup, streams, names, progress
#: bar) -> the runs, in the order seed by seed, policy by policy.
Executor = Callable[[Setup, Mapping[int, Sequence[Slot]], Sequence[str], Any], list[PolicyRun]]


# --- streams and systems ------------------------------------------------------------------------


def make_slots(setup: Setup, seed: int) -> list[Slot]:
    """The stream of one seed (identical for every policy of that seed)."""
    cfg = setup.config.workload
    rng = np.random.default_rng([seed, zlib.crc32(b"workload")])
    n_tasks = len(setup.task_names)
    if cfg.kind == "requests":
        if not cfg.requests:
            raise ValueError("workload.kind 'requests' needs workload.requests (a trace file)")
        return read_request_trace(cfg.requests, setup.test)[: setup.config.n_slots]
    if cfg.kind == "trace":
        if not cfg.trace:
            raise ValueError("workload.kind 'trace' needs workload.trace (a mix trace file)")
        mixes = read_mix_trace(cfg.trace, setup.task_names)[: setup.config.n_slots]
    elif cfg.kind in SCHEDULES:
        table: dict[str, dict[str, Any]] = {
            "stationary": {"mix": list(cfg.mix) or None},
            "switch": {
                "n_dominant": cfg.n_dominant,
                "dominance": cfg.dominance,
                "period": cfg.period,
            },
            "periodic": {"period": cfg.period, "sharpness": cfg.sharpness},
            "random-walk": {"concentration": cfg.concentration},
            "drift": {
                "n_dominant": cfg.n_dominant,
                "dominance": cfg.dominance,
                "period": cfg.period,
                "ramp": cfg.ramp,
                "jitter": cfg.jitter,
            },
        }
        params = table[cfg.kind]
        mixes = SCHEDULES[cfg.kind](
            n_slots=setup.config.n_slots, n_tasks=n_tasks, rng=rng, **params
        )
    else:
        known = sorted([*SCHEDULES, "trace", "requests"])
        raise ValueError(f"workload.kind must be one of {known}, got {cfg.kind!r}")
    if cfg.new_task:
        task = setup.task_names.index(cfg.new_task)  # checked in prepare
        mixes = introduce_task(mixes, task, at=cfg.new_task_at, share=cfg.new_task_share)
    return draw_slots(setup.test, mixes, slot_size=cfg.slot_size, rng=rng)


def build_system(setup: Setup, name: str, seed: int) -> System:
    """A fresh system for one policy and seed: estimator copied from the fitted template."""
    cfg = setup.config
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    estimator = copy.deepcopy(setup.estimator)
    if isinstance(estimator, ClusterEstimator):
        estimator.rng = np.random.default_rng([seed, 7])
    base, experts = split_variant(name)
    params = {**_policy_params(cfg, base), **(cfg.policy.get(name, {}) if base != name else {})}
    plan_of, dim = _action_of(setup, base, params.pop("action", None))
    baselines = setup.baselines
    if experts is not None and experts != cfg.merge.experts:
        if not (_is_bandit(base) or base == "plug-in"):
            raise ValueError(f"{name!r}: only bandit policies and plug-in take an @m variant")
        param, absolute = build_parameterization(
            cfg.parameterization.kind, setup.profiles, setup.backend.blocks, experts=experts
        )
        plan_of, dim = param.plan, param.dim
        baselines = dataclasses.replace(baselines, plan_of=absolute.plan)
    mode = make_mode(
        base,
        baselines=baselines,
        space=make_space(dim),
        context_dim=estimator.n_types,
        plan_of=plan_of,
        rng=rng,
        params=params,
    )
    mode.name = name
    return System(
        backend=setup.backend,
        estimator=estimator,
        mode=mode,
        reward=RewardFn(
            kind=cfg.reward.kind,
            latency_budget_ms=cfg.reward.latency_budget_ms,
            latency_weight=cfg.reward.latency_weight,
            memory_budget_bytes=cfg.reward.memory_budget_bytes,
            memory_weight=cfg.reward.memory_weight,
        ),
        scorer=make_scorer(cfg.reward.kind),
        metric=make_scorer(evaluation_metric(cfg, setup.backend)),
        labelling=Labelling(
            fraction=cfg.reward.label_fraction,
            delay=cfg.reward.delay,
            probe=cfg.reward.probe,
            sample=cfg.evaluation.sample,
        ),
        head=cfg.estimator.head,
        rng=np.random.default_rng([seed, zlib.crc32(name.encode()), 1]),
    )


_VARIANT = re.compile(r"^(?P<base>.+)@m(?P<m>[1-9][0-9]*)$")


def split_variant(name: str) -> tuple[str, int | None]:
    """``NAME@mK``: policy NAME serving K merged experts per block (``merge.experts`` for
    this policy alone), so that m = 1, 2, 3 can stand side by side in one table."""
    match = _VARIANT.match(name)
    if match is None:
        return name, None
    return match["base"], int(match["m"])


#: Policies that act on one coefficient per expert by default (the paper's action), not on the
#: task simplex; ``[policy.NAME] action = "tasks" | "experts"`` chooses for any bandit policy.
EXPERT_ACTION = ("tanbr-paper", "nucb")
ACTIONS = ("tasks", "experts")


def _action_of(setup: Setup, name: str, action: Any) -> tuple[PlanOf, int]:
    """What a bandit policy acts on: the parameterization's action (``tasks``), or one
    coefficient per expert shared by every block (``experts``)."""
    if action is None:
        action = "experts" if name in EXPERT_ACTION else "tasks"
    if action not in ACTIONS:
        raise ValueError(f"[policy.{name}] action must be one of {ACTIONS}, got {action!r}")
    if action == "tasks":
        return setup.plan_of, setup.dim
    if setup.config.merge.experts > 1:
        raise ValueError(
            f"policy {name!r} acts on expert coefficients (one merge per block); merge.experts"
            ' > 1 groups experts by task type: set [policy.{name}] action = "tasks"'
        )
    sizes = set(setup.backend.blocks.values())
    if len(sizes) != 1:
        raise ValueError(
            f"policy {name!r} acts on one coefficient per expert, shared by every block; the "
            f"model's blocks have different numbers of experts {sorted(sizes)}"
        )
    direct = Direct(setup.backend.blocks)
    return direct.plan, direct.dim


def _policy_params(cfg: ExperimentConfig, name: str) -> dict[str, Any]:
    """``[policy.NAME]`` of the config. A parameterization that reads the estimated mix
    (``task-relative``, ``task-tempered``) already starts from it, so Tanbr's own
    context-anchored chart would apply the mix twice (and ``task-tempered``'s action is not a
    mix at all): Tanbr then works on the plain simplex unless the config names a chart."""
    params = dict(cfg.policy.get(name, {}))
    if name == "tanbr" and reads_context(cfg.parameterization.kind):
        params.setdefault("chart", "absolute")
    return params


def run_policy(
    setup: Setup,
    name: str,
    seed: int,
    slots: Sequence[Slot],
    *,
    bar: Any = None,
    probe: bool = True,
) -> PolicyRun:
    """Serve a stream with one policy, then (``probe``) time real batches of its probe slots.

    ``bar`` is an optional progress bar (``update(n)``, ``set_description(str)``). Without
    ``probe`` the decisions to replay are kept in the run, for :func:`probe_latency`."""
    t0 = time.perf_counter()
    system = build_system(setup, name, seed)
    evaluator = SlotEvaluator(setup.mapping, len(setup.task_names))
    records: list[SlotRecord] = []
    decisions: list[Decision] = []
    keep = probe_slots(setup, seed, len(slots))
    if bar is not None:
        bar.set_description(f"{name} (seed {seed})")
    for slot in slots:
        record = run_slot(system, slot, evaluator=evaluator, seed=seed)
        records.append(record)
        if slot.index in keep:
            decisions.append(last_decision(system))
        if bar is not None:
            bar.update(1)
    run = PolicyRun(
        name,
        seed,
        records,
        [],
        [],
        time.perf_counter() - t0,
        tuple(decisions),
        reads_mix=bool(system.mode.reads_mix),
    )
    if probe:
        timed = time_probes(setup, system, [s for s in slots if s.index in keep], decisions)
        run = dataclasses.replace(
            run, e2e_ms=timed.e2e_ms, moe_ms=timed.moe_ms, merge_probe_ms=timed.merge_ms
        )
    setup.backend.restore()
    return run


# --- regret on the same requests -----------------------------------------------------------------


def attach_regret(runs: Sequence[PolicyRun]) -> list[PolicyRun]:
    """Each slot's regret against the slot oracle on the very requests that slot scored.

    The slot oracle serves, for each slot, the candidate merge that is best for the slot's true
    mix; every policy of a seed scores the same requests of that slot, so the oracle's accuracy
    on them is the reference and the slot oracle's own regret is zero by construction."""
    oracle = {
        (run.seed, r.slot): r.accuracy
        for run in runs
        if run.policy == YARDSTICK
        for r in run.records
        if r.accuracy is not None
    }
    out = []
    for run in runs:
        records = []
        for r in run.records:
            o = oracle.get((run.seed, r.slot))
            if o is not None and r.accuracy is not None:
                r = dataclasses.replace(r, oracle_accuracy=o, regret=o - r.accuracy)
            records.append(r)
        out.append(dataclasses.replace(run, records=records))
    return out


# --- the whole experiment -----------------------------------------------------------------------


def new_run_folder(out: Path, name: str) -> Path:
    """``out/NAME-YYYYmmdd-HHMMSS`` (suffixed if it exists)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = out / f"{name}-{stamp}"
    n = 1
    while folder.exists():
        n += 1
        folder = out / f"{name}-{stamp}-{n}"
    folder.mkdir(parents=True)
    return folder


def policy_names(setup: Setup, streams: Mapping[int, Sequence[Slot]]) -> tuple[str, ...]:
    """The config's policies, and the slot oracle when a candidate table exists for it and
    every slot carries its truth (a replayed trace of unlabeled requests has none)."""
    names = tuple(setup.config.policies)
    labelled = all(slot.truth is not None for slots in streams.values() for slot in slots)
    if not labelled:
        oracles = [n for n in names if n in MODES and getattr(MODES[n], "needs_truth", False)]
        if oracles:
            raise ValueError(
                f"{oracles[0]!r} reads each slot's truth, and the stream has slots without it "
                "(unlabeled requests); drop it from the policies"
            )
        return names
    if YARDSTICK not in names and setup.baselines.oracle is not None:
        names += (YARDSTICK,)
    return names


def execute(
    setup: Setup,
    *,
    out: Path,
    progress: Progress | None = None,
    plots: bool = True,
    workers: int = 1,
    backend_factory: Callable[[], Backend] | None = None,
    executor: Executor | None = None,
    started: float | None = None,
) -> RunResult:
    """Every policy x seed of the config; writes the run folder and returns the summary.

    With ``workers`` > 1 the (policy, seed) runs are spread over that many processes, each
    serving with its own copy of the model made by ``backend_factory`` (a picklable callable);
    the results are the same as with one process. The latency probes always run afterwards in
    this process, interleaved across policies (:func:`probe_latency`), then the memory probes
    in fresh processes. ``started`` (a ``time.perf_counter()`` value) is when the command
    began: ``wall_s`` counts from there. ``executor`` runs the (policy, seed) runs instead
    (e.g. :class:`~tanbr.experiment.ray_executor.RayExecutor`), with the same results.

    The run folder is created once every run and probe has finished, and removed again if
    writing it fails, so a run folder is always complete."""
    cfg = setup.config
    started = time.perf_counter() if started is None else started
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers > 1 and backend_factory is None:
        raise ValueError("workers > 1 needs a backend_factory (each process builds its model)")
    unknown = [
        p
        for p in cfg.policies
        if split_variant(p)[0] not in MODES and not _is_bandit(split_variant(p)[0])
    ]
    if unknown:
        make_mode(unknown[0], baselines=setup.baselines)  # raises with close matches
    t0 = time.perf_counter()
    streams = {seed: make_slots(setup, seed) for seed in cfg.seeds}
    names = policy_names(setup, streams)
    total = sum(len(slots) for slots in streams.values()) * len(names)
    bar = progress("slots", total) if progress else None
    try:
        if executor is not None:
            runs = executor(setup, streams, names, bar)
        elif workers > 1:
            assert backend_factory is not None
            from tanbr.experiment.parallel import run_parallel

            runs = run_parallel(setup, streams, names, workers, backend_factory, bar)
        else:
            runs = [
                run_policy(setup, name, seed, slots, bar=bar, probe=False)
                for seed, slots in streams.items()
                for name in names
            ]
    finally:
        setup.backend.restore()
        if bar is not None:
            bar.close()
    setup.timings["runs_s"] = time.perf_counter() - t0
    runs = attach_regret(runs)
    t0 = time.perf_counter()
    runs = probe_latency(setup, runs, streams, build=build_system)
    setup.timings["probes_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    memory = measure_run_memory(setup, runs, streams) if cfg.evaluation.memory else {}
    setup.timings["memory_s"] = time.perf_counter() - t0
    folder = new_run_folder(out, cfg.name)
    try:
        summary = _write_folder(folder, setup, runs, memory, started=started, plots=plots)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return RunResult(folder, summary, runs)


def _write_folder(
    folder: Path,
    setup: Setup,
    runs: list[PolicyRun],
    memory: Any,
    *,
    started: float,
    plots: bool,
) -> dict[str, Any]:
    cfg = setup.config
    write_config(folder / "config.toml", cfg)
    write_trace(folder / "trace.jsonl", (r for run in runs for r in run.records))
    costs = Costs(
        slot_size=cfg.workload.slot_size,
        batch_size=cfg.latency.batch_size,
        signature_ms=float(getattr(setup.backend, "signature_cost", 0.0)),
        memory=memory,
        tail=cfg.evaluation.tail,
        tasks=tuple(setup.task_names),
    )
    summary = summarize(runs, costs)
    summary["signature"] = cfg.estimator.signature
    summary["estimator"] = cfg.estimator.kind
    dtype = getattr(setup.backend, "dtype", None)
    summary["dtype"] = str(dtype).removeprefix("torch.") if dtype is not None else None
    summary["timings"] = dict(setup.timings)
    summary["tasks"] = list(setup.task_names)
    summary["n_types"] = setup.estimator.n_types
    summary["wall_s"] = time.perf_counter() - started
    summary["budget_s"] = cfg.evaluation.budget_s or None
    write_json(folder / "summary.json", summary)
    if plots:
        from tanbr.experiment.plots import plot_run

        plot_run(folder)
    from tanbr.experiment.report import write_report

    write_report([folder], folder / "report.md")
    summary["wall_s"] = time.perf_counter() - started  # the plots and report included
    write_json(folder / "summary.json", summary)
    return summary


def _is_bandit(name: str) -> bool:
    from tanbr.bandit import POLICIES

    return name in POLICIES
