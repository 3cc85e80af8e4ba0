"""No policy and no label-free estimator ever sees a task tag.

The proof is behavioural: the same requests with scrambled truth (tasks and labels permuted)
must leave everything the estimator and the policy receive unchanged, and with the label-free
proxy reward the whole trajectory of contexts and actions is identical.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from tanbr.backend.requests import Pool, Requests, Slot, Truth
from tanbr.experiment.config import load_config
from tanbr.experiment.loop import run_slot
from tanbr.experiment.runner import build_system, make_slots
from tanbr.experiment.setup import prepare

from .conftest import FakeBackend

Fake = tuple[FakeBackend, Pool, Pool]


def scramble(slot: Slot, rng: np.random.Generator) -> Slot:
    assert slot.truth is not None
    perm = rng.permutation(len(slot.requests))
    truth = Truth(
        tuple(slot.truth.tasks[i] for i in perm), slot.truth.labels[perm], slot.truth.task_names
    )
    return Slot(slot.index, slot.requests, truth)


class Spy:
    """Wraps an object and records every argument its methods receive."""

    def __init__(self, inner: Any, log: list[tuple[str, Any]], methods: tuple[str, ...]) -> None:
        self._inner = inner
        for name in methods:
            setattr(self, name, self._wrap(name, log))

    def _wrap(self, name: str, log: list[tuple[str, Any]]) -> Any:
        method = getattr(self._inner, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            log.append(
                (
                    name,
                    [np.array(a, copy=True) if isinstance(a, np.ndarray) else a for a in args],
                    dict(kwargs),
                )
            )
            return method(*args, **kwargs)

        return call

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def trajectory(fake: Fake, reward: str, scrambled: bool, policy: str = "tanbr") -> list[Any]:
    backend, calib, test = fake
    cfg = load_config(
        overrides=[
            "n_slots=20", "workload.slot_size=32", "estimator.n_types=4", "estimator.head=16",
            "oracle.n_candidates=4", f"reward.kind='{reward}'",
        ]
    )  # fmt: skip
    setup = prepare(cfg, backend, calib, test)
    system = build_system(setup, policy, 0)
    log: list[Any] = []
    system.estimator = Spy(system.estimator, log, ("estimate", "observe"))  # type: ignore[assignment]
    system.mode.policy = Spy(system.mode.policy, log, ("select", "update"))  # type: ignore[attr-defined]
    rng = np.random.default_rng(9)
    for slot in make_slots(setup, 0):
        run_slot(system, scramble(slot, rng) if scrambled else slot)
    return log


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        floats = np.asarray(a).dtype.kind == "f"  # per-type rewards hold NaN for absent types
        return bool(np.array_equal(a, b, equal_nan=floats))
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def test_requests_carry_no_tag() -> None:
    assert [f.name for f in dataclasses.fields(Requests)] == ["texts", "rows"]


def test_label_free_trajectory_ignores_truth(fake: Fake) -> None:
    clean = trajectory(fake, "proxy", scrambled=False)
    mixed = trajectory(fake, "proxy", scrambled=True)
    assert len(clean) == len(mixed) > 40
    assert _same(clean, mixed)  # contexts, actions, rewards: all independent of the tags
    for _, _, kwargs in clean:
        assert kwargs.get("tasks") is None


def test_estimator_inputs_ignore_truth_with_label_feedback(fake: Fake) -> None:
    clean = [
        e for e in trajectory(fake, "accuracy", scrambled=False) if e[0] in ("estimate", "observe")
    ]
    mixed = [
        e for e in trajectory(fake, "accuracy", scrambled=True) if e[0] in ("estimate", "observe")
    ]
    assert _same(clean, mixed)


def test_policy_context_is_the_estimated_mix(fake: Fake) -> None:
    log = trajectory(fake, "accuracy", scrambled=False)
    selects = [args[0] for name, args, _ in log if name == "select"]
    assert len(selects) == 20
    for context in selects:
        assert context.shape == (4,)
        np.testing.assert_allclose(context.sum(), 1.0)
