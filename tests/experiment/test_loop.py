from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tanbr.backend.requests import Pool
from tanbr.experiment.config import load_config
from tanbr.experiment.loop import (
    Labelling,
    System,
    apply_decision,
    decide,
    feedback,
    flush_feedback,
    run_slot,
    serve,
)
from tanbr.experiment.records import read_trace
from tanbr.experiment.reward import Outcomes, RewardFn
from tanbr.experiment.runner import build_system, execute, make_slots, run_policy
from tanbr.experiment.setup import prepare

from .conftest import TASKS, FakeBackend

Fake = tuple[FakeBackend, Pool, Pool]


def small_config(**over: Any) -> Any:
    sets = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in over.items()]
    base = [
        "n_slots=30",
        "seeds=[0]",
        "workload.slot_size=32",
        "workload.period=6",
        "estimator.n_types=4",
        "estimator.head=16",
        "oracle.n_candidates=8",
        "latency.batches=2",
        "latency.batch_size=8",
    ]
    return load_config(overrides=base + sets)


def test_prepare_builds_estimator_profiles_and_oracle(fake: Fake) -> None:
    backend, calib, test = fake
    setup = prepare(small_config(), backend, calib, test)
    assert sorted(setup.mapping.tolist()) == [0, 1, 2, 3]  # clusters recovered the tasks
    assert setup.dim == 4
    oracle = setup.baselines.oracle
    assert oracle is not None
    # a vertex of the task simplex is its task's best merge in this world
    for k in range(4):
        c, _ = oracle.best(np.eye(4)[k])
        assert setup.mapping[int(np.argmax(oracle.actions[c]))] == k
    assert len(setup.baselines.task_plans) == 4


def test_run_slot_phases_and_record(fake: Fake) -> None:
    backend, calib, test = fake
    setup = prepare(small_config(), backend, calib, test)
    slots = make_slots(setup, 0)
    system = build_system(setup, "tanbr", 0)
    from tanbr.experiment.values import SlotEvaluator

    evaluator = SlotEvaluator(setup.mapping, 4)
    record = run_slot(system, slots[0], evaluator=evaluator)
    assert record.policy == "tanbr" and record.kind == "merge"
    assert record.n_requests == 32 and record.n_scored == 32
    assert record.accuracy is not None and 0 <= record.accuracy <= 1
    assert record.regret is None  # joined after the runs, on the same requests
    assert record.tv is not None and record.tv < 0.2
    assert record.coeffs is not None and set(record.coeffs) == set(backend.blocks)
    np.testing.assert_allclose(sum(record.est_mix), 1.0)


def test_tanbr_learns_in_the_loop(fake: Fake) -> None:
    """Over a drifting stream, Tanbr learns: well above uniform and random after a while."""
    backend, calib, test = fake
    cfg = small_config(**{"n_slots": 150, "workload.slot_size": 64, "workload.period": 20})
    setup = prepare(cfg, backend, calib, test)
    slots = make_slots(setup, 0)
    acc = {}
    for name in ("tanbr", "uniform", "random", "slot-oracle"):
        run = run_policy(setup, name, 0, slots)
        acc[name] = float(np.mean([r.accuracy for r in run.records[50:]]))
    assert acc["tanbr"] > acc["uniform"] + 0.05
    assert acc["tanbr"] > acc["random"] + 0.05
    assert acc["slot-oracle"] > acc["tanbr"]  # the yardstick stays above


def test_delayed_and_partial_labels(fake: Fake) -> None:
    backend, calib, test = fake
    cfg = small_config(**{"reward.label_fraction": 0.25, "reward.delay": 3})
    setup = prepare(cfg, backend, calib, test)
    system = build_system(setup, "tanbr", 0)
    updates: list[tuple[float, ...]] = []
    learn = system.mode.learn
    system.mode.learn = lambda m, a, r, **kw: (updates.append(tuple(a)), learn(m, a, r, **kw))  # type: ignore[method-assign]
    records = [run_slot(system, s) for s in make_slots(setup, 0)[:10]]
    assert all(r.n_scored == 8 for r in records)  # 25% of 32
    assert len(updates) == 10 - 3  # slots 0..6 delivered by slot 9
    assert len(system.pending) == 3
    assert flush_feedback(system) == 3 and not system.pending
    np.testing.assert_allclose(updates[0], records[0].action, atol=1e-5)  # type: ignore[arg-type]


def test_phases_as_the_service_calls_them(fake: Fake) -> None:
    """Decide at a slot boundary from history only, serve live texts, feedback arrives late."""
    backend, calib, test = fake
    setup = prepare(small_config(), backend, calib, test)
    system = build_system(setup, "tanbr", 0)
    system.head = 0
    first = decide(system, slot=0)
    np.testing.assert_allclose(first.mix, np.full(4, 0.25))  # nothing seen yet
    apply_decision(system, first)
    served = serve(system, test.slot(0, np.arange(5)).requests)
    assert served.probs.shape == (5, 8) and served.predictions.shape == (5,)
    second = decide(system, slot=1)
    reward = feedback(system, first, Outcomes(n_hits=4, n_scored=5))
    assert reward == pytest.approx(0.8)
    assert feedback(system, second, Outcomes()) is None  # nothing came back
    with pytest.raises(ValueError, match="n_hits"):
        Outcomes(n_hits=3, n_scored=2)


def test_oracle_modes_need_truth(fake: Fake) -> None:
    backend, calib, test = fake
    setup = prepare(small_config(), backend, calib, test)
    for name in ("task-oracle", "slot-oracle"):
        system = build_system(setup, name, 0)
        with pytest.raises(ValueError, match="truth"):
            decide(system, slot=0)


def test_reward_penalties() -> None:
    fn = RewardFn(
        latency_budget_ms=10, latency_weight=0.5, memory_budget_bytes=100, memory_weight=1
    )
    assert fn(Outcomes(9, 10, latency_ms=5, memory_bytes=50)) == pytest.approx(0.9)
    assert fn(Outcomes(9, 10, latency_ms=20, memory_bytes=50)) == pytest.approx(0.4)
    assert fn(Outcomes(9, 10, latency_ms=5, memory_bytes=200)) == 0.0
    assert fn(Outcomes(reward=0.3)) == pytest.approx(0.3)
    with pytest.raises(ValueError, match=r"reward\.kind"):
        RewardFn(kind="nope")
    with pytest.raises(ValueError, match="reward must be in"):
        Outcomes(reward=1.5)


def test_proxy_reward_is_label_free(fake: Fake) -> None:
    backend, calib, test = fake
    setup = prepare(
        small_config(**{"reward.kind": "proxy", "reward.probe": 8}), backend, calib, test
    )
    system = build_system(setup, "tanbr", 0)
    record = run_slot(system, make_slots(setup, 0)[0])
    assert record.n_scored == 8 and record.reward is not None


def test_determinism_under_seed(fake: Fake) -> None:
    backend, calib, test = fake
    setup = prepare(small_config(n_slots=15), backend, calib, test)
    slots = make_slots(setup, 3)
    a = run_policy(setup, "tanbr", 3, slots).records
    b = run_policy(setup, "tanbr", 3, make_slots(setup, 3)).records
    strip = lambda rs: [(r.action, r.accuracy, r.est_mix, r.reward) for r in rs]  # noqa: E731
    assert strip(a) == strip(b)
    c = run_policy(setup, "tanbr", 4, make_slots(setup, 4)).records
    assert strip(a) != strip(c)


def test_execute_writes_a_run_folder(fake: Fake, tmp_path: Path) -> None:
    backend, calib, test = fake
    policies = ["tanbr", "uniform", "full-moe", "slot-oracle", "task-oracle", "smear", "frequency"]
    cfg = small_config(n_slots=12, seeds=[0, 1], policies=policies)
    result = execute(prepare(cfg, backend, calib, test), out=tmp_path)
    folder = result.folder
    names = {p.name for p in folder.iterdir()}
    assert {"config.toml", "trace.jsonl", "summary.json", "report.md"} <= names
    assert {"regret.png", "accuracy.png", "mix.png", "coeffs.png", "costs.png"} <= names
    records = list(read_trace(folder / "trace.jsonl"))
    assert len(records) == 12 * 2 * 7
    assert load_config(folder / "config.toml") == cfg
    policies = result.summary["policies"]
    assert set(policies) == set(cfg.policies)
    assert policies["slot-oracle"]["accuracy"] > policies["uniform"]["accuracy"]
    assert policies["full-moe"]["param_bytes"] > policies["uniform"]["param_bytes"]
    # regret on the very requests each slot scored: the slot oracle's own is exactly 0
    assert policies["slot-oracle"]["regret"] == 0.0
    oracle = {(r.seed, r.slot): r.accuracy for r in records if r.policy == "slot-oracle"}
    for r in records:
        assert r.oracle_accuracy == oracle[(r.seed, r.slot)]
        assert r.regret == pytest.approx(r.oracle_accuracy - r.accuracy)  # type: ignore[operator]
    assert policies["task-oracle"]["accuracy"] >= policies["slot-oracle"]["accuracy"] - 0.02
    assert all(row["latency_p50_ms"] is not None for row in policies.values())


def test_unknown_policy_is_named(fake: Fake, tmp_path: Path) -> None:
    backend, calib, test = fake
    setup = prepare(small_config(policies=["tanbrr"]), backend, calib, test)
    with pytest.raises(ValueError, match="unknown policy 'tanbrr' \\(did you mean 'tanbr'\\?\\)"):
        execute(setup, out=tmp_path)
    with pytest.raises(ValueError, match=r"\[policy.tanbr\]|bad parameters"):
        build_system(
            prepare(small_config(**{"policy.tanbr.bogus": 1}), backend, calib, test), "tanbr", 0
        )


def test_system_rejects_bad_head(fake: Fake) -> None:
    backend, calib, test = fake
    setup = prepare(small_config(), backend, calib, test)
    system = build_system(setup, "uniform", 0)
    with pytest.raises(ValueError, match="head"):
        System(backend, system.estimator, system.mode, head=-1)
    with pytest.raises(ValueError, match=r"labelling\.fraction"):
        Labelling(fraction=0)


def test_tasks_fixture_is_consistent() -> None:
    assert len(TASKS) == 4


def test_trace_replay_through_the_runner(fake: Fake, tmp_path: Path) -> None:
    backend, calib, test = fake
    mix_path = tmp_path / "mix.csv"
    mix_path.write_text("slot,task0,task1,task2,task3\n0,1,0,0,0\n1,0,0,1,0\n2,0,1,0,1\n")
    cfg = small_config(**{"workload.kind": "trace", "workload.trace": str(mix_path)})
    setup = prepare(cfg, backend, calib, test)
    slots = make_slots(setup, 0)
    assert len(slots) == 3  # the trace is shorter than n_slots
    assert [s.truth.mix.round(2).tolist() for s in slots if s.truth is not None][:2] == [
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
    ]
    req_path = tmp_path / "requests.jsonl"
    lines = [f'{{"slot": {i // 5}, "text": "{test.texts[i * 7]}"}}' for i in range(20)]
    req_path.write_text("\n".join(lines) + "\n")
    cfg = small_config(**{"workload.kind": "requests", "workload.requests": str(req_path)})
    setup = prepare(cfg, backend, calib, test)
    run = run_policy(setup, "tanbr", 0, make_slots(setup, 0))
    assert [r.n_requests for r in run.records] == [5, 5, 5, 5]
    assert all(r.accuracy is not None for r in run.records)
    with pytest.raises(ValueError, match=r"workload\.trace"):
        make_slots(prepare(small_config(**{"workload.kind": "trace"}), backend, calib, test), 0)


def test_oracle_table_on_a_subsample(fake: Fake) -> None:
    backend, calib, test = fake
    full = prepare(small_config(), backend, calib, test).baselines.oracle
    sub = prepare(
        small_config(**{"oracle.rows_per_task": 30}), backend, calib, test
    ).baselines.oracle
    assert full is not None and sub is not None
    assert full.acc.shape == sub.acc.shape
    # 30 of 100 requests per task: per-task accuracies close to the full split's
    assert np.abs(full.acc - sub.acc).max() < 0.25
    assert not np.array_equal(full.acc, sub.acc)


def test_task_relative_bandits_and_absolute_plug_in(fake: Fake) -> None:
    backend, calib, test = fake
    cfg = small_config(**{"parameterization.kind": "task-relative", "n_slots": 8})
    setup = prepare(cfg, backend, calib, test)
    slots = make_slots(setup, 0)
    plug = run_policy(setup, "plug-in", 0, slots).records
    assert all(r.action == r.est_mix for r in plug)  # the action is the estimated mix
    tanbr = run_policy(setup, "tanbr", 0, slots).records
    assert all(r.kind == "merge" and r.coeffs is not None for r in tanbr)
    with pytest.raises(ValueError, match=r"parameterization\.kind"):
        prepare(small_config(**{"parameterization.kind": "nope"}), backend, calib, test)


def test_task_tempered_bandits_act_on_one_exponent(fake: Fake) -> None:
    backend, calib, test = fake
    cfg = small_config(**{"parameterization.kind": "task-tempered", "n_slots": 8})
    setup = prepare(cfg, backend, calib, test)
    assert setup.dim == 2  # (w, 1 - w): tau = 2 w
    slots = make_slots(setup, 0)
    plug = run_policy(setup, "plug-in", 0, slots).records
    assert all(r.action == r.est_mix for r in plug)  # static merges keep the absolute simplex
    tanbr = run_policy(setup, "tanbr", 0, slots).records
    assert all(len(r.action) == 2 and r.coeffs is not None for r in tanbr)
