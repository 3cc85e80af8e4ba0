"""What every backend does with a plan: check it, tell two plans apart, key its predictions,
and keep the model computing what it was asked (:class:`ServedState`).

A block's plan value is coefficients ((E,), or (m, E) for m merged experts) or merged weights
(:class:`~tanbr.model.MergedWeights`, from RegMean or Fisher-weighted averaging). Backends keep
the plan they serve to skip a merge that would change nothing, and key their memo of
predictions by it.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tanbr.model import MergedWeights, Merger, MoEBlock, validate_merge_plan

PlanValue = np.ndarray | MergedWeights
CheckedPlan = dict[str, PlanValue]


def checked_plan(plan: Mapping[str, Any], blocks: Sequence[MoEBlock]) -> CheckedPlan:
    """The plan validated against the model's blocks; coefficients as float64 arrays."""
    out: CheckedPlan = {}
    for name, value in validate_merge_plan(plan, blocks).items():
        out[name] = value if isinstance(value, MergedWeights) else np.asarray(value, np.float64)
    return out


def same_plan(a: Mapping[str, PlanValue], b: Mapping[str, Any]) -> bool:
    """Whether two plans merge the same (merged weights: the same object)."""
    if a.keys() != b.keys():
        return False
    for name, value in a.items():
        other = b[name]
        if isinstance(value, MergedWeights) or isinstance(other, MergedWeights):
            if value is not other:
                return False
        elif not np.array_equal(value, np.asarray(other)):
            return False
    return True


def plan_key(plan: Mapping[str, PlanValue]) -> bytes:
    """Bytes that identify what a plan computes (a memo key)."""
    parts = []
    for name in sorted(plan):
        value = plan[name]
        parts.append(weights_digest(value) if isinstance(value, MergedWeights) else value.tobytes())
    return b"merged" + b"".join(parts)


def weights_digest(value: MergedWeights) -> bytes:
    """sha256 of merged weights' method and tensors (cached on the value: it is frozen), or of
    their method and ``key`` when their maker gave one (no need to hash megabytes)."""
    cached = getattr(value, "_digest", None)
    if isinstance(cached, bytes):
        return cached
    if value.key:
        digest = hashlib.sha256(value.method.encode() + b"\0key\0" + value.key).digest()
        object.__setattr__(value, "_digest", digest)
        return digest
    h = hashlib.sha256(value.method.encode())
    for target in sorted(value.tensors):
        tensor = torch.as_tensor(value.tensors[target]).detach().float().contiguous()
        h.update(target.encode())
        h.update(tensor.numpy().tobytes())
    digest = h.digest()
    object.__setattr__(value, "_digest", digest)
    return digest


def build_ms(plan: Mapping[str, Any]) -> float:
    """Milliseconds spent computing a plan's merged weights per decision (0 for coeffs and
    static merges): part of the cost of the merge that installs them."""
    return float(sum(v.build_ms for v in plan.values() if isinstance(v, MergedWeights)))


def merged_experts(value: PlanValue) -> int:
    """How many merged experts a block's plan value keeps resident."""
    return 1 if isinstance(value, MergedWeights) else int(np.atleast_2d(value).shape[0])


class ServedState:
    """What a backend's model is asked to compute (full MoE, soft merging, or a plan) and
    what it computes now, and the parameter bytes each needs resident.

    A backend asks (``want_*``) and the merge happens at :meth:`sync`, which a backend with a
    memo of predictions defers until a forward pass needs the model: a slot whose predictions
    are all remembered needs no merge. A plan already served is not merged again.
    """

    def __init__(self, merger: Merger, model: torch.nn.Module) -> None:
        self.merger = merger
        # a memory-lean model computes the full MoE streamed until asked for more: a pass on
        # the full MoE put back afterwards (full_moe) then reads no expert to keep
        self.target: tuple[str, CheckedPlan | None] = ("full", None)
        self.want_full(streamed=True)
        self.applied: CheckedPlan | None = None
        experts = sum(b.expert_bytes * b.n_experts for b in merger.blocks)
        tensors = [*model.parameters(), *model.buffers()]
        self.shared_bytes = int(sum(t.numel() * t.element_size() for t in tensors) - experts)
        self.all_experts_bytes = int(experts)

    def want_merge(self, plan: Mapping[str, Any]) -> None:
        self.target = ("merged", checked_plan(plan, self.merger.blocks))

    def want_soft(self) -> None:
        self.target = ("soft", None)

    def want_full(self, *, streamed: bool = False) -> None:
        """The full MoE; ``streamed``: a memory-lean model reads each block's experts as the
        block runs and drops them after (:meth:`~tanbr.model.merge.Merger.restore`)."""
        self.target = ("streamed" if streamed and self.merger.lean else "full", None)

    def originals(self, *, experts: bool) -> None:
        """Put the original blocks back, as a backend is copied: with ``experts`` every
        expert in memory (then shared by the copy); without, a memory-lean model keeps none,
        not even those read before (:meth:`sync` would use them), and each copy reads what
        its merges need."""
        self.want_full(streamed=not experts)
        if self.target[0] == "streamed":
            self.merger.unload()  # (the next sync streams, with this copy's own hooks)
            self.applied = None
        else:
            self.sync()

    def sync(self) -> float:
        """Make the model compute what was asked; returns the milliseconds spent. Merges are
        built outside inference mode, so that a later merge can rewrite them in place. A
        merge of weights computed per decision is charged the time that computation took
        (:attr:`MergedWeights.build_ms`: task-aware RegMean's solve), as a coeffs merge is
        charged its weighted average."""
        mode, plan = self.target
        merger = self.merger
        with torch.inference_mode(False):
            if mode == "merged" and plan is not None:
                if merger.merged and self.applied is not None and same_plan(self.applied, plan):
                    return 0.0  # the same merge is already being served
                stats = merger.apply(plan)
                self.applied = plan
                return float(stats.merge_ms) + build_ms(plan)
            if (
                mode == "streamed"
                and merger.mode == "full"
                and (merger.streaming or merger.experts_resident)  # (the same numbers)
            ):
                return 0.0
            if merger.mode == mode and not (mode == "full" and merger.lean):
                return 0.0  # (a lean model may not have read its experts yet: restore does)
            t0 = time.perf_counter()
            if mode == "soft":
                merger.apply_soft()
            else:
                merger.restore(streamed=mode == "streamed")
            self.applied = None
            return (time.perf_counter() - t0) * 1e3

    def idle(self) -> None:
        """Nothing runs on this model for a while: a memory-lean model asked for a plan drops
        its merged experts (the originals stay on disk), and the next :meth:`sync` builds the
        plan again. The full MoE and soft merging keep their experts (another replica may share
        them), and a model in memory keeps everything."""
        mode, _ = self.target
        if not self.merger.lean or mode != "merged" or self.merger.streaming:
            return
        self.merger.restore(streamed=True)
        self.applied = None

    def key(self) -> bytes:
        """What the model is asked to compute, as bytes (the memo's key)."""
        mode, plan = self.target
        if plan is None:
            return b"full" if mode == "streamed" else mode.encode()  # the same numbers
        return plan_key(plan)

    def param_bytes(self) -> int:
        """Parameter bytes the model as asked needs resident: everything but the routed
        experts, and the plan's merged experts (the originals stay on disk in memory-lean
        serving); every expert for the full MoE and soft merging."""
        mode, plan = self.target
        if mode == "merged" and plan is not None:
            merged = sum(merged_experts(plan[b.name]) * b.expert_bytes for b in self.merger.blocks)
            return int(self.shared_bytes + merged)
        if mode == "streamed":  # one block's experts at a time
            blocks = self.merger.blocks
            return self.shared_bytes + max(
                (b.expert_bytes * b.n_experts for b in blocks), default=0
            )
        return self.shared_bytes + self.all_experts_bytes

    @contextlib.contextmanager
    def full_moe(self, *, sync_after: bool, streamed: bool = False) -> Iterator[None]:
        """Run a block on the full MoE, then ask for what was asked before (and merge it back
        now unless ``sync_after`` is False: a memo defers it). ``streamed``: forward passes
        only, and a memory-lean model reads each block's experts as it runs (see
        :meth:`want_full`); experts already in memory are used as they are."""
        target = self.target
        self.want_full(streamed=streamed)
        self.sync()
        try:
            yield
        finally:
            self.target = target
            if sync_after:
                self.sync()
