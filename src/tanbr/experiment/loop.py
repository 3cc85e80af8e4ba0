"""THE slot loop, as one visible function built from phase functions.

One slot: estimate the mix -> select an action -> plan the coeffs -> merge -> serve ->
reward -> update. :func:`run_slot` composes the phases for the offline experiment; the HTTP
service calls the same phases (:func:`decide`, :func:`apply_decision`, :func:`serve`,
:func:`observe`, :func:`feedback`) at its own pace, because there the merge is built at the slot
boundary, requests arrive one by one and labels come back late. Nothing else re-implements
the loop.

What each phase may read is the point of the design: the estimator and the policy see
:class:`~tanbr.backend.requests.Requests` (texts, no tags) and request signatures computed from
them; :class:`~tanbr.backend.requests.Truth` reaches only the simulated labelling (rewards),
the evaluation (TV distance, slot-oracle regret) and the two oracle baselines, which exist to
be upper bounds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from tanbr.backend.plans import build_ms
from tanbr.backend.protocol import Backend, LikelihoodBackend, Plan, Scorer
from tanbr.backend.requests import Requests, Slot, Truth
from tanbr.backend.scorers import LabelAccuracy, reference_nll
from tanbr.experiment.novelty import split_mix, with_new_types
from tanbr.experiment.records import SlotRecord
from tanbr.experiment.reward import Outcomes, RewardFn

log = logging.getLogger(__name__)

DECISION_KINDS = ("merge", "full", "soft", "per-task")


# --- the parts a System is made of -------------------------------------------------------------


@runtime_checkable
class TaskEstimator(Protocol):
    """Turns unlabeled request signatures into a mix over ``n_types`` task types.

    ``reads_tags`` is True only for the oracle estimator (a baseline); every other estimator
    receives ``tasks=None``.
    """

    name: str
    n_types: int
    reads_tags: bool

    def estimate(self, head: np.ndarray | None, *, tasks: np.ndarray | None = None) -> np.ndarray:
        """The mix (n_types,) for the coming slot: a forecast from history, sharpened by the
        signatures (m, d) of the slot's first requests when ``head`` is given."""
        ...

    def observe(self, signatures: np.ndarray, *, tasks: np.ndarray | None = None) -> None:
        """Add a served slot's signatures (n, d) to the history (online update)."""
        ...


@runtime_checkable
class OpensTypes(Protocol):
    """An estimator that can open task types online (``estimator.novelty``): the policy's
    context stays the ``n_types`` known types, and the ``n_new`` opened ones are served by
    their profiles, learnt from a budgeted full-MoE gate pass (docs/experiment.md)."""

    n_new: int
    full_pass_ms: float  # charged per request of a profile's gate pass

    def assign(self, signatures: np.ndarray) -> np.ndarray: ...

    def profile_wants(self, signatures: np.ndarray) -> np.ndarray: ...

    def learn_profiles(self, signatures: np.ndarray, gates: Mapping[str, np.ndarray]) -> None: ...

    def new_profiles(self) -> list[dict[str, np.ndarray] | None]: ...


@dataclass(frozen=True, eq=False)
class Choice:
    """A mode's answer for one slot (see :class:`Decision`)."""

    kind: str
    action: np.ndarray | None = None
    plan: Plan | None = None
    task_plans: tuple[Plan, ...] = ()


@runtime_checkable
class Mode(Protocol):
    """How a policy name is served: a bandit policy plus a parameterization, or a baseline.

    ``learns`` modes receive rewards through :meth:`learn`; ``needs_truth`` modes (the oracle
    baselines only) receive the slot's :class:`Truth` in :meth:`choose`; ``reads_mix`` modes
    decide from the estimated mix, so the estimator's cost is part of their served path.
    """

    name: str
    learns: bool
    needs_truth: bool
    reads_mix: bool

    def choose(self, mix: np.ndarray, *, truth: Truth | None = None) -> Choice: ...

    def learn(
        self,
        mix: np.ndarray,
        action: np.ndarray,
        reward: float,
        *,
        type_rewards: np.ndarray | None = None,
    ) -> None: ...


@dataclass(frozen=True)
class Labelling:
    """How labels come back in the offline loop: a sampled fraction, ``delay`` slots later."""

    fraction: float = 1.0
    delay: int = 0
    probe: int = 16  # requests scored against the full MoE when the reward kind is "proxy"
    sample: int = 0  # offline evaluation budget: serve only a slot's last `sample` requests

    def __post_init__(self) -> None:
        if self.sample < 0:
            raise ValueError(f"labelling.sample must be >= 0 (0: all), got {self.sample}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"labelling.fraction must be in (0, 1], got {self.fraction}")
        if self.delay < 0:
            raise ValueError(f"labelling.delay must be >= 0, got {self.delay}")
        if self.probe < 1:
            raise ValueError(f"labelling.probe must be >= 1, got {self.probe}")


@dataclass(eq=False)
class System:
    """Everything one served policy needs across slots (the service pickles its parts).

    ``head`` is how many of the current slot's requests the estimator may read before the
    merge is chosen (0: forecast from history only, as a live service does at a slot boundary).
    """

    backend: Backend
    estimator: TaskEstimator
    mode: Mode
    reward: RewardFn = field(default_factory=RewardFn)
    scorer: Scorer = field(default_factory=LabelAccuracy)
    metric: Scorer = field(default_factory=LabelAccuracy)  # the evaluation's "accuracy"
    labelling: Labelling = field(default_factory=Labelling)
    head: int = 0
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    pending: list[tuple[int, Decision, Outcomes]] = field(default_factory=list)
    applied: Decision | None = None

    def __post_init__(self) -> None:
        if self.head < 0:
            raise ValueError(f"head must be >= 0, got {self.head}")


# --- values passed between phases --------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Decision:
    """The choice for one slot: the estimated mix (the policy's context), the policy's action,
    and how the slot is served: ``merge`` with ``plan``, ``full`` MoE, ``soft`` (SMEAR), or
    ``per-task`` merges (task-tag oracle). ``new_mass`` is the estimated share of task types
    opened online (the context is then the known types' mix, renormalised)."""

    slot: int
    mix: np.ndarray  # (K,)
    kind: str
    action: np.ndarray | None = None
    plan: Plan | None = None
    task_plans: tuple[Plan, ...] = ()
    select_ms: float = 0.0
    estimate_ms: float = 0.0  # the estimator's estimate (its signatures are counted apart)
    new_mass: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in DECISION_KINDS:
            raise ValueError(f"decision kind must be one of {DECISION_KINDS}, got {self.kind!r}")
        if self.kind == "merge" and self.plan is None:
            raise ValueError("a 'merge' decision needs a plan")


@dataclass(frozen=True, eq=False)
class Served:
    """A served batch: class probabilities, predicted labels, and costs."""

    probs: np.ndarray  # (n, n_labels); (n, 0) for a language model
    predictions: np.ndarray  # (n,) int64: labels, or a language model's next-token ids
    latency_ms: float  # MoE layers + head for the whole batch
    merge_ms: float = 0.0  # merges done while serving (per-task mode, deferred merges)
    metric: np.ndarray | None = None  # (n,) the evaluation metric's scores, given the truth
    nll: np.ndarray | None = None  # (n,) a language model's loss on the true continuations


# --- the phases ---------------------------------------------------------------------------------


def reference_loss(backend: Backend, requests: Requests, truth: Truth | None) -> np.ndarray | None:
    """(n,) each request's mean NLL per token of its true continuation under the model as set,
    for a language model whose truth carries continuations (offline evaluation: the loss the
    summary reports beside the metric); None otherwise. With the backend's memo on, a
    likelihood metric has already computed it: this is a look-up."""
    return reference_nll(backend, requests, truth) if _has_loss(backend, truth) else None


def _has_loss(backend: Backend, truth: Truth | None) -> bool:
    return (
        truth is not None and truth.targets is not None and isinstance(backend, LikelihoodBackend)
    )


def decide(
    system: System,
    requests: Requests | None = None,
    *,
    slot: int,
    truth: Truth | None = None,
) -> Decision:
    """Phases 1-3: estimate the mix, select an action, plan the coeffs.

    ``requests`` are the slot's requests known at decision time (at most ``system.head`` of
    them are read); ``truth`` is passed on only to oracle estimators and oracle modes.
    """
    head_sig = None
    tasks = None
    if requests is not None and system.head > 0 and len(requests) > 0:
        n = min(system.head, len(requests))
        head_sig = system.backend.signatures(requests.take(slice(0, n)))  # (n, d)
        if system.estimator.reads_tags:
            if truth is None:
                raise ValueError(f"estimator {system.estimator.name!r} reads tags: pass truth")
            tasks = np.asarray(truth.tasks[:n], dtype=np.int64)
    t0 = time.perf_counter()
    full = system.estimator.estimate(head_sig, tasks=tasks)
    mix, new_mass = split_mix(full, system.estimator.n_types)
    estimate_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    if system.mode.needs_truth and truth is None:
        raise ValueError(f"mode {system.mode.name!r} is an oracle: it needs the slot's truth")
    choice = system.mode.choose(mix, truth=truth if system.mode.needs_truth else None)
    plan = choice.plan
    if new_mass.sum() > 0 and system.mode.reads_mix and plan is not None:
        plan = _with_new_types(system.estimator, plan, new_mass)
    # merged weights solved for this action (task-aware RegMean) are charged to the merge
    # that installs them (as a coeffs merge's average is), not to the selection
    solve_ms = build_ms(plan) if plan is not None else 0.0
    select_ms = max(0.0, (time.perf_counter() - t0) * 1e3 - solve_ms)
    return Decision(
        slot=slot,
        mix=mix,
        kind=choice.kind,
        action=choice.action,
        plan=plan,
        task_plans=choice.task_plans,
        select_ms=select_ms,
        estimate_ms=estimate_ms,
        new_mass=tuple(float(m) for m in new_mass),
    )


def _with_new_types(estimator: TaskEstimator, plan: Plan, new_mass: np.ndarray) -> Plan:
    """Task types opened online are served by their profiles in proportion to their mass
    (plans of plain coefficients; a grouped plan is served as the policy chose it)."""
    coeffs = {name: c for name, c in plan.items() if isinstance(c, np.ndarray)}
    if not isinstance(estimator, OpensTypes) or len(coeffs) != len(plan):
        return plan
    return with_new_types(coeffs, new_mass, estimator.new_profiles())


def apply_decision(system: System, decision: Decision) -> float:
    """Phase 4: set the model up as the decision says; returns the merge time in ms.

    ``per-task`` decisions merge per group while serving, so nothing happens here.
    """
    backend = system.backend
    if decision.kind == "merge":
        assert decision.plan is not None
        merge_ms = backend.merge(decision.plan)
    elif decision.kind == "soft":
        merge_ms = backend.merge_soft()
    elif decision.kind == "full":
        merge_ms = backend.restore()
    else:
        merge_ms = 0.0
    system.applied = decision
    return merge_ms


def serve(
    system: System,
    requests: Requests,
    *,
    decision: Decision | None = None,
    truth: Truth | None = None,
) -> Served:
    """Phase 5: predict with the model as applied.

    For a ``per-task`` decision (the task-tag oracle) each task's requests are served by that
    task's merge, which needs ``truth``.
    """
    decision = decision if decision is not None else system.applied
    backend = system.backend
    metric = system.metric
    if decision is not None and decision.kind == "per-task":
        if truth is None:
            raise ValueError("per-task serving reads task tags: pass truth")
        probs = np.zeros((len(requests), backend.n_labels), dtype=np.float32)
        predictions = np.zeros(len(requests), dtype=np.int64)
        scores = np.zeros(len(requests))
        nll = np.zeros(len(requests)) if _has_loss(backend, truth) else None
        latency = merge_ms = 0.0
        tasks = np.asarray(truth.tasks, dtype=np.int64)
        for k in np.unique(tasks):
            idx = np.flatnonzero(tasks == k)
            part_requests = requests.take(idx)
            merge_ms += backend.merge(decision.task_plans[int(k)])
            part = backend.predict(part_requests)
            probs[idx] = part.probs
            predictions[idx] = part.predictions
            # scored under this task's merge, while it is the one applied
            scores[idx] = metric.score(backend, part_requests, part.predictions, truth.take(idx))
            part_nll = reference_loss(backend, part_requests, truth.take(idx))
            if nll is not None and part_nll is not None:
                nll[idx] = part_nll
            latency += part.latency_ms
            merge_ms += part.merge_ms
        return Served(probs, predictions, latency, merge_ms, scores, nll)
    pred = backend.predict(requests)
    predictions = np.asarray(pred.predictions, dtype=np.int64)
    graded = None if truth is None else metric.score(backend, requests, predictions, truth)
    return Served(
        np.asarray(pred.probs),
        predictions,
        pred.latency_ms,
        pred.merge_ms,
        graded,
        reference_loss(backend, requests, truth),
    )


def observe(
    system: System,
    requests: Requests,
    *,
    truth: Truth | None = None,
    signatures: np.ndarray | None = None,
) -> float:
    """After serving: the slot's unlabeled requests join the estimator's history.

    ``signatures`` (n, d): the requests' signatures when the process that served them sent
    them along (a serving replica), instead of computing them here. An estimator that has
    opened task types online asks for the full-MoE gate probabilities of a few of their
    requests (their profiles); returns what that pass is charged, in ms."""
    if len(requests) == 0:
        return 0.0
    tasks = None
    if system.estimator.reads_tags:
        if truth is None:
            raise ValueError(f"estimator {system.estimator.name!r} reads tags: pass truth")
        tasks = np.asarray(truth.tasks, dtype=np.int64)
    if signatures is None:
        signatures = system.backend.signatures(requests)
    elif signatures.shape[0] != len(requests) or not np.all(np.isfinite(signatures)):
        raise ValueError(
            f"signatures: expected {len(requests)} finite rows, got shape {signatures.shape}"
        )
    system.estimator.observe(signatures, tasks=tasks)
    estimator = system.estimator
    if not isinstance(estimator, OpensTypes):
        return 0.0
    idx = estimator.profile_wants(signatures)
    if not len(idx):
        return 0.0
    gates = system.backend.gate_probs(requests.take(idx))  # budgeted full-MoE pass
    estimator.learn_profiles(signatures[idx], gates)
    return float(len(idx) * estimator.full_pass_ms)


def feedback(system: System, decision: Decision, outcomes: Outcomes) -> float | None:
    """Phases 6-7: turn outcomes into a reward and update the policy with
    (context = decision.mix, decision.action, reward). Works for late feedback: the policy
    finds what to update from the arguments. Returns the reward (None if nothing to score)."""
    reward = system.reward(outcomes)
    if reward is not None and system.mode.learns and decision.action is not None:
        types = None if outcomes.type_rewards is None else np.asarray(outcomes.type_rewards)
        system.mode.learn(decision.mix, decision.action, reward, type_rewards=types)
    return reward


def score(
    system: System,
    requests: Requests,
    served: Served,
    truth: Truth | None,
    *,
    latency_ms: float,
) -> Outcomes:
    """Simulated feedback: which served requests come back scored, and their scores.

    A scorer that reads the truth (labels) scores a ``labelling.fraction`` sample of the
    requests; a label-free one (agreement with the full MoE) scores ``labelling.probe`` of
    them, since each costs a full-MoE pass.
    """
    n = len(requests)
    memory = system.backend.memory_bytes()
    scorer = system.scorer
    if scorer.needs_truth:
        if truth is None:
            raise ValueError(f"the {scorer.name!r} reward reads the requests' truth: pass it")
        m = max(1, round(system.labelling.fraction * n)) if n else 0
    else:
        m = min(n, system.labelling.probe)
    idx = np.sort(system.rng.choice(n, size=m, replace=False)) if m < n else np.arange(n)
    scored = requests.take(idx)
    scored_truth = truth.take(idx) if truth is not None else None
    scores = scorer.score(system.backend, scored, served.predictions[idx], scored_truth)
    hits = float(np.sum(scores))
    by_type = type_means(system, scored, scores, scored_truth)
    return Outcomes(
        hits, int(idx.size), latency_ms=latency_ms, memory_bytes=memory, type_rewards=by_type
    )


def type_means(
    system: System, requests: Requests, scores: np.ndarray, truth: Truth | None
) -> tuple[float, ...] | None:
    """The mean score of the scored requests of each task type (NaN where none), the types
    given by the estimator from their signatures (no tag; the oracle estimator reads them)."""
    if len(requests) == 0:
        return None
    estimator = system.estimator
    if estimator.reads_tags:
        if truth is None:
            return None
        types = np.asarray(truth.tasks, dtype=np.int64)
    else:
        assign = getattr(estimator, "assign", None)
        if assign is None:
            return None
        types = np.asarray(assign(system.backend.signatures(requests)), dtype=np.int64)
    k = estimator.n_types
    sums = np.bincount(types, weights=np.asarray(scores, dtype=np.float64), minlength=k)
    counts = np.bincount(types, minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return tuple(float(v) for v in means[:k])


# --- the loop -----------------------------------------------------------------------------------


class Evaluator(Protocol):
    """Offline yardsticks that read the truth (never shown to the system). Regret is not one
    of them: it compares accuracies on the very requests a slot scored, so it is joined after
    the runs (:func:`tanbr.experiment.runner.attach_regret`)."""

    def tasks_mix(self, est_mix: np.ndarray) -> np.ndarray:
        """The estimated mix over task types mapped onto the true tasks (Hungarian matching)."""
        ...


def run_slot(
    system: System, slot: Slot, *, evaluator: Evaluator | None = None, seed: int = 0
) -> SlotRecord:
    """One slot: estimate -> select -> plan -> merge -> serve -> reward -> update.

    Feedback is delivered ``labelling.delay`` slots late (queued in ``system.pending``). With
    ``labelling.sample`` set, the estimator still reads the whole slot but only the slot's last
    ``sample`` requests (arrival order is random; disjoint from the head the estimator reads
    while they fit in the slot) are run through the model and scored: an offline evaluation
    budget, the same requests for every policy.
    """
    truth = slot.truth
    # 1-3. estimate, select, plan
    decision = decide(system, slot.requests, slot=slot.index, truth=truth)
    # 4. merge
    merge_ms = apply_decision(system, decision)
    # 5. serve
    requests, served_truth = slot.requests, truth
    if 0 < system.labelling.sample < len(requests):
        tail = slice(len(requests) - system.labelling.sample, len(requests))
        requests = requests.take(tail)
        served_truth = truth.take(tail) if truth is not None else None
    served = serve(system, requests, decision=decision, truth=served_truth)
    merge_ms += served.merge_ms
    profile_ms = observe(system, slot.requests, truth=truth)
    estimator = system.estimator
    if isinstance(estimator, OpensTypes) and estimator.n_new and truth is not None:
        count = getattr(evaluator, "count_new", None)  # what the opened types stand for
        if count is not None:
            types = estimator.assign(system.backend.signatures(slot.requests))
            count(types, truth.tasks, estimator.n_types)
    memory = system.backend.memory_bytes()
    # 6-7. reward and update (possibly late)
    reward = None
    n_scored = 0
    update_ms = 0.0
    if served_truth is not None or not system.scorer.needs_truth:
        outcomes = score(system, requests, served, served_truth, latency_ms=served.latency_ms)
        reward = system.reward(outcomes)
        n_scored = outcomes.n_scored
        system.pending.append((slot.index + system.labelling.delay, decision, outcomes))
        t0 = time.perf_counter()
        flush_feedback(system, now=slot.index)
        update_ms = (time.perf_counter() - t0) * 1e3
    return _record(
        system, slot, decision, served, evaluator, seed=seed, merge_ms=merge_ms,
        memory=memory, reward=reward, n_scored=n_scored, update_ms=update_ms,
        served_truth=served_truth, profile_ms=profile_ms,
    )  # fmt: skip


def flush_feedback(system: System, *, now: int | None = None) -> int:
    """Deliver the queued feedback that is due at slot ``now`` (all of it if ``now`` is None);
    returns how many slots' feedback was delivered."""
    due = [p for p in system.pending if now is None or p[0] <= now]
    system.pending = [p for p in system.pending if not (now is None or p[0] <= now)]
    for _, decision, outcomes in due:
        feedback(system, decision, outcomes)
    return len(due)


def _record(
    system: System,
    slot: Slot,
    decision: Decision,
    served: Served,
    evaluator: Evaluator | None,
    *,
    seed: int,
    merge_ms: float,
    memory: int,
    reward: float | None,
    n_scored: int,
    update_ms: float,
    served_truth: Truth | None,
    profile_ms: float = 0.0,
) -> SlotRecord:
    truth = slot.truth
    full_mix = np.asarray(decision.mix, dtype=float)
    if decision.new_mass:  # the whole estimate: the known types' share, then the opened ones
        new = np.asarray(decision.new_mass)
        full_mix = np.concatenate([(1.0 - new.sum()) * full_mix, new])
    accuracy = tv = loss = None
    est_tasks = true_mix = task_loss = task_n = None
    if truth is not None and served_truth is not None:
        true_mix = truth.mix.tolist()
        if len(served_truth.tasks) and served.metric is not None:
            accuracy = float(np.mean(served.metric))
        if len(served_truth.tasks) and served.nll is not None:
            loss, task_loss, task_n = _losses(served.nll, served_truth)
        if evaluator is not None:
            mapped = evaluator.tasks_mix(full_mix)
            est_tasks = mapped.tolist()
            tv = float(0.5 * np.abs(mapped - truth.mix).sum())
    coeffs = None
    if decision.plan is not None and all(
        isinstance(c, np.ndarray) for c in decision.plan.values()
    ):  # merged weights (a static merge) have no coefficients to record
        coeffs = {
            name: np.asarray(c, dtype=float).round(5).tolist() for name, c in decision.plan.items()
        }
    return SlotRecord(
        policy=system.mode.name,
        seed=seed,
        slot=slot.index,
        n_requests=len(slot.requests),
        n_served=len(served.predictions),
        kind=decision.kind,
        est_mix=full_mix.round(5).tolist(),
        action=None if decision.action is None else np.asarray(decision.action).round(5).tolist(),
        coeffs=coeffs,
        true_mix=true_mix,
        est_mix_tasks=est_tasks,
        tv=tv,
        accuracy=accuracy,
        loss=loss,
        task_loss=task_loss,
        task_n=task_n,
        reward=reward,
        n_scored=n_scored,
        latency_ms=served.latency_ms,
        merge_ms=merge_ms,
        memory_bytes=memory,
        select_ms=decision.select_ms,
        estimate_ms=decision.estimate_ms,
        update_ms=update_ms,
        profile_ms=profile_ms,
    )


def _losses(nll: np.ndarray, truth: Truth) -> tuple[float, list[float | None], list[int]]:
    """The mean loss of a slot's scored requests, and per task its mean (None where the slot
    scored none of its requests) and how many it scored."""
    tasks = np.asarray(truth.tasks, dtype=np.int64)
    n = np.bincount(tasks, minlength=len(truth.task_names))
    sums = np.bincount(tasks, weights=np.asarray(nll, dtype=np.float64), minlength=len(n))
    per_task = [float(s / c) if c else None for s, c in zip(sums, n, strict=True)]
    return float(np.mean(nll)), per_task, [int(c) for c in n]
