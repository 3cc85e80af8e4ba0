"""Measured memory: the resident set of a process that serves a slot, one process per kind.

Parameter bytes say what a model needs in principle; the resident set (RSS) is what a serving
process really holds: the runtime, the tokenizer, allocator slack, the experts a merge maps from
disk. Each kind of serving (``full`` MoE, one ``merge``, ``soft`` merging, ``per-task`` merges)
runs in its own fresh process that loads the model the way a server would (memory-lean for the
merges: the routed experts are never resident), serves a slot of real texts end to end
(tokenizer, encoder, MoE layers, head) and reports its peak resident set (``VmHWM``) and its
steady resident set after the slot (``VmRSS``, after garbage collection and returning freed heap
pages to the system). A ``none`` process makes the same imports and loads no model: its steady
resident set is the runtime's share, and a kind's *model share* is its steady set minus that.

The child is ``python -m tanbr.experiment.memory`` with a JSON request on stdin; it prints one
JSON object on stdout.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tanbr.backend.requests import Slot
from tanbr.experiment.values import PolicyRun, Setup

log = logging.getLogger(__name__)

KINDS = ("none", "full", "merge", "soft", "per-task")


@dataclass(frozen=True)
class MemoryProbe:
    """What one serving process held: peak and steady resident set, parameter bytes."""

    kind: str
    rss_peak_bytes: int
    rss_steady_bytes: int
    param_bytes: int
    lean: bool


@dataclass(frozen=True)
class MemoryRequest:
    """What a probe process loads and serves (plain data: it crosses a process boundary)."""

    kind: str
    folder: str
    dtype: str
    texts: tuple[str, ...]
    plans: tuple[dict[str, Any], ...] = ()  # merge: one plan; per-task: one per group
    groups: tuple[int, ...] = ()  # per-task: the plan index of each text
    batch_size: int = 32
    threads: int = 1
    label: str = ""  # what the probe stands for (e.g. "merge-m2"; default: the kind)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"memory probe kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "merge" and len(self.plans) != 1:
            raise ValueError("a 'merge' memory probe needs exactly one plan")
        if self.kind == "per-task" and (not self.plans or len(self.groups) != len(self.texts)):
            raise ValueError("a 'per-task' memory probe needs plans and one group per text")


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (Linux); 0 where it is unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def serve_and_measure(request: MemoryRequest) -> MemoryProbe:
    """Load and serve as ``request`` says, in this process; returns its resident set."""
    import torch

    from tanbr.backend.registry import BackendSpec, serving_backend
    from tanbr.backend.requests import Requests
    from tanbr.model.lean import return_freed_memory

    torch.set_num_threads(request.threads)
    lean = request.kind in ("merge", "per-task")
    if request.kind == "none":
        return_freed_memory()
        return MemoryProbe("none", _status("VmHWM"), _status("VmRSS"), 0, lean=False)
    spec = BackendSpec(path=request.folder, lean=lean, dtype=request.dtype, signature="input0")
    backend = serving_backend(spec)
    plans = [{k: np.asarray(v, dtype=np.float64) for k, v in p.items()} for p in request.plans]
    texts = list(request.texts)
    size = request.batch_size
    param_bytes = 0
    if request.kind == "per-task":
        groups = np.asarray(request.groups)
        for g, plan in enumerate(plans):
            idx = np.flatnonzero(groups == g)
            if not len(idx):
                continue
            backend.merge(plan)
            for a in range(0, len(idx), size):
                backend.predict(Requests(tuple(texts[i] for i in idx[a : a + size])))
            param_bytes = max(param_bytes, backend.memory_bytes())
    else:
        if request.kind == "merge":
            backend.merge(plans[0])
        elif request.kind == "soft":
            backend.merge_soft()
        else:
            backend.restore()
        for a in range(0, len(texts), size):
            backend.predict(Requests(tuple(texts[a : a + size])))
        param_bytes = backend.memory_bytes()
    return_freed_memory()
    label = request.label or request.kind
    return MemoryProbe(label, _status("VmHWM"), _status("VmRSS"), param_bytes, lean=lean)


def measure(requests: Sequence[MemoryRequest], *, parallel: int = 2) -> dict[str, MemoryProbe]:
    """Run every request in its own fresh process (``parallel`` at a time: a process's resident
    set is its own, whatever runs beside it); returns the probes by kind."""

    def one(request: MemoryRequest) -> MemoryProbe:
        cmd = [sys.executable, "-m", "tanbr.experiment.memory"]
        payload = json.dumps(asdict(request))
        done = subprocess.run(
            cmd, input=payload, capture_output=True, text=True, timeout=900, check=False
        )
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"memory probe {request.kind!r} failed: {tail[0]}")
        return MemoryProbe(**json.loads(done.stdout.strip().splitlines()[-1]))

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        probes = list(pool.map(one, requests))
    return {p.kind: p for p in probes}


def measure_run_memory(
    setup: Setup, runs: Sequence[PolicyRun], streams: Mapping[int, Sequence[Slot]]
) -> dict[str, MemoryProbe]:
    """The memory probes an experiment's runs stand for: one process per serving kind (a merge
    of a policy's plan, the full MoE, soft merging, the task oracle's per-task merges) and one
    with no model, each serving the first slot of the first seed end to end."""
    from tanbr.experiment.summary import serving_kind

    folder = setup.backend.checkpoint
    if folder is None or not streams:
        log.info("memory probes skipped: the backend has no checkpoint folder")
        return {}
    cfg = setup.config
    slot = next(iter(streams.values()))[0]
    texts = tuple(slot.requests.texts)
    kinds: dict[str, PolicyRun] = {}
    for run in runs:  # a run of each kind whose plans are coefficients (merged weights serve
        kind = serving_kind(run)  # one dense expert per block, as a coefficient merge does)
        if kind not in kinds and not (kind.startswith("merge") and not _coeff_plans(run)):
            kinds[kind] = run
    base = MemoryRequest(
        kind="none",
        folder=str(folder),
        dtype=cfg.model.dtype,
        texts=texts,
        batch_size=cfg.latency.batch_size,
        threads=max(1, cfg.model.threads // 2),
    )
    requests = [base]
    for kind, run in sorted(kinds.items()):
        if kind.startswith("merge"):
            plan = _coeff_plans(run)[0]
            requests.append(dataclasses.replace(base, kind="merge", label=kind, plans=(plan,)))
        elif kind == "per-task":
            if slot.truth is None or not setup.baselines.task_plans:
                continue
            task_plans = tuple(_plain(p) for p in setup.baselines.task_plans)
            groups = tuple(int(t) for t in slot.truth.tasks)
            requests.append(dataclasses.replace(base, kind=kind, plans=task_plans, groups=groups))
        else:
            requests.append(dataclasses.replace(base, kind=kind))
    return measure(requests)


def _plain(plan: Mapping[str, Any]) -> dict[str, Any]:
    return {k: np.asarray(v, dtype=np.float64).tolist() for k, v in plan.items()}


def _coeff_plans(run: PolicyRun) -> list[dict[str, Any]]:
    """A run's plans made of coefficients, as plain data (probes first)."""
    plans: list[Mapping[str, Any]] = [d.plan for d in run.probes if d.plan is not None]
    plans += [r.coeffs for r in run.records if r.coeffs is not None]
    return [_plain(p) for p in plans if all(not hasattr(v, "tensors") for v in p.values())]


def model_share(probes: Mapping[str, MemoryProbe], kind: str) -> int | None:
    """A kind's steady resident set minus the runtime's (the ``none`` process's)."""
    if kind not in probes or "none" not in probes:
        return None
    return probes[kind].rss_steady_bytes - probes["none"].rss_steady_bytes


def _main() -> int:
    data: dict[str, Any] = json.loads(sys.stdin.read())
    data["texts"] = tuple(data.get("texts", ()))
    data["plans"] = tuple(data.get("plans", ()))
    data["groups"] = tuple(data.get("groups", ()))
    probe = serve_and_measure(MemoryRequest(**data))
    print(json.dumps(asdict(probe)))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    raise SystemExit(_main())
