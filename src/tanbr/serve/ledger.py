"""A service's learning state and its durable record, shared by the single-process service
(:mod:`tanbr.serve.slots`) and the Ray controller (:mod:`tanbr.serve.ray_controller`).

What a slot boundary does with the learning state is the same whoever serves: each slot that
got feedback since the last boundary gives one reward and one policy update with its own
decision (late feedback included); a sample of the closing slot is scored against the full
MoE (the label-free shadow reward); the next slot's decision is recorded in the slot history;
and the snapshot (estimator, policy, rng, recent decisions, the feedback watermark) is written,
which commits the boundary. On restart the snapshot is loaded and what the history gained
after it is rolled back. The ledger is used by one thread at a time (the boundary thread, or
the starting one).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tanbr.backend.protocol import GenerativeBackend
from tanbr.backend.requests import Requests
from tanbr.backend.scorers import Agreement
from tanbr.experiment.loop import Decision, System, feedback
from tanbr.experiment.reward import Outcomes
from tanbr.serve.state import FeedbackRow, SlotRow, StateStore, UpdateRow

KEEP_DECISIONS = 64  # recent decisions kept in memory and in the snapshot


@dataclass(frozen=True, kw_only=True)
class Completion:
    """A finished generation: what was served, by which slot, token for token."""

    request_id: str
    slot: int
    prompt: str  # the prompt as the model saw it (a chat rendered by its template)
    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]  # every token drawn, a final stop token included
    text: str  # the continuation sent to the client (a stop sequence cut off)
    finish_reason: str
    served_nll: float  # mean -log p of output_ids under the model that served them


class SlotLedger:
    """Recent decisions, the feedback watermark and counters, and the state store they go to."""

    def __init__(self, store: StateStore, *, policy_name: str, meta: Mapping[str, Any]) -> None:
        self.store = store
        self.policy_name = policy_name
        self.meta = dict(meta)
        # decisions of older slots than the last few are read back from the slot history
        self.decisions: dict[int, Decision] = {}
        self.watermark = 0  # the last feedback the policy has learned from
        self.merges = 0
        self.updates = 0

    def pending_feedback(self) -> int:
        """Acknowledged feedback the policy has not learned from yet."""
        return max(0, self.store.last_feedback_seq() - self.watermark)

    def decision_of(
        self, slot: int, *, open_slot: int, open_latency_ms: float
    ) -> tuple[Decision, float, int]:
        """A served slot's decision, its requests' model time (ms; the open slot's so far) and
        its model's memory."""
        row = self.store.slot(slot)
        if row is None:
            raise RuntimeError(f"slot {slot} served requests but has no history entry")
        decision = self.decisions.get(slot)
        if decision is None:  # an old slot: its decision, as recorded at full precision
            decision = Decision(
                slot=slot,
                mix=np.asarray(row.mix, dtype=np.float64),
                kind=row.kind,
                action=None if row.action is None else np.asarray(row.action, dtype=np.float64),
                plan=None
                if row.plan is None
                else {k: np.asarray(v, dtype=np.float64) for k, v in row.plan.items()},
            )
        latency_ms = open_latency_ms if slot == open_slot else row.latency_ms
        return decision, latency_ms, row.memory_bytes

    def learn(
        self,
        system: System,
        rows: Sequence[FeedbackRow],
        upto: int,
        *,
        open_slot: int,
        open_latency_ms: float,
    ) -> list[UpdateRow]:
        """One reward and policy update per slot that got feedback since the last boundary."""
        by_slot: dict[int, list[FeedbackRow]] = {}
        for row in rows:
            by_slot.setdefault(row.slot, []).append(row)
        updates, now = [], time.time()
        for slot, slot_rows in sorted(by_slot.items()):
            decision, latency_ms, memory = self.decision_of(
                slot, open_slot=open_slot, open_latency_ms=open_latency_ms
            )
            reward = feedback(system, decision, feedback_outcomes(slot_rows, latency_ms, memory))
            if reward is not None:
                updates.append(UpdateRow(slot, reward, len(slot_rows), upto, now))
        return updates

    def shadow_reward(
        self,
        system: System,
        slot: int,
        texts: Sequence[str],
        labels: Sequence[int],
        *,
        size: int,
        latency_ms: float,
        memory: int,
        upto: int,
    ) -> UpdateRow | None:
        """Score a sample of ``size`` of a closed slot's served labels against the full MoE's
        (on ``system``'s model) and learn it as that slot's reward: no label involved."""
        if size <= 0 or not texts or slot not in self.decisions:
            return None
        rng = np.random.default_rng([slot, 11])
        pick = np.sort(rng.choice(len(texts), size=min(size, len(texts)), replace=False))
        requests = Requests(tuple(texts[i] for i in pick))
        served = np.asarray([labels[i] for i in pick], dtype=np.int64)
        scores = Agreement().score(system.backend, requests, served, None)
        outcomes = Outcomes(
            float(scores.sum()), len(pick), latency_ms=latency_ms, memory_bytes=memory
        )
        reward = feedback(system, self.decisions[slot], outcomes)
        return None if reward is None else UpdateRow(slot, reward, len(pick), upto, time.time())

    def unlabelled_rewards(
        self,
        system: System,
        closing: int,
        *,
        texts: Sequence[str],
        labels: Sequence[int],
        completions: Sequence[Completion],
        size: int,
        latency_ms: float,
        memory: int,
        upto: int,
    ) -> list[UpdateRow]:
        """The closing slot's label-free rewards, scored on ``system``'s full MoE: a language
        model's generations by their likelihood, a classifier's served labels against the full
        MoE's (the shadow reward)."""
        if system.backend.kind == "lm":
            return self.likelihood_rewards(
                system,
                completions,
                upto,
                size=size,
                seed=closing,
                open_slot=closing,
                open_latency_ms=latency_ms,
            )
        shadow = self.shadow_reward(
            system,
            closing,
            texts,
            labels,
            size=size,
            latency_ms=latency_ms,
            memory=memory,
            upto=upto,
        )
        return [] if shadow is None else [shadow]

    def likelihood_rewards(
        self,
        system: System,
        completions: Sequence[Completion],
        upto: int,
        *,
        size: int,
        seed: int,
        open_slot: int,
        open_latency_ms: float,
    ) -> list[UpdateRow]:
        """Score a sample of ``size`` of the generations finished since the last boundary by
        the full MoE (``system``'s model, restored to it).

        A continuation y was drawn from the merged model q; the full MoE p scores it token for
        token. Its score is exp(-max(0, d)), d = mean over its tokens of log q(y_t) - log p(y_t)
        (q's log-probabilities were kept while generating, so this costs one full-MoE pass).
        At temperature 1, d is an unbiased estimate of KL(q || p) per token: the score is 1
        when the merged model writes as the full MoE would, and falls as they part. Unlike
        exp(-NLL under p) alone, it does not reward a merge for the slot's prompts being easy.
        One reward and policy update per slot that served them, with that slot's own decision
        (label-free); a policy that does not learn skips the cost.
        """
        if size <= 0 or not completions or not system.mode.learns:
            return []
        rng = np.random.default_rng([seed, 11])
        pick = np.sort(
            rng.choice(len(completions), size=min(size, len(completions)), replace=False)
        )
        sample = [completions[i] for i in pick]
        backend = system.backend
        if not isinstance(backend, GenerativeBackend):
            raise ValueError(f"the backend {type(backend).__name__} cannot score generations")
        nll = backend.reference_nll_ids(
            [c.prompt_ids for c in sample], [c.output_ids for c in sample]
        )
        served = np.asarray([c.served_nll for c in sample], dtype=np.float64)
        scores = likelihood_scores(served, np.asarray(nll, dtype=np.float64))
        updates, now = [], time.time()
        for slot in sorted({c.slot for c in sample}):
            mine = np.asarray([c.slot == slot for c in sample])
            decision, latency_ms, memory = self.decision_of(
                slot, open_slot=open_slot, open_latency_ms=open_latency_ms
            )
            outcomes = Outcomes(
                float(scores[mine].sum()),
                int(mine.sum()),
                latency_ms=latency_ms,
                memory_bytes=memory,
            )
            reward = feedback(system, decision, outcomes)
            if reward is not None:
                updates.append(UpdateRow(slot, reward, int(mine.sum()), upto, now))
        return updates

    def open_slot(self, slot: int, decision: Decision, merge_ms: float, memory: int) -> None:
        """The slot history's row of a slot that is about to serve."""
        plan = decision.plan
        self.decisions[slot] = decision
        self.store.open_slot(
            SlotRow(
                slot=slot,
                opened=time.time(),
                kind=decision.kind,
                mix=tuple(_exact(decision.mix)),
                action=None if decision.action is None else tuple(_exact(decision.action)),
                plan=None if plan is None else {k: tuple(_exact(v)) for k, v in plan.items()},
                merge_ms=merge_ms,
                memory_bytes=int(memory),
            )
        )

    def close_slot(
        self,
        closing: int,
        *,
        reason: str,
        latency_ms: float,
        updates: Sequence[UpdateRow],
        upto: int,
    ) -> None:
        """The closing slot's history and the policy updates of this boundary (committed with
        the next snapshot)."""
        self.store.close_slot(closing, reason=reason, latency_ms=latency_ms)
        self.store.add_updates(updates)
        for old in [s for s in self.decisions if s <= closing + 1 - KEEP_DECISIONS]:
            del self.decisions[old]
        self.watermark = upto
        self.updates += len(updates)

    def save(self, slot: int, system: System) -> None:
        """Snapshot the learning state; ``slot`` is the slot that serves from now on.

        The rename of the snapshot is the commit point of a boundary: rows the slot history
        gained after the previous snapshot are rolled back on restart if this never happens.
        """
        self.store.save_snapshot(
            {
                "slot": slot,
                "watermark": self.watermark,
                "merges": self.merges,
                "updates": self.updates,
                "decisions": self.decisions,
                "estimator": system.estimator,
                "mode": system.mode,
                "reward": system.reward,
                "rng": system.rng,
                "meta": self.meta,
            }
        )

    def load(self, snapshot: Mapping[str, Any], systems: Sequence[System]) -> int:
        """The learning state from a snapshot, into every system (they share it); returns the
        slot that serves. Rolls back what the history gained after the snapshot."""
        folder = self.store.folder
        try:
            slot = int(snapshot["slot"])
            watermark = int(snapshot["watermark"])
            merges, updates = int(snapshot["merges"]), int(snapshot["updates"])
            decisions = dict(snapshot["decisions"])
            estimator, mode, rng = snapshot["estimator"], snapshot["mode"], snapshot["rng"]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"snapshot in {folder} is incomplete: {err}") from err
        if getattr(mode, "name", None) != self.policy_name:
            raise ValueError(
                f"state folder {folder} belongs to policy {getattr(mode, 'name', mode)!r}, not"
                f" {self.policy_name!r}; use another --state-dir"
            )
        if slot not in decisions:
            raise ValueError(f"snapshot in {folder} has no decision for slot {slot}")
        self.watermark, self.merges, self.updates = watermark, merges, updates
        self.decisions = decisions
        for system in systems:  # (the reward function is the configuration's, as started)
            system.estimator, system.mode, system.rng = estimator, mode, rng
        self.store.rollback(slot=slot, watermark=watermark)
        return slot


def feedback_outcomes(rows: Sequence[FeedbackRow], latency_ms: float, memory: int) -> Outcomes:
    """A slot's feedback as the loop's outcomes: label hits, or the mean of given rewards.

    When a slot got both labels and rewards, a label counts as a reward of 1 (right) or 0
    (wrong) and the reward is the mean over all of its feedback.
    """
    labelled = [r for r in rows if r.label is not None]
    hits = sum(r.label == r.predicted for r in labelled)
    given = [r.reward for r in rows if r.reward is not None]
    if not given:
        return Outcomes(hits, len(labelled), latency_ms=latency_ms, memory_bytes=memory)
    mean = (hits + sum(given)) / (len(labelled) + len(given))
    return Outcomes(
        hits,
        len(labelled),
        latency_ms=latency_ms,
        memory_bytes=memory,
        reward=min(1.0, max(0.0, mean)),
    )


def likelihood_scores(served_nll: np.ndarray, full_nll: np.ndarray) -> np.ndarray:
    """(m,) scores in (0, 1] of served continuations: exp(-max(0, full_nll - served_nll)),
    both mean NLL per token of the same tokens (under the serving model and the full MoE)."""
    gap = np.clip(np.asarray(full_nll, dtype=np.float64) - served_nll, 0.0, None)
    return np.asarray(np.exp(-gap), dtype=np.float64)


def _exact(x: Any) -> list[float]:
    return [float(v) for v in np.asarray(x, dtype=np.float64).ravel()]
