"""Latency probes: real batches of a run's probe slots, replayed with the decisions taken there.

The slot loop scores requests from a memo and cached lower states; these probes time what a
user would wait for (tokenize, encoder, MoE layers, head) on the merged model a policy chose.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from tanbr.experiment.loop import Decision, System, apply_decision, serve
from tanbr.experiment.slots import Requests, Slot

if TYPE_CHECKING:
    from tanbr.experiment.runner import PolicyRun, Setup


def probe_latency(
    setup: Setup, runs: Sequence[PolicyRun], streams: Mapping[int, Sequence[Slot]]
) -> list[PolicyRun]:
    """Time every run's probe slots, interleaved: probe j of every policy of a seed runs before
    probe j + 1 of any, in an order rotated with j, so load changes on a shared machine hit
    every policy alike and the latency ratios stay comparable."""
    from tanbr.experiment.runner import build_system

    e2e: dict[int, list[float]] = {i: [] for i in range(len(runs))}
    moe: dict[int, list[float]] = {i: [] for i in range(len(runs))}
    for seed, slots in streams.items():
        members = [i for i, run in enumerate(runs) if run.seed == seed]
        keep = sorted(probe_slots(setup, seed, len(slots)))
        chosen = [s for s in slots if s.index in keep]
        systems = {i: build_system(setup, runs[i].policy, seed) for i in members}
        for j, slot in enumerate(chosen):
            order = members[j % len(members) :] + members[: j % len(members)] if members else []
            for i in order:
                if j >= len(runs[i].probes):
                    continue
                a, b = time_probes(setup, systems[i], [slot], [runs[i].probes[j]])
                e2e[i] += a
                moe[i] += b
    setup.backend.restore()
    return [
        dataclasses.replace(run, e2e_ms=run.e2e_ms + e2e[i], moe_ms=run.moe_ms + moe[i])
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
) -> tuple[list[float], list[float]]:
    """Latency of a real batch of each probe slot's requests with that slot's decision applied
    (merge time excluded, except the per-task merges the task oracle pays while serving):
    wall time end to end (tokenize + lower layers + MoE layers + head, from the texts), and
    the time of the MoE layers + head alone (cached lower states, never from the memo)."""
    size = setup.config.latency.batch_size
    backend = setup.backend
    memo = getattr(backend, "memo", False)
    e2e, moe = [], []
    try:
        if memo:
            backend.memo = False  # type: ignore[attr-defined]
        for slot, decision in zip(slots, decisions, strict=True):
            n = min(size, len(slot.requests))
            truth = slot.truth.take(slice(0, n)) if slot.truth is not None else None
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
    return e2e, moe
