from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tanbr.experiment.parameterization import (
    Direct,
    GroupedTaskSimplex,
    TaskRelative,
    TaskSimplex,
    TaskTempered,
    build_parameterization,
    cluster_profiles,
    reads_context,
)

U = {
    "b0": np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]]),  # (K=2, E=3)
    "b1": np.array([[0.5, 0.5, 0.0], [0.0, 0.2, 0.8]]),
}


def test_task_simplex_is_the_normalised_profile_mixture() -> None:
    plan = TaskSimplex(U).plan(np.array([0.25, 0.75]))
    np.testing.assert_allclose(plan["b0"], 0.25 * U["b0"][0] + 0.75 * U["b0"][1])
    np.testing.assert_allclose(plan["b1"], 0.25 * U["b1"][0] + 0.75 * U["b1"][1])
    vertex = TaskSimplex(U).plan(np.array([1.0, 0.0]))
    np.testing.assert_allclose(vertex["b1"], U["b1"][0])


def test_task_relative_centre_is_plug_in_and_vertices_are_types() -> None:
    mix = np.array([0.3, 0.7])
    ts = TaskSimplex(U)
    rel = TaskRelative(ts, floor=1e-9)
    centre = rel.plan(np.array([0.5, 0.5]), mix)
    for name in U:
        np.testing.assert_allclose(centre[name], ts.plan(mix)[name], atol=1e-8)
        np.testing.assert_allclose(rel.plan(np.array([0.0, 1.0]), mix)[name], U[name][1])
    with pytest.raises(ValueError, match="context"):
        rel.plan(np.array([0.5, 0.5]))


def test_task_tempered_centre_is_plug_in_and_ends_are_uniform_and_sharpened() -> None:
    mix = np.array([0.3, 0.7])
    ts = TaskSimplex(U)
    temp = TaskTempered(ts, tau_max=2.0, floor=1e-9)
    assert temp.tau(np.array([0.5, 0.5])) == pytest.approx(1.0)
    sharp = mix**2 / (mix**2).sum()
    for name in U:
        centre = temp.plan(np.array([0.5, 0.5]), mix)[name]
        np.testing.assert_allclose(centre, ts.plan(mix)[name], atol=1e-8)
        flat = temp.plan(np.array([0.0, 1.0]), mix)[name]
        np.testing.assert_allclose(flat, ts.plan(np.array([0.5, 0.5]))[name], atol=1e-12)
        np.testing.assert_allclose(temp.plan(np.array([1.0, 0.0]), mix)[name], ts.plan(sharp)[name])
    with pytest.raises(ValueError, match="context"):
        temp.plan(np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match="tau_max"):
        TaskTempered(ts, tau_max=0.0)
    param, absolute = build_parameterization("task-tempered", U, {"b0": 3, "b1": 3})
    assert isinstance(param, TaskTempered) and param.dim == 2 and absolute.dim == 2
    assert reads_context("task-tempered") and reads_context("task-relative")
    assert not reads_context("task-simplex") and not reads_context("direct")


def test_direct_shares_coeffs_across_blocks() -> None:
    plan = Direct({"b0": 3, "b1": 3}).plan(np.array([0.2, 0.3, 0.5]))
    assert set(plan) == {"b0", "b1"}
    np.testing.assert_allclose(plan["b1"], [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="same number of experts"):
        Direct({"b0": 3, "b1": 4})


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (np.array([0.5, 0.6]), "simplex"),
        (np.array([-0.1, 1.1]), "simplex"),
        (np.array([np.nan, 1.0]), "simplex"),
        (np.array([1.0, 0.0, 0.0]), "shape"),
    ],
)
def test_bad_actions_are_rejected(action: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TaskSimplex(U).plan(action)


def test_profiles_from_assignments() -> None:
    gates = {"b0": np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])}
    profiles = cluster_profiles(np.array([0, 1, 1]), gates, 3)
    np.testing.assert_allclose(profiles["b0"][0], [1.0, 0.0])
    np.testing.assert_allclose(profiles["b0"][1], [0.25, 0.75])
    np.testing.assert_allclose(profiles["b0"][2], [0.5, 0.5])  # empty type: the overall mean
    with pytest.raises(ValueError, match="must be"):
        cluster_profiles(np.array([0, 1]), gates, 2)
    with pytest.raises(ValueError, match="all-zero"):
        TaskSimplex({"b0": np.array([[0.0, 0.0], [1.0, 0.0]])})


@pytest.mark.parametrize("dim", [1, 2, 6, 9])
def test_oracle_candidates_cover_vertices_edges_and_centre(dim: int) -> None:
    from tanbr.experiment.modes import DENSE_ORACLE_DIM, candidate_actions

    cands = candidate_actions(dim, n_random=5, concentration=1.0, rng=np.random.default_rng(0))
    assert cands.shape[1] == dim
    assert np.all(cands >= 0) and np.allclose(cands.sum(1), 1.0)

    def has(point: np.ndarray) -> bool:
        return bool(np.isclose(cands, point).all(1).any())

    eye = np.eye(dim)
    assert all(has(v) for v in eye) and has(np.full(dim, 1.0 / dim))
    pairs = [(i, j) for i in range(dim) for j in range(i + 1, dim)]
    assert all(has((eye[i] + eye[j]) / 2) for i, j in pairs)
    dense = len(pairs) > 0 and dim <= DENSE_ORACLE_DIM
    assert all(has(0.25 * eye[i] + 0.75 * eye[j]) == dense for i, j in pairs)
    n_dense = (2 * len(pairs) + dim + len(pairs)) if dense else 0
    assert len(cands) == dim + 1 + len(pairs) + n_dense + 5


# K = 3 task types over E = 6 experts: type k uses experts 2k and 2k + 1 most
U3 = {
    name: np.array(
        [
            [0.45, 0.35, 0.05, 0.05, 0.05, 0.05],
            [0.05, 0.05, 0.4, 0.4, 0.05, 0.05],
            [0.05, 0.05, 0.05, 0.05, 0.5, 0.3],
        ]
    )
    for name in ("b0", "b1")
}


def test_grouped_with_one_expert_is_the_task_simplex() -> None:
    a = np.array([0.2, 0.5, 0.3])
    one, plain = GroupedTaskSimplex(U3, experts=1).plan(a), TaskSimplex(U3).plan(a)
    for name in U3:
        np.testing.assert_array_equal(one[name], plain[name])


@pytest.mark.parametrize("m", [2, 3])
def test_grouped_gives_the_heaviest_types_their_own_experts(m: int) -> None:
    a = np.array([0.2, 0.5, 0.3])  # type 1 weighs most, then type 2
    plan = GroupedTaskSimplex(U3, experts=m).plan(a)
    for c in plan.values():
        assert c.shape == (m, 6)
        np.testing.assert_allclose(c.sum(1), 1.0)
        support = c > 0
        assert (support.sum(0) <= 1).all() and support.any(1).all()  # disjoint, none empty
        assert set(np.flatnonzero(support[0])) == {2, 3}  # type 1's own experts
        if m == 3:
            assert set(np.flatnonzero(support[1])) == {4, 5}  # then type 2's
            assert set(np.flatnonzero(support[2])) == {0, 1}  # the rest share the last


def test_grouped_caps_m_and_keeps_every_group() -> None:
    """m beyond the number of task types is capped; a group no expert prefers still gets
    one (from a group that can spare it)."""
    plan = GroupedTaskSimplex(U3, experts=5).plan(np.array([1.0, 0.0, 0.0]))
    for c in plan.values():
        assert c.shape == (3, 6) and (c > 0).any(1).all()
    with pytest.raises(ValueError, match="needs a task-simplex"):
        build_parameterization("direct", U3, {"b0": 6, "b1": 6}, experts=2)
    param, absolute = build_parameterization("task-relative", U3, {"b0": 6}, experts=2)
    assert isinstance(param, TaskRelative) and isinstance(absolute, GroupedTaskSimplex)


def _type_stats(seed: int = 0) -> dict[str, Any]:
    """Hand-made task-aware RegMean statistics: K=2 types, two blocks of E=3 experts with one
    biased map (out 4, in 5), A_k positive definite."""
    import torch

    from tanbr.model.discovery import MoEBlock, Target
    from tanbr.model.regmean import LinearMap
    from tanbr.model.task_regmean import TypeStats

    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in ("b0", "b1"):
        block = MoEBlock(
            name=name,
            n_experts=3,
            layout="fused",
            experts_name=f"{name}.experts",
            gate_name=f"{name}.gate",
            hidden_size=5,
            targets=(Target("up_proj", (4, 5)), Target("up_proj_bias", (4,))),
        )
        x = torch.randn(2, 20, 6, generator=g, dtype=torch.float64)
        out[name] = TypeStats(
            block=block,
            maps=(LinearMap("up_proj", "up_proj", "up_proj_bias", False, 5),),
            a={"up_proj": x.transpose(1, 2) @ x / 20},
            b={"up_proj": torch.randn(2, 4, 6, generator=g, dtype=torch.float64)},
            w_sum={"up_proj": torch.randn(4, 6, generator=g, dtype=torch.float64)},
            averages={},
            tokens=np.array([20, 20]),
            alpha=0.9,
        )
    return out


def test_task_regmean_solves_each_action_from_the_type_sums() -> None:
    import torch

    from tanbr.experiment.parameterization import TaskRegMean
    from tanbr.model import MergedWeights

    stats = _type_stats()
    param, absolute = build_parameterization(
        "task-regmean", U, {"b0": 3, "b1": 3}, stats=lambda: stats
    )
    assert param is absolute and isinstance(param, TaskRegMean) and param.dim == 2
    action = np.array([0.25, 0.75])
    plan = param.plan(action)
    for name, s in stats.items():
        value = plan[name]
        assert isinstance(value, MergedWeights) and value.method == "task-regmean"
        a = 0.25 * s.a["up_proj"][0] + 0.75 * s.a["up_proj"][1]
        b = 0.25 * s.b["up_proj"][0] + 0.75 * s.b["up_proj"][1]
        want = (b @ torch.linalg.inv(a)).float()
        torch.testing.assert_close(value.tensors["up_proj"], want[:, :5])
        torch.testing.assert_close(value.tensors["up_proj_bias"], want[:, 5])
    for action, message in [
        (np.array([1.0, 0.0, 0.0]), "shape"),
        (np.array([np.nan, 1.0]), "simplex"),
        (np.array([0.7, 0.7]), "simplex"),
        (np.array([-0.5, 1.5]), "simplex"),
    ]:
        with pytest.raises(ValueError, match=message):
            param.plan(action)


def test_task_regmean_plans_are_keyed_by_statistics_and_action() -> None:
    """The memo key of a plan is its statistics' fingerprint and its action: equal for the
    same statistics (in any dtype, bfloat16 averages too), different when either differs."""
    import dataclasses

    import torch

    from tanbr.backend.plans import plan_key
    from tanbr.experiment.parameterization import TaskRegMean

    stats = _type_stats()
    blocks = {"b0": 3, "b1": 3}
    half = {n: dataclasses.replace(s, averages={"g": torch.ones(3, dtype=torch.bfloat16)})
            for n, s in stats.items()}  # fmt: skip
    other = {n: dataclasses.replace(s, averages={"g": torch.zeros(3, dtype=torch.bfloat16)})
             for n, s in stats.items()}  # fmt: skip
    a, b = np.array([0.25, 0.75]), np.array([0.5, 0.5])
    first = TaskRegMean(half, blocks, cache=0)
    assert plan_key(first.plan(a)) == plan_key(TaskRegMean(half, blocks).plan(a))
    assert plan_key(first.plan(a)) != plan_key(first.plan(b))
    assert plan_key(first.plan(a)) != plan_key(TaskRegMean(other, blocks).plan(a))
    assert first.plan(a)["b0"].build_ms > 0  # no cache: solved every time


def test_task_regmean_refusals() -> None:
    from tanbr.experiment.parameterization import TaskRegMean

    stats = _type_stats()
    with pytest.raises(ValueError, match=r"merge\.experts = 2"):
        build_parameterization(
            "task-regmean", U, {"b0": 3, "b1": 3}, experts=2, stats=lambda: stats
        )
    with pytest.raises(ValueError, match="per-type RegMean statistics"):
        build_parameterization("task-regmean", U, {"b0": 3, "b1": 3})
    with pytest.raises(ValueError, match="every block"):
        TaskRegMean({"b0": stats["b0"]}, {"b0": 3, "b1": 3})
    with pytest.raises(ValueError, match="3 experts"):
        TaskRegMean(stats, {"b0": 4, "b1": 3})
    called = []
    build_parameterization("task-simplex", U, {"b0": 3, "b1": 3}, stats=lambda: called.append(1))
    assert not called  # only task-regmean computes the statistics
