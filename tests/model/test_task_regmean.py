"""Task-aware RegMean: per-type statistics and the merge solved from an action on the task
simplex, checked against static RegMean on the same tokens (float64, every layout)."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest
import torch

from tanbr.backend.plans import ServedState, build_ms
from tanbr.model import Merger, find_moe_blocks, regmean_grams, regmean_merge
from tanbr.model.coeffs import MergedWeights
from tanbr.model.regmean import solve_merge
from tanbr.model.static_merges import stacked_experts
from tanbr.model.task_regmean import (
    TypeStats,
    group_by_type,
    task_regmean_merge,
    task_regmean_solve,
    task_regmean_stats,
)

H = 32
F64 = torch.float64  # the exact limits are checked on float64 statistics


def _batches(case: Any, n: int, seed: int, shape: tuple[int, int] = (3, 10)) -> list[Any]:
    return list(case.batches(n, seed=seed, shape=shape))


def _float64(case: Any) -> Any:
    """The case's model in float64 (transformers' experts run eagerly: grouped_mm has no
    float64 kernel)."""
    if hasattr(case.model, "set_experts_implementation"):
        case.model.set_experts_implementation("eager")
    case.model.double()
    return find_moe_blocks(case.model)


def _regmean(case: Any, blocks: Any, batches: list[Any]) -> dict[str, dict[str, torch.Tensor]]:
    """Static RegMean on these batches' tokens, block -> target -> float64 tensor."""
    grams = regmean_grams(case.model, blocks, batches)
    return {
        b.name: dict(regmean_merge(b, stacked_experts(case.model, b), grams[b.name]).tensors)
        for b in blocks
    }


def _assert_same(
    solved: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float = 1e-10
) -> None:
    assert set(solved) == set(want)
    for name, tensor in want.items():
        assert tensor.dtype == torch.float64
        torch.testing.assert_close(solved[name], tensor, atol=tol, rtol=tol)


@torch.no_grad()
def test_one_type_holding_every_token_is_static_regmean(case: Any) -> None:
    blocks = _float64(case)
    batches = _batches(case, 2, seed=0)
    stats = task_regmean_stats(case.model, blocks, [batches, []], dtype=F64)  # type 1: none
    want = _regmean(case, blocks, batches)
    for b in blocks:
        assert stats[b.name].tokens[1] == 0 and stats[b.name].tokens[0] > 0
        _assert_same(task_regmean_solve(stats[b.name], np.array([1.0, 0.0])), want[b.name])
        # a type without tokens carries the statistics of all of them
        _assert_same(task_regmean_solve(stats[b.name], np.array([0.0, 1.0])), want[b.name])


@torch.no_grad()
def test_token_share_weights_are_static_regmean_on_the_union(case: Any) -> None:
    blocks = _float64(case)
    first, second = _batches(case, 2, seed=1), _batches(case, 1, seed=2, shape=(2, 7))
    stats = task_regmean_stats(case.model, blocks, [first, second], dtype=F64)
    want = _regmean(case, blocks, first + second)
    for b in blocks:
        n = stats[b.name].tokens.astype(np.float64)
        _assert_same(task_regmean_solve(stats[b.name], n / n.sum()), want[b.name])


@torch.no_grad()
def test_a_vertex_is_regmean_on_that_types_tokens_alone(case: Any) -> None:
    blocks = _float64(case)
    parts = [_batches(case, 1, seed=3), _batches(case, 2, seed=4), _batches(case, 1, seed=5)]
    stats = task_regmean_stats(case.model, blocks, parts, dtype=F64)
    for k, batches in enumerate(parts):
        want = _regmean(case, blocks, batches)
        vertex = np.eye(3)[k]
        for b in blocks:
            _assert_same(task_regmean_solve(stats[b.name], vertex), want[b.name])


@torch.no_grad()
def test_an_inner_action_differs_from_every_vertex_and_is_served(make_case: Any) -> None:
    case = make_case("mixtral")
    blocks = find_moe_blocks(case.model)
    parts = [_batches(case, 1, seed=6), _batches(case, 1, seed=7)]
    stats = task_regmean_stats(case.model, blocks, parts)
    b = blocks[0]
    mid = task_regmean_solve(stats[b.name], np.array([0.5, 0.5]))
    for vertex in np.eye(2):
        ends = task_regmean_solve(stats[b.name], vertex)
        assert not torch.allclose(mid[b.targets[0].name], ends[b.targets[0].name])
    # the served path: a plan of these merged weights merges, and is charged its solve
    plan = {bl.name: task_regmean_merge(stats[bl.name], np.array([0.3, 0.7])) for bl in blocks}
    assert all(v.method == "task-regmean" and v.build_ms > 0 for v in plan.values())
    assert all(v.tensors[b.targets[0].name].dtype == b.dtype for v in plan.values())
    before = case.run()
    merger = Merger(case.model)
    served = ServedState(merger, case.model)
    served.want_merge(plan)
    spent = served.sync()
    assert merger.merged and spent >= build_ms(plan) > 0
    assert not torch.allclose(case.run(), before)
    served.want_full()
    served.sync()
    torch.testing.assert_close(case.run(), before)


def test_bad_actions_are_refused(make_case: Any) -> None:
    case = make_case("fused_plain")
    blocks = find_moe_blocks(case.model)
    stats = task_regmean_stats(case.model, blocks, [_batches(case, 1, 0), _batches(case, 1, 1)])
    s = stats[blocks[0].name]
    for action, message in [
        (np.array([1.0, 0.0, 0.0]), "shape"),
        (np.array([[0.5, 0.5]]), "shape"),
        (np.array([np.nan, 1.0]), "simplex"),
        (np.array([0.5, 0.6]), "simplex"),
        (np.array([-0.2, 1.2]), "simplex"),
    ]:
        with pytest.raises(ValueError, match=message):
            task_regmean_solve(s, action)
    with pytest.raises(ValueError, match="ridge"):
        task_regmean_solve(s, np.array([0.5, 0.5]), ridge=-1.0)


def test_statistics_keep_only_the_per_type_sums(make_case: Any) -> None:
    case = make_case("fused_plain")  # up (in 32 + bias) -> 40, down (in 40 + bias) -> 32
    blocks = find_moe_blocks(case.model)
    stats = task_regmean_stats(case.model, blocks, [_batches(case, 1, k) for k in range(3)])
    s = stats[blocks[0].name]
    assert isinstance(s, TypeStats) and s.n_types == 3
    shapes = {name: (tuple(s.a[name].shape), tuple(s.b[name].shape)) for name in s.a}
    assert shapes == {
        "up_proj": ((3, 33, 33), (3, 40, 33)),
        "down_proj": ((3, 41, 41), (3, 32, 41)),
    }
    assert s.nbytes == 4 * 3 * (33 * 33 + 40 * 33 + 41 * 41 + 32 * 41)  # float32 by default
    assert all(t.dtype == torch.float32 for t in [*s.a.values(), *s.b.values()])
    # the statistics travel to the experiment's worker processes
    back = pickle.loads(pickle.dumps(s))
    torch.testing.assert_close(
        task_regmean_solve(back, np.array([0.2, 0.3, 0.5])),
        task_regmean_solve(s, np.array([0.2, 0.3, 0.5])),
    )


def test_merged_weights_keep_their_build_time_through_checks_and_pickling() -> None:
    value = MergedWeights({"w": torch.ones(2)}, "task-regmean", build_ms=12.5)
    assert pickle.loads(pickle.dumps(value)).build_ms == 12.5
    assert build_ms({"a": value, "b": value, "c": np.ones(3) / 3}) == 25.0
    assert MergedWeights({"w": torch.ones(2)}).build_ms == 0.0


def test_group_by_type_checks_the_assignment() -> None:
    assert group_by_type(["a", "b", "c"], np.array([1, 0, 1]), 3) == [["b"], ["a", "c"], []]
    with pytest.raises(ValueError, match="one per request"):
        group_by_type(["a", "b"], np.array([0]), 2)
    with pytest.raises(ValueError, match=r"in \[0, 2\)"):
        group_by_type(["a", "b"], np.array([0, 2]), 2)
    with pytest.raises(ValueError, match="integer"):
        group_by_type(["a"], np.array([0.5]), 2)


def test_no_token_at_all_is_an_error(make_case: Any) -> None:
    case = make_case("fused_plain")
    blocks = find_moe_blocks(case.model)
    with pytest.raises(ValueError, match="no calibration token"):
        task_regmean_stats(case.model, blocks, [[], []])
    with pytest.raises(ValueError, match="at least one task type"):
        task_regmean_stats(case.model, blocks, [])


@torch.no_grad()
def test_singular_sums_take_the_ridge_of_static_regmean(make_case: Any, caplog: Any) -> None:
    case = make_case("fused_plain")
    blocks = _float64(case)
    few = _batches(case, 1, seed=8, shape=(1, 5))  # 5 tokens, 33 inputs, no shrinkage
    stats = task_regmean_stats(case.model, blocks, [few], alpha=1.0, dtype=F64)
    grams = regmean_grams(case.model, blocks, few)
    for b in blocks:
        stacked = stacked_experts(case.model, b)
        want = dict(regmean_merge(b, stacked, grams[b.name], alpha=1.0).tensors)
        # the same ridge (relative to the sums' scale); the regularised system is ill-conditioned
        # (its smallest eigenvalues are the ridge's), so the rounding of the 1/n scaling shows
        _assert_same(task_regmean_solve(stats[b.name], np.array([1.0])), want, tol=1e-8)
    assert "task-aware RegMean block" in caplog.text and "added a ridge" in caplog.text
    with pytest.raises(ValueError, match=r"singular.*ridge > 0"):
        task_regmean_solve(stats[blocks[0].name], np.array([1.0]), ridge=0.0)


@torch.no_grad()
def test_float32_statistics_solve_what_float64_ones_do(make_case: Any) -> None:
    case = make_case("fused_plain")
    blocks = _float64(case)
    parts = [_batches(case, 2, seed=9), _batches(case, 2, seed=10)]
    wide = task_regmean_stats(case.model, blocks, parts, dtype=F64)
    narrow = task_regmean_stats(case.model, blocks, parts)
    action = np.array([0.3, 0.7])
    for b in blocks:
        assert narrow[b.name].nbytes * 2 == wide[b.name].nbytes
        want = task_regmean_solve(wide[b.name], action)
        got = task_regmean_solve(narrow[b.name], action)
        for name, tensor in want.items():
            assert got[name].dtype == torch.float32
            torch.testing.assert_close(got[name].double(), tensor, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="float32 or float64"):
        task_regmean_stats(case.model, blocks, parts, dtype=torch.float16)


def test_float32_sums_too_ill_conditioned_are_solved_in_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(24, 24, generator=gen, dtype=F64))
    a = ((q * torch.logspace(0, -8, 24, dtype=F64)) @ q.T).float()  # eigenvalue ratio 1e-8
    num = torch.randn(5, 24, generator=gen).float()
    w_sum = torch.zeros(5, 24)
    got = solve_merge("test", a, num, w_sum, 2, 1e-6, exact_check=False)
    want = solve_merge("test", a.double(), num.double(), w_sum.double(), 2, 1e-6, exact_check=False)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want.float())  # the float64 solve of the same sums
    single = torch.cholesky_solve(num.T, torch.linalg.cholesky(a)).T
    assert (single - want.float()).abs().max() > 1e-3  # what single precision would have given
