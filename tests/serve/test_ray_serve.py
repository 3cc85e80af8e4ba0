"""The service on Ray Serve: two replicas behind one HTTP entry point and one controller.

A local Ray of 2 CPUs for the module. The lock is checked on a controller alone; the service
tests share one service on the tiny model (requests, a slot turnover that both replicas
follow, feedback, a replica killed mid-traffic, the lock while it runs) and are marked slow:
Ray Serve's proxy, its controller and two replicas take minutes to start on a loaded 2-core
machine."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'tanbr[ray]')")
httpx = pytest.importorskip("httpx")

from support import free_port, wait_until  # noqa: E402
from tanbr.serve.ray_serve import REPLICA_HEADER, RayService, start_controller, start_service  # noqa: E402
from tanbr.serve.replicas import ServeConfig  # noqa: E402
from tanbr.serve.slots import SlotConfig  # noqa: E402
from tanbr.serve.state import StateFolderInUseError, StateLock  # noqa: E402

TEXTS = ["a warm and funny film", "stocks fell sharply today", "the senator spoke at length"]


@pytest.fixture(scope="module")
def service(
    local_ray: None, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RayService, ServeConfig]]:
    config = ServeConfig(
        model=str(tiny_model),
        state_dir=tmp_path_factory.mktemp("ray-serve") / "state",
        slots=SlotConfig(slot_size=10_000, observe_max=16),
    )
    svc = start_service(config, replicas=2, port=free_port())
    try:
        yield svc, config
    finally:
        svc.shutdown()


def test_a_controller_is_refused_a_state_folder_in_use(
    local_ray: None, tiny_model: Path, tmp_path: Path
) -> None:
    """A single-process ``tanbr serve`` holds the folder: a controller on Ray is refused with
    the error the command line prints, before it loads anything."""
    config = ServeConfig(model=str(tiny_model), state_dir=tmp_path / "state")
    refused = pytest.raises(StateFolderInUseError, match="in use by another tanbr serve")
    with StateLock(config.state_dir), refused:
        start_controller(config, "tanbr-controller-refused")
    assert not (tmp_path / "state" / "service.sqlite3").exists()


@pytest.mark.slow
def test_a_second_service_on_the_cluster_is_refused(
    service: tuple[RayService, ServeConfig], tmp_path: Path
) -> None:
    """One tanbr service per Ray cluster (one HTTP proxy, one route): a second is refused by
    name before it loads anything, and the first keeps serving."""
    svc, config = service
    other = ServeConfig(model=config.model, state_dir=tmp_path / "state")
    with pytest.raises(ValueError, match="already runs on this Ray cluster"):
        start_service(other, replicas=1, port=free_port())
    assert not (tmp_path / "state").exists()
    with httpx.Client(base_url=svc.url, timeout=60) as client:
        assert _predict(client, TEXTS[:1]).status_code == 200


def _predict(client: Any, texts: list[str]) -> Any:
    return client.post("/v1/predict", json={"texts": texts})


def _both_replicas(client: Any, n: int = 40) -> dict[str, int]:
    """Send predict calls until both replicas have answered; the slot each one served."""
    seen: dict[str, int] = {}
    for _ in range(n):
        r = _predict(client, TEXTS[:1])
        assert r.status_code == 200, r.text
        seen[r.headers[REPLICA_HEADER]] = r.json()["predictions"][0]["slot"]
        if len(seen) == 2:
            break
    return seen


@pytest.mark.slow
def test_requests_and_errors_as_the_single_process_service(
    service: tuple[RayService, ServeConfig],
) -> None:
    svc, _ = service
    with httpx.Client(base_url=svc.url, timeout=60) as client:
        r = _predict(client, TEXTS)
        assert r.status_code == 200
        predictions = r.json()["predictions"]
        assert len(predictions) == 3 and all(p["label"] in p["probs"] for p in predictions)
        r = _predict(client, [])
        assert r.status_code == 422 and r.json() == {
            "detail": "texts is empty: send at least one text"
        }
        r = client.post("/v1/feedback", json={"request_id": "nope", "reward": 1.0})
        assert r.status_code == 404 and "unknown request id" in r.json()["detail"]
        assert client.get("/healthz").json()["status"] == "ok"
        assert len(_both_replicas(client)) == 2  # one entry point, two replicas behind it


@pytest.mark.slow
def test_a_slot_turnover_reaches_both_replicas(service: tuple[RayService, ServeConfig]) -> None:
    svc, _ = service
    with httpx.Client(base_url=svc.url, timeout=120) as client:
        before = client.get("/v1/status").json()
        r = client.post("/v1/admin/close-slot")
        assert r.status_code == 200, r.text
        closed, slot = r.json()["closed"], r.json()["slot"]
        assert closed == before["slot"] and slot == closed + 1
        # close-slot returns once every live replica swapped: both serve the new slot now
        assert set(svc.replicas().values()) == {slot}
        assert set(_both_replicas(client).values()) == {slot}
        status = client.get("/v1/status").json()
        assert status["slot"] == slot and status["merges"] >= before["merges"]
    assert svc.propagation_ms() and all(ms > 0 for ms in svc.propagation_ms())


@pytest.mark.slow
def test_feedback_is_acknowledged_once_and_learned(
    service: tuple[RayService, ServeConfig],
) -> None:
    svc, _ = service
    with httpx.Client(base_url=svc.url, timeout=120) as client:
        predictions = _predict(client, TEXTS).json()["predictions"]
        before = client.get("/v1/status").json()
        for p in predictions:
            r = client.post(
                "/v1/feedback", json={"request_id": p["request_id"], "label": p["label"]}
            )
            assert r.status_code == 200 and r.json()["correct"] is True
        again = {"request_id": predictions[0]["request_id"], "reward": 0.5}
        assert client.post("/v1/feedback", json=again).status_code == 409
        status = client.get("/v1/status").json()
        assert status["feedback"] == before["feedback"] + 3
        assert status["pending_feedback"] >= 3
        assert client.post("/v1/admin/close-slot").status_code == 200
        status = client.get("/v1/status").json()
        assert status["pending_feedback"] == 0  # learned at the boundary
        assert status["policy_updates"] > before["policy_updates"]


@pytest.mark.slow
def test_a_replica_killed_mid_traffic_loses_no_feedback(
    service: tuple[RayService, ServeConfig],
) -> None:
    """Clients keep sending predictions and feedback while one replica is killed: every
    acknowledged feedback is stored (sending it again is refused as a duplicate), the service
    keeps answering, and once Ray Serve has replaced the replica no call fails."""
    svc, _ = service
    acked: list[str] = []
    failures: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=svc.url, timeout=60) as client:
            while not stop.is_set():
                try:
                    r = _predict(client, TEXTS[:2])
                    if r.status_code != 200:
                        failures.append(r.status_code)
                        continue
                    rid = r.json()["predictions"][0]["request_id"]
                    f = client.post("/v1/feedback", json={"request_id": rid, "reward": 1.0})
                    if f.status_code == 200:
                        acked.append(rid)
                    else:
                        failures.append(f.status_code)
                except httpx.HTTPError:
                    failures.append(0)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        time.sleep(2.0)
        victim = _replica_actors()[0]
        ray.kill(victim, no_restart=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # Ray Serve starts a replacement
            if len(_replica_actors()) == 2 and len(svc.replicas()) == 2:
                break
            time.sleep(1.0)
        else:
            pytest.fail("the killed replica was not replaced within 120 s")
        time.sleep(3.0)
    finally:
        stop.set()
        thread.join(60)
    assert acked, "no feedback was acknowledged during the test"
    with httpx.Client(base_url=svc.url, timeout=60) as client:
        after = [(_predict(client, TEXTS[:1])).status_code for _ in range(30)]
        assert after == [200] * 30  # zero errors after recovery
        # the proxy learns of the replacement a little after Ray Serve reports it running
        wait_until(lambda: _both_replicas(client), lambda seen: len(seen) == 2, timeout_s=60)
        for rid in acked:  # every acknowledged feedback is stored
            r = client.post("/v1/feedback", json={"request_id": rid, "reward": 1.0})
            assert r.status_code == 409, (rid, r.text)


def _replica_actors() -> list[Any]:
    """Ray Serve's live replica actors (named ``SERVE_REPLICA::...``)."""
    named = ray.util.list_named_actors(all_namespaces=True)
    names = sorted(a["name"] for a in named if a["name"].startswith("SERVE_REPLICA::"))
    return [ray.get_actor(name, namespace="serve") for name in names]


@pytest.mark.slow
def test_a_second_controller_on_the_state_folder_is_refused(
    service: tuple[RayService, ServeConfig],
) -> None:
    _, config = service
    with pytest.raises(StateFolderInUseError, match="in use by another tanbr serve"):
        start_controller(config, "tanbr-controller-second")
    with pytest.raises(StateFolderInUseError):  # and so is a single-process tanbr serve
        StateLock(config.state_dir).acquire()
