from __future__ import annotations

import pickle

import numpy as np
import pytest

from tanbr.experiment.estimator import (
    ClusterEstimator,
    Forecaster,
    TagEstimator,
    choose_n_types,
    kmeans,
    match_clusters,
    to_tasks,
    tv_distance,
)


def blobs(
    rng: np.random.Generator, centers: np.ndarray, tasks: np.ndarray, noise: float = 0.15
) -> np.ndarray:
    """Signatures of requests of the given tasks: one noisy blob per task."""
    return centers[tasks] + noise * rng.standard_normal((len(tasks), centers.shape[1]))


@pytest.fixture
def world() -> tuple[np.random.Generator, np.ndarray]:
    rng = np.random.default_rng(0)
    centers = 3.0 * rng.standard_normal((5, 16))  # 5 tasks, 16-d signatures
    return rng, centers


def test_kmeans_recovers_separated_clusters(world: tuple[np.random.Generator, np.ndarray]) -> None:
    rng, centers = world
    tasks = rng.integers(0, 5, 1000)
    x = blobs(rng, centers, tasks)
    found, _ = kmeans(x, 5, rng=rng)
    # every true centre has a found centre close to it
    d = np.linalg.norm(centers[:, None] - found[None], axis=2)
    assert d.min(1).max() < 0.1


def test_discovers_number_of_task_types(world: tuple[np.random.Generator, np.ndarray]) -> None:
    rng, centers = world
    x = blobs(rng, centers, rng.integers(0, 5, 800))
    assert choose_n_types(x, rng=rng, max_types=8) == 5


def test_matching_and_tv_on_held_out_mixes(world: tuple[np.random.Generator, np.ndarray]) -> None:
    rng, centers = world
    calib_tasks = rng.integers(0, 5, 1500)
    est = ClusterEstimator(rng=np.random.default_rng(1), n_types=5, prior_strength=0.0)
    est.fit(blobs(rng, centers, calib_tasks))  # unlabeled: tags are not passed
    mapping = match_clusters(est.assign(blobs(rng, centers, calib_tasks)), calib_tasks, 5, 5)
    assert sorted(mapping.tolist()) == [0, 1, 2, 3, 4]
    tvs = []
    for _ in range(50):
        true = rng.dirichlet(np.full(5, 0.5))
        tasks = rng.choice(5, size=128, p=true)
        mix = est.estimate(blobs(rng, centers, tasks))
        empirical = np.bincount(tasks, minlength=5) / 128
        tvs.append(tv_distance(to_tasks(mix, mapping, 5), empirical))
    assert np.mean(tvs) < 0.01


def test_overlapping_tasks_bound_tv(world: tuple[np.random.Generator, np.ndarray]) -> None:
    """With noisy signatures the head's TV is bounded by the misassignment rate."""
    rng, centers = world
    calib_tasks = rng.integers(0, 5, 1500)
    est = ClusterEstimator(rng=np.random.default_rng(1), n_types=5, prior_strength=0.0)
    est.fit(blobs(rng, centers, calib_tasks, noise=2.0))
    x = blobs(rng, centers, calib_tasks, noise=2.0)
    mapping = match_clusters(est.assign(x), calib_tasks, 5, 5)
    error = float((mapping[est.assign(x)] != calib_tasks).mean())
    tasks = rng.choice(5, size=2000, p=[0.5, 0.2, 0.1, 0.1, 0.1])
    mix = to_tasks(est.estimate(blobs(rng, centers, tasks, noise=2.0)), mapping, 5)
    assert tv_distance(mix, np.bincount(tasks, minlength=5) / 2000) <= error + 0.03


def test_forecast_follows_history_and_head_sharpens(
    world: tuple[np.random.Generator, np.ndarray],
) -> None:
    rng, centers = world
    est = ClusterEstimator(rng=np.random.default_rng(2), n_types=5, alpha=0.5, prior_strength=16)
    est.fit(blobs(rng, centers, rng.integers(0, 5, 1000)))
    mapping = match_clusters(est.assign(centers), np.arange(5), 5, 5)
    for _ in range(10):  # history: task 2 only
        est.observe(blobs(rng, centers, np.full(128, 2)))
    forecast = to_tasks(est.estimate(None), mapping, 5)
    assert forecast[2] > 0.99
    # the head says task 4: a 32-request head outweighs a prior of strength 16
    mix = to_tasks(est.estimate(blobs(rng, centers, np.full(32, 4))), mapping, 5)
    assert mix[4] == pytest.approx(32 / 48, abs=1e-6)
    assert mix.sum() == pytest.approx(1.0)


def test_online_update_follows_drifting_signatures(
    world: tuple[np.random.Generator, np.ndarray],
) -> None:
    rng, centers = world
    est = ClusterEstimator(rng=np.random.default_rng(3), n_types=5, normalize=False)
    tasks = rng.integers(0, 5, 1000)
    est.fit(blobs(rng, centers, tasks))
    shifted = centers + 1.0  # the signature distribution drifts by a distance of 4
    for _ in range(40):
        est.observe(blobs(rng, shifted, rng.integers(0, 5, 128)))
    assert est.centers is not None
    d = np.linalg.norm(shifted[:, None] - est.centers[None], axis=2)
    assert d.min(1).max() < 1.0  # followed most of the way


def test_holt_tracks_a_trend_better_than_ema() -> None:
    ema, holt = Forecaster(2, "ema", alpha=0.3), Forecaster(2, "holt", alpha=0.3, beta=0.3)
    err = {"ema": 0.0, "holt": 0.0}
    for t in range(40):
        p = np.array([0.1 + 0.02 * t, 0.9 - 0.02 * t])
        for name, f in (("ema", ema), ("holt", holt)):
            if t > 10:
                err[name] += tv_distance(f.forecast(), p)
            f.update(p)
    assert err["holt"] < 0.5 * err["ema"]


def test_label_free_estimator_refuses_tags_and_oracle_needs_them(
    world: tuple[np.random.Generator, np.ndarray],
) -> None:
    rng, centers = world
    est = ClusterEstimator(rng=rng, n_types=5).fit(blobs(rng, centers, rng.integers(0, 5, 200)))
    with pytest.raises(ValueError, match="label-free"):
        est.estimate(centers, tasks=np.arange(5))
    oracle = TagEstimator(n_types=5, prior_strength=0.0)
    with pytest.raises(ValueError, match="reads task tags"):
        oracle.estimate(centers)
    assert oracle.estimate(centers, tasks=np.array([1, 1, 3, 3, 3])).tolist() == [
        0.0, 0.4, 0.0, 0.6, 0.0,
    ]  # fmt: skip


def test_bad_signatures_are_rejected(world: tuple[np.random.Generator, np.ndarray]) -> None:
    rng, centers = world
    est = ClusterEstimator(rng=rng, n_types=3)
    with pytest.raises(ValueError, match="not fitted"):
        est.estimate(centers)
    with pytest.raises(ValueError, match="2-D"):
        est.fit(np.zeros(10))
    with pytest.raises(ValueError, match="NaN"):
        est.fit(np.full((10, 3), np.nan))
    est.fit(blobs(rng, centers, rng.integers(0, 5, 100)))
    with pytest.raises(ValueError, match="features"):
        est.estimate(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="n_types"):
        ClusterEstimator(rng=rng, n_types=1)


def test_estimator_pickles_and_continues_identically(
    world: tuple[np.random.Generator, np.ndarray],
) -> None:
    rng, centers = world
    est = ClusterEstimator(rng=np.random.default_rng(5), n_types=5, forecast="holt")
    est.fit(blobs(rng, centers, rng.integers(0, 5, 500)))
    est.observe(blobs(rng, centers, rng.integers(0, 5, 128)))
    copy = pickle.loads(pickle.dumps(est))
    batch = blobs(rng, centers, rng.integers(0, 5, 128))
    est.observe(batch)
    copy.observe(batch)
    np.testing.assert_array_equal(est.estimate(batch[:16]), copy.estimate(batch[:16]))
