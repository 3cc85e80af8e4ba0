"""A task never seen in calibration arrives at slot 100: the estimator opens one new type
for it (none before), learns its profile, the TV distance comes back down while a plain
estimator's stays high, and the policies keep producing valid plans."""

from __future__ import annotations

import numpy as np
import pytest

from tanbr.backend.requests import Pool
from tanbr.experiment.config import load_config
from tanbr.experiment.estimator import ReadoutEstimator
from tanbr.experiment.novelty import NoveltyDetector, OnlineProfile, split_mix, with_new_types
from tanbr.experiment.records import SlotRecord
from tanbr.experiment.runner import make_slots, run_policy
from tanbr.experiment.setup import prepare
from tanbr.experiment.workload import introduce_task

from .conftest import FakeBackend

Fake = tuple[FakeBackend, Pool, Pool]
AT = 100
N_SLOTS = 140
POLICIES = ("tanbr", "plug-in")


def _run(fake: Fake, *, novelty: bool, new_task: str = "task3") -> dict[str, list[SlotRecord]]:
    backend, calib, test = fake
    cfg = load_config(
        overrides=[
            f"n_slots={N_SLOTS}", "workload.slot_size=64", "workload.period=10",
            "estimator.kind='readout'", "estimator.head=32",
            f"estimator.novelty={str(novelty).lower()}",
            f"workload.new_task='{new_task}'", f"workload.new_task_at={AT}",
            "workload.new_task_share=0.3", "oracle.n_candidates=4",
            f"policies={list(POLICIES)}".replace('"', "'"),
        ]
    )  # fmt: skip
    setup = prepare(cfg, backend, calib, test)
    slots = make_slots(setup, 0)
    return {
        name: run_policy(setup, name, 0, slots, probe=False).records
        for name in setup.config.policies
    }


def _tv(records: list[SlotRecord], lo: int, hi: int) -> float:
    return float(np.mean([r.tv for r in records if lo <= r.slot < hi and r.tv is not None]))


@pytest.fixture(scope="module")
def runs() -> dict[str, dict[str, list[SlotRecord]]]:
    rng = np.random.default_rng(0)
    from .conftest import make_pool

    calib = make_pool(rng, 100, 0)
    test = make_pool(rng, 100, len(calib.texts))
    tasks = np.concatenate([calib.tasks, test.tasks])
    labels = np.concatenate([calib.labels, test.labels])
    fake = (FakeBackend(tasks, labels), calib, test)
    return {"detecting": _run(fake, novelty=True), "plain": _run(fake, novelty=False)}


def test_one_new_type_opens_after_the_task_arrives_and_none_before(
    runs: dict[str, dict[str, list[SlotRecord]]],
) -> None:
    for name, records in runs["detecting"].items():
        sizes = [len(r.est_mix) for r in records]
        k = sizes[0]
        assert k == 3, f"{name}: the calibration knows 3 tasks, the estimator found {k} types"
        assert all(s == k for s in sizes[:AT]), f"{name}: a type opened before the new task came"
        assert sizes[-1] == k + 1, f"{name}: expected exactly one new type, got {sizes[-1] - k}"
        opened = next(r.slot for r in records if len(r.est_mix) > k)
        assert AT < opened <= AT + 8, f"{name}: the new type opened at slot {opened}"
        assert all(len(r.est_mix) == k for r in runs["plain"][name])


def test_tv_comes_back_after_detection_while_a_plain_estimator_stays_wrong(
    runs: dict[str, dict[str, list[SlotRecord]]],
) -> None:
    records = runs["detecting"]["tanbr"]
    plain = runs["plain"]["tanbr"]
    opened = next(r.slot for r in records if len(r.est_mix) > 3)
    before = _tv(records, AT - 30, AT)
    right_after = (_tv(plain, AT, opened + 1), _tv(records, AT, opened + 1))
    settled = (_tv(plain, opened + 5, N_SLOTS), _tv(records, opened + 5, N_SLOTS))
    figures = (
        f"TV before {before:.3f}; slots {AT}..{opened} plain {right_after[0]:.3f} detecting "
        f"{right_after[1]:.3f}; after detection (slot {opened + 5}+) plain {settled[0]:.3f} "
        f"detecting {settled[1]:.3f}"
    )
    assert settled[1] <= before + 0.05, figures
    assert settled[0] >= 0.2, figures
    assert settled[0] - settled[1] >= 0.15, figures


def test_profile_is_learned_at_a_charged_cost_and_plans_stay_valid(
    runs: dict[str, dict[str, list[SlotRecord]]],
) -> None:
    for name, records in runs["detecting"].items():
        charged = [r.slot for r in records if r.profile_ms > 0]
        assert charged and charged[0] > AT, f"{name}: no profile pass was charged"
        for r in records:
            assert r.coeffs is not None
            for c in r.coeffs.values():
                assert min(c) >= 0 and sum(c) == pytest.approx(1.0, abs=1e-4)
            assert sum(r.est_mix) == pytest.approx(1.0, abs=1e-4)
    # FakeBackend: expert k is task k's specialist, so the new task's share of the slot shows
    # up as weight on expert 3 in plug-in's merge once its profile is mixed in
    late = [r for r in runs["detecting"]["plug-in"] if r.slot >= N_SLOTS - 20]
    plain = [r for r in runs["plain"]["plug-in"] if r.slot >= N_SLOTS - 20]
    assert late[0].coeffs is not None and plain[0].coeffs is not None
    weight = np.mean([r.coeffs["layers.0.mlp"][3] for r in late if r.coeffs])
    weight_plain = np.mean([r.coeffs["layers.0.mlp"][3] for r in plain if r.coeffs])
    assert weight > weight_plain + 0.1, (weight, weight_plain)


def test_no_new_type_without_a_new_task(fake: Fake) -> None:
    backend, calib, test = fake
    cfg = load_config(
        overrides=[
            "n_slots=120", "workload.slot_size=64", "workload.period=10",
            "estimator.kind='readout'", "estimator.head=32", "estimator.novelty=true",
            "oracle.n_candidates=4", "policies=['plug-in']",
        ]
    )  # fmt: skip
    setup = prepare(cfg, backend, calib, test)
    records = run_policy(setup, "plug-in", 0, make_slots(setup, 0), probe=False).records
    assert {len(r.est_mix) for r in records} == {setup.estimator.n_types}


def test_introduce_task_holds_it_out_then_gives_it_its_share() -> None:
    mixes = np.full((6, 3), 1.0 / 3)
    out = introduce_task(mixes, 2, at=3, share=0.4)
    np.testing.assert_allclose(out[:3], [[0.5, 0.5, 0.0]] * 3)
    np.testing.assert_allclose(out[3:], [[0.3, 0.3, 0.4]] * 3)


def test_split_and_blend() -> None:
    context, new = split_mix(np.array([0.3, 0.3, 0.4]), 2)
    np.testing.assert_allclose(context, [0.5, 0.5])
    np.testing.assert_allclose(new, [0.4])
    plan = {"b": np.array([0.5, 0.5, 0.0])}
    blended = with_new_types(plan, new, [{"b": np.array([0.0, 0.0, 1.0])}])
    np.testing.assert_allclose(blended["b"], [0.3, 0.3, 0.4])
    assert with_new_types(plan, new, [None])["b"].tolist() == [0.5, 0.5, 0.0]


def test_detector_ignores_a_drifting_mix_of_known_blobs_and_finds_a_new_one() -> None:
    rng = np.random.default_rng(3)
    centres = 2.0 * rng.standard_normal((4, 24))

    def draw(tasks: np.ndarray) -> np.ndarray:
        return centres[tasks] + rng.standard_normal((len(tasks), 24))

    calib_tasks = rng.integers(0, 3, 600)
    est = ReadoutEstimator(novelty=NoveltyDetector()).fit(draw(calib_tasks), calib_tasks)
    for t in range(60):  # known tasks only, one of them dominating in turn
        p = np.full(3, 0.05)
        p[(t // 10) % 3] = 0.9
        est.observe(draw(rng.choice(3, 128, p=p)))
    assert est.n_new == 0
    for _ in range(5):
        est.observe(draw(rng.choice(4, 128, p=[0.3, 0.3, 0.2, 0.2])))
    assert est.n_new == 1
    mix = est.estimate(draw(rng.choice(4, 400, p=[0.3, 0.3, 0.2, 0.2])))
    assert mix.shape == (4,) and abs(mix[3] - 0.2) < 0.05, mix


def test_online_profile_stabilises() -> None:
    rng = np.random.default_rng(0)
    profile = OnlineProfile(min_requests=16, tol=0.02)
    usage = np.array([0.1, 0.2, 0.7])
    while not profile.stable:
        profile.add({"b": rng.dirichlet(50 * usage, size=8)})
        assert profile.n <= 200
    mean = profile.mean()
    assert mean is not None
    np.testing.assert_allclose(mean["b"], usage, atol=0.03)
