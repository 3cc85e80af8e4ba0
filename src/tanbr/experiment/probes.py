"""Latency probes: real batches of a run's probe slots, replayed with the decisions taken there.

The slot loop scores requests from a memo and cached lower states; these probes time what a
user would wait for (tokenize, encoder, MoE layers, head) on the merged model a policy chose,
and what building that merge costs at a slot boundary (an in-place re-merge from another plan,
read from the checkpoint in memory-lean mode). The summary adds the estimator's and the
policy's per-slot costs to make the whole served path (:mod:`tanbr.experiment.summary`).
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from tanbr.backend.protocol import Plan
from tanbr.backend.requests import Requests, Slot
from tanbr.experiment.loop import Decision, System, apply_decision, serve
from tanbr.experiment.values import PolicyRun, Setup


@dataclass(frozen=True)
class Timed:
    """What the probes of one run measured, per probe (ms)."""

    e2e_ms: list[float]
    moe_ms: list[float]
    merge_ms: tuple[float, ...]  # merge decisions only


def probe_latency(
    setup: Setup,
    runs: Sequence[PolicyRun],
    streams: Mapping[int, Sequence[Slot]],
    *,
    build: Callable[[Setup, str, int], System],
) -> list[PolicyRun]:
    """Time every run's probe slots, interleaved: probe j of every policy of a seed runs before
    probe j + 1 of any, in an order rotated with j, so load changes on a shared machine hit
    every policy alike and the latency ratios stay comparable. ``build`` makes a fresh system
    for a (policy, seed) (the runner's ``build_system``)."""
    e2e: dict[int, list[float]] = {i: [] for i in range(len(runs))}
    moe: dict[int, list[float]] = {i: [] for i in range(len(runs))}
    merge: dict[int, list[float]] = {i: [] for i in range(len(runs))}
    for seed, slots in streams.items():
        members = [i for i, run in enumerate(runs) if run.seed == seed]
        keep = sorted(probe_slots(setup, seed, len(slots)))
        chosen = [s for s in slots if s.index in keep]
        systems = {i: build(setup, runs[i].policy, seed) for i in members}
        for j, slot in enumerate(chosen):
            order = members[j % len(members) :] + members[: j % len(members)] if members else []
            for i in order:
                if j >= len(runs[i].probes):
                    continue
                timed = time_probes(setup, systems[i], [slot], [runs[i].probes[j]])
                e2e[i] += timed.e2e_ms
                moe[i] += timed.moe_ms
                merge[i] += timed.merge_ms
    setup.backend.restore()
    return [
        dataclasses.replace(
            run,
            e2e_ms=run.e2e_ms + e2e[i],
            moe_ms=run.moe_ms + moe[i],
            merge_probe_ms=run.merge_probe_ms + tuple(merge[i]),
        )
        for i, run in enumerate(runs)
    ]


def last_decision(system: System) -> Decision:
    """The decision the system serves with now: what a probe of this slot replays."""
    assert system.applied is not None
    return system.applied


def probe_slots(setup: Setup, seed: int, n_slots: int) -> set[int]:
    """Slots whose decisions are replayed for the end-to-end probe (the same for all policies
    of a seed, spread over the run). ``latency.batches`` is per policy: each seed probes its
    share, so more seeds do not multiply the probing time."""
    cfg = setup.config
    share = -(-cfg.latency.batches // max(1, len(cfg.seeds)))  # ceil
    n = min(share, n_slots)
    rng = np.random.default_rng([seed, zlib.crc32(b"probe")])
    return {int(i) for i in rng.choice(n_slots, size=n, replace=False)}


def time_probes(
    setup: Setup, system: System, slots: Sequence[Slot], decisions: Sequence[Decision]
) -> Timed:
    """Latency of a real batch of each probe slot's requests with that slot's decision applied:
    wall time end to end (tokenize + lower layers + MoE layers + head, from the texts) and the
    time of the MoE layers + head alone (cached lower states, never from the memo); for a merge
    decision also the time of building its merge in place over another plan, as the service
    does at a slot boundary (the per-task merges of the task oracle happen while serving and
    are inside its end-to-end time)."""
    size = setup.config.latency.batch_size
    backend = setup.backend
    memo = getattr(backend, "memo", False)
    e2e, moe, merges = [], [], []
    try:
        if memo:
            backend.memo = False  # type: ignore[attr-defined]
        for slot, decision in zip(slots, decisions, strict=True):
            n = min(size, len(slot.requests))
            truth = slot.truth.take(slice(0, n)) if slot.truth is not None else None
            if decision.kind == "merge" and decision.plan is not None:
                backend.merge(_other_plan(decision.plan, backend.blocks))
                merges.append(backend.merge(decision.plan))
            apply_decision(system, decision)
            cached = slot.requests.take(slice(0, n))
            moe.append(serve(system, cached, decision=decision, truth=truth).latency_ms)
            live = Requests(cached.texts)  # no rows: encoded from the texts
            t0 = time.perf_counter()
            serve(system, live, decision=decision, truth=truth)
            e2e.append((time.perf_counter() - t0) * 1e3)
    finally:
        if memo:
            backend.memo = True  # type: ignore[attr-defined]
    return Timed(e2e, moe, tuple(merges))


def _other_plan(plan: Plan, blocks: Mapping[str, int]) -> dict[str, np.ndarray]:
    """A plan that differs from ``plan`` in every block with the same shape and grouping (each
    row's weight all on an expert of its group that it weighs least; a block of merged weights
    gets the plain average), so that merging ``plan`` after it does the whole work of a
    re-merge."""
    out: dict[str, np.ndarray] = {}
    for name, coeffs in plan.items():
        if not isinstance(coeffs, np.ndarray):  # merged weights (RegMean, Fisher)
            out[name] = np.full(blocks[name], 1.0 / blocks[name])
            continue
        c = np.atleast_2d(np.asarray(coeffs, dtype=np.float64))  # (m, E)
        other = np.zeros_like(c)
        for g, row in enumerate(c):
            support = np.flatnonzero(row > 0)
            other[g, support[int(np.argmin(row[support]))]] = 1.0
        out[name] = other if np.ndim(coeffs) == 2 else other[0]
    return out
