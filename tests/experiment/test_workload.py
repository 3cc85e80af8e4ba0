from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from tanbr.backend.requests import Pool
from tanbr.experiment.workload import (
    SCHEDULES,
    draw_slots,
    read_mix_trace,
    read_request_trace,
)

TASKS = ("a", "b", "c", "d", "e", "f")


@pytest.fixture
def pool() -> Pool:
    n = 60
    tasks = np.repeat(np.arange(6), n // 6)
    texts = tuple(f"{TASKS[t]} text {i}" for i, t in enumerate(tasks))
    return Pool(texts, tasks, tasks * 2 + (np.arange(n) % 2), TASKS, rows=np.arange(n))


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_schedules_live_on_the_simplex(kind: str) -> None:
    mixes = SCHEDULES[kind](n_slots=120, n_tasks=6, rng=np.random.default_rng(0))
    assert mixes.shape == (120, 6)
    assert (mixes >= 0).all()
    np.testing.assert_allclose(mixes.sum(1), 1.0, atol=1e-9)


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_schedules_are_deterministic_under_seed(kind: str) -> None:
    a = SCHEDULES[kind](n_slots=50, n_tasks=6, rng=np.random.default_rng(7))
    b = SCHEDULES[kind](n_slots=50, n_tasks=6, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)


def test_drift_has_few_dominant_tasks_that_change() -> None:
    mixes = SCHEDULES["drift"](
        n_slots=300, n_tasks=6, rng=np.random.default_rng(1), n_dominant=2, dominance=0.85
    )
    top2 = np.sort(mixes, axis=1)[:, -2:].sum(1)
    assert np.median(top2) > 0.8  # a few tasks dominate each slot
    dominant = [frozenset(np.argsort(m)[-2:].tolist()) for m in mixes]
    changes = sum(a != b for a, b in itertools.pairwise(dominant))
    assert 6 <= changes <= 40  # ... and the dominant ones change over time
    assert len(set(dominant)) >= 5  # not just two alternating sets


def test_switch_is_abrupt() -> None:
    mixes = SCHEDULES["switch"](n_slots=100, n_tasks=6, rng=np.random.default_rng(0), period=20)
    jumps = np.abs(np.diff(mixes, axis=0)).sum(1) > 1e-12
    assert np.flatnonzero(jumps).tolist() == [19, 39, 59, 79]


def test_draw_slots_follows_the_mix(pool: Pool) -> None:
    mixes = np.tile([0.5, 0.5, 0, 0, 0, 0], (40, 1))
    slots = draw_slots(pool, mixes, slot_size=16, rng=np.random.default_rng(0))
    assert len(slots) == 40 and all(len(s.requests) == 16 for s in slots)
    for s in slots:
        assert s.truth is not None
        assert set(s.truth.tasks) <= {0, 1}
        np.testing.assert_allclose(s.truth.mix.sum(), 1.0)
        # rows and texts agree with the pool; truth agrees with the pool's labels
        assert s.requests.rows is not None
        assert [pool.texts[r] for r in s.requests.rows] == list(s.requests.texts)
        np.testing.assert_array_equal(pool.labels[s.requests.rows], s.truth.labels)
    share = np.mean([s.truth.mix[0] for s in slots])
    assert 0.4 < share < 0.6


def test_draw_slots_rejects_bad_shapes(pool: Pool) -> None:
    with pytest.raises(ValueError, match="slot_size"):
        draw_slots(pool, np.ones((2, 6)) / 6, slot_size=0, rng=np.random.default_rng(0))
    with pytest.raises(ValueError, match="mixes"):
        draw_slots(pool, np.ones((2, 5)) / 5, slot_size=4, rng=np.random.default_rng(0))


def test_mix_trace_csv_and_jsonl(tmp_path: Path) -> None:
    csv_path = tmp_path / "mix.csv"
    csv_path.write_text("slot,a,b,c\n0,1,1,0\n1,0,0,2\n")
    mixes = read_mix_trace(csv_path, ("a", "b", "c"))
    np.testing.assert_allclose(mixes, [[0.5, 0.5, 0], [0, 0, 1]])
    jl = tmp_path / "mix.jsonl"
    jl.write_text(json.dumps({"slot": 0, "mix": {"c": 3, "a": 1}}) + "\n\n" + '{"b": 1}\n')
    np.testing.assert_allclose(read_mix_trace(jl, ("a", "b", "c")), [[0.25, 0, 0.75], [0, 1, 0]])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("slot,a,zz\n0,1,1\n", "unknown task 'zz'"),
        ("slot,a,b\n0,-1,1\n", ":2: weight of 'a' must be >= 0"),
        ("slot,a,b\n0,0,0\n", "all task weights are zero"),
        ("slot,a,b\n0,x,1\n", "not a number"),
        ("slot,a,b\n", "no slots"),
    ],
)
def test_mix_trace_errors_name_the_problem(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_mix_trace(path, ("a", "b", "c"))


def test_mix_trace_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_mix_trace(tmp_path / "nope.csv", ("a",))


def test_request_trace_replays_slots(tmp_path: Path, pool: Pool) -> None:
    path = tmp_path / "requests.jsonl"
    lines = [
        {"slot": "s1", "text": pool.texts[3]},
        {"slot": "s1", "text": pool.texts[40], "task": "e"},
        {"slot": "s2", "text": pool.texts[7]},
        {"slot": "s3", "text": "something new"},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    slots = read_request_trace(path, pool)
    assert [s.index for s in slots] == [0, 1, 2]
    assert slots[0].requests.texts == (pool.texts[3], pool.texts[40])
    assert slots[0].truth is not None and slots[0].truth.tasks == (0, 4)
    assert slots[2].truth is None and slots[2].requests.rows is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"slot": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: each row needs 'slot' and 'text'"):
        read_request_trace(bad, pool)
