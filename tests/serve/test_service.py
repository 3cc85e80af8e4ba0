"""The service end to end: a real ``tanbr serve`` subprocess on loopback, a real HTTP client."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from support import wait_until
from tanbr.serve.bench import ServerProcess
from tanbr.serve.state import DB_NAME

from .conftest import TOKEN

pytestmark = [pytest.mark.data, pytest.mark.timeout(600)]

AUTH = {"Authorization": f"Bearer {TOKEN}"}
TEXTS = [
    "A warm, funny and beautifully acted film.",
    "Die Sitzung ist eröffnet, wir beginnen mit der Tagesordnung.",
    "What is your favourite programming language?",
    "Stocks fell sharply in Asia after the central bank decision.",
    "The senator spoke about jobs and the economy tonight.",
    "New study links sugary drinks to heart disease.",
    "La sesión se levanta a las ocho de la tarde.",
    "Boring, predictable and far too long.",
    "Do you like to eat pizza?",
    "De vergadering is gesloten.",
]


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the read/write tests of this module: slots of 8 texts, a token."""
    folder = tmp_path_factory.mktemp("service")
    proc = ServerProcess(
        ["--model", str(tiny_model), "--threads", "1", "--slot-size", "8", "--max-texts", "16"],
        state_dir=folder / "state",
        log_path=folder / "server.log",
        env={"TANBR_SERVE_TOKEN": TOKEN},
    )
    proc.start(timeout=300)
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=120.0) as client:
        yield client


def _predict(http: httpx.Client, texts: list[str]) -> list[dict[str, Any]]:
    r = http.post("/v1/predict", json={"texts": texts})
    assert r.status_code == 200, r.text
    predictions: list[dict[str, Any]] = r.json()["predictions"]
    return predictions


def test_predictions_feedback_and_slot_turnover(server: ServerProcess, http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok", "slot": 0}
    status = http.get("/v1/status").json()
    assert status["slot"] == 0 and status["kind"] == "merge" and status["merges"] == 1
    assert status["boundary_busy"] is False  # slot 0 serves; no boundary is due yet
    assert status["policy"] == "tanbr" and len(status["action"]) == len(status["mix"])
    for coeffs in status["coeffs"].values():
        assert min(coeffs) >= 0 and abs(sum(coeffs) - 1) < 1e-5
    slot0_coeffs = status["coeffs"]

    # --- one text, then a batch: labels, probabilities, ids, slot
    one = http.post("/v1/predict", json={"text": TEXTS[0]})
    assert one.status_code == 200
    [first] = one.json()["predictions"]
    assert first["slot"] == 0 and len(first["request_id"]) == 32
    probs = first["probs"]
    assert abs(sum(probs.values()) - 1) < 1e-4 and first["label"] == max(probs, key=probs.get)
    assert all(":" in label for label in probs)  # joint "task:label" names
    batch = _predict(http, TEXTS[1:5])
    assert [p["slot"] for p in batch] == [0] * 4
    assert len({p["request_id"] for p in [first, *batch]}) == 5

    # --- feedback: a true label, and a reward; both count for slot 0
    fb = http.post(
        "/v1/feedback",
        json={"request_id": first["request_id"], "label": first["label"]},
        headers=AUTH,
    )
    assert fb.status_code == 200, fb.text
    assert fb.json()["slot"] == 0 and fb.json()["correct"] is True and fb.json()["reward"] == 1.0
    fb = http.post(
        "/v1/feedback", json={"request_id": batch[0]["request_id"], "reward": 0.25}, headers=AUTH
    )
    assert fb.status_code == 200 and fb.json()["correct"] is None and fb.json()["pending"] == 2

    # --- slot 0 fills up (8 texts): the boundary re-merges off the request path
    _predict(http, TEXTS[5:8])
    status = wait_until(lambda: http.get("/v1/status").json(), lambda s: s["slot"] >= 1)
    assert status["merges"] >= 2 and status["policy_updates"] >= 1
    assert status["pending_feedback"] == 0
    later = _predict(http, TEXTS[:2])
    assert all(p["slot"] >= 1 for p in later)

    # --- late feedback for a slot-0 request counts for slot 0 at the next boundary
    fb = http.post(
        "/v1/feedback",
        json={"request_id": batch[1]["request_id"], "label": "rt_sentiment:fresh"},
        headers=AUTH,
    )
    assert fb.status_code == 200 and fb.json()["slot"] == 0
    closed = http.post("/v1/admin/close-slot", headers=AUTH)
    assert closed.status_code == 200
    assert closed.json()["slot"] == closed.json()["closed"] + 1
    status = http.get("/v1/status").json()
    assert status["pending_feedback"] == 0 and status["feedback"] == 3
    with sqlite3.connect(server.state_dir / DB_NAME) as db:
        updates = db.execute("SELECT slot, reward, n_feedback FROM updates ORDER BY id").fetchall()
        served = db.execute("SELECT COUNT(*) FROM requests").fetchone()[0]
        history = db.execute("SELECT slot, close_reason FROM slots ORDER BY slot").fetchall()
    # slot 0 learned twice: (label right + reward 0.25) / 2, then the late label alone
    late_reward = float(batch[1]["label"] == "rt_sentiment:fresh")
    assert updates == [(0, pytest.approx(0.625), 2), (0, late_reward, 1)]
    assert served == 10 and status["requests"] == 10
    assert history[0] == (0, "count") and history[-2][1] == "admin"
    assert status["merges"] == len(history) and status["slot"] == history[-1][0]
    # a re-merge: every slot's coeffs are a fresh plan on the simplex
    for coeffs in status["coeffs"].values():
        assert abs(sum(coeffs) - 1) < 1e-5
    assert set(status["coeffs"]) == set(slot0_coeffs)

    # --- metrics and docs
    metrics = http.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert f"tanbr_merges_total {float(status['merges'])}" in text
    assert "tanbr_predictions_total 10.0" in text
    assert 'tanbr_feedback_total{kind="label"} 2.0' in text
    assert 'tanbr_http_requests_total{endpoint="/v1/predict",status="200"}' in text
    spec = http.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/feedback", "/v1/status", "/healthz", "/metrics"} <= set(
        spec["paths"]
    )
    assert http.get("/docs").status_code == 200


BAD_PREDICTS = [
    ({"text": ""}, 422, "text is empty"),
    ({"text": "   \n"}, 422, "text is empty"),
    ({"text": "x" * 2001}, 422, "2001 characters; the limit is 2000"),
    ({"texts": []}, 422, "texts is empty"),
    ({"texts": ["ok"] * 17}, 422, "17 texts; the limit is 16"),
    ({"texts": ["fine", ""]}, 422, "texts[1] is empty"),
    ({"texts": ["fine", 3]}, 422, "texts[1]: Input should be a valid string"),
    ({"text": 42}, 422, "text: Input should be a valid string"),
    ({"text": ["a"]}, 422, "text: Input should be a valid string"),
    ({"txt": "a"}, 422, "txt: Extra inputs are not permitted"),
    ({"text": "a", "texts": ["b"]}, 422, "exactly one of 'text'"),
    ({}, 422, "exactly one of 'text'"),
    ([1, 2], 422, "must be a JSON object"),
    ("just a string", 422, "must be a JSON object"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD_PREDICTS)
def test_bad_predict_input_is_a_4xx_naming_the_problem(
    http: httpx.Client, body: Any, status: int, message: str
) -> None:
    r = http.post("/v1/predict", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]


def test_bad_bodies_and_feedback_are_4xx(http: httpx.Client) -> None:
    raw = [
        (b'{"text": "a', 422, "not valid JSON"),
        (b"", 422, "a JSON body is required"),
        (b"\xff\xfe\x00", 400, "could not be parsed as JSON"),
        (b'{"text": "\xff"}', 400, "could not be parsed as JSON"),
        (b'{"texts": ["ok", "\\ud800 lone"]}', 422, "texts[1] is not valid Unicode"),
    ]
    for content, status, message in raw:
        r = http.post("/v1/predict", content=content, headers={"content-type": "application/json"})
        assert r.status_code == status and message in r.json()["detail"], r.text
    nan = http.post(
        "/v1/feedback",
        content=b'{"request_id": "abc", "reward": NaN}',
        headers={**AUTH, "content-type": "application/json"},
    )
    assert nan.status_code == 422 and "reward: Input should be a finite number" in nan.text
    huge = http.post(
        "/v1/predict",
        content=b'{"text": "' + b"a" * (1 << 20) + b'"}',
        headers={"content-type": "application/json"},
    )
    assert huge.status_code == 413 and "over the limit" in huge.json()["detail"]

    [served] = _predict(http, ["A fine film."])
    rid = served["request_id"]
    cases: list[tuple[dict[str, Any], dict[str, str], int, str]] = [
        ({"request_id": rid, "label": "x:y"}, {}, 401, "missing bearer token"),
        ({"request_id": rid, "label": "x:y"}, {"Authorization": "Bearer nope"}, 401, "wrong"),
        ({"request_id": rid, "label": "no:such-label"}, AUTH, 422, "not one of the model's"),
        ({"request_id": rid, "reward": 1.5}, AUTH, 422, "reward: Input should be less"),
        ({"request_id": rid, "reward": "high"}, AUTH, 422, "reward: Input should be a valid"),
        ({"request_id": rid}, AUTH, 422, "exactly one of 'label'"),
        ({"request_id": rid, "label": "a", "reward": 1.0}, AUTH, 422, "exactly one of 'label'"),
        ({"request_id": 7, "reward": 1.0}, AUTH, 422, "request_id: Input should be a valid"),
        ({"request_id": "f" * 32, "reward": 1.0}, AUTH, 404, "unknown request id"),
        ({"request_id": "", "reward": 1.0}, AUTH, 422, "request_id"),
    ]
    for body, headers, status, message in cases:
        r = http.post("/v1/feedback", json=body, headers=headers)
        assert r.status_code == status, (body, r.text)
        assert message in r.json()["detail"], (body, r.text)
    assert http.post(
        "/v1/feedback", json={"request_id": rid, "reward": 0.5}, headers=AUTH
    ).is_success
    again = http.post("/v1/feedback", json={"request_id": rid, "reward": 0.5}, headers=AUTH)
    assert again.status_code == 409 and "already given" in again.json()["detail"]
    assert http.post("/v1/admin/close-slot").status_code == 401
    assert http.get("/no/such/path").status_code == 404
    assert http.get("/v1/predict").status_code == 405
    # nothing above was a server error, and the service still serves
    metrics = http.get("/metrics").text
    assert 'status="5' not in metrics
    assert http.get("/healthz").status_code == 200


def test_restart_after_kill_resumes_and_loses_no_feedback(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    state = tmp_path / "state"
    first = start_server("--slot-size", "6", state_dir=state)
    acknowledged: list[str] = []
    with httpx.Client(base_url=first.url, timeout=120.0) as http:
        rng = np.random.default_rng(0)
        for round_ in range(3):
            for p in _predict(http, [TEXTS[i] for i in rng.choice(len(TEXTS), size=4)]):
                r = http.post(
                    "/v1/feedback",
                    json={"request_id": p["request_id"], "reward": round_ / 2},
                    headers=AUTH,
                )
                assert r.status_code == 200
                acknowledged.append(p["request_id"])
        http.post("/v1/admin/close-slot", headers=AUTH).raise_for_status()
        # feedback acknowledged after the last boundary: pending, in SQLite only
        for p in _predict(http, TEXTS[:3]):
            r = http.post(
                "/v1/feedback", json={"request_id": p["request_id"], "reward": 1.0}, headers=AUTH
            )
            assert r.status_code == 200
            acknowledged.append(p["request_id"])
        before = http.get("/v1/status").json()
    assert before["pending_feedback"] == 3 and before["slot_requests"] == 3
    first.kill()  # SIGKILL: no shutdown code runs

    second = start_server("--slot-size", "6", "--slot-seconds", "1.5", state_dir=state)
    with httpx.Client(base_url=second.url, timeout=120.0) as http:
        after = http.get("/v1/status").json()
        for key in ("slot", "slot_requests", "requests", "feedback", "pending_feedback"):
            assert after[key] == before[key], key
        assert after["policy_updates"] == before["policy_updates"]
        assert after["mix"] == before["mix"] and after["action"] == before["action"]
        assert after["coeffs"] == before["coeffs"]
        assert after["merges"] == before["merges"] + 1  # the slot's model, built again
        for rid in acknowledged:  # every acknowledged feedback is still known
            r = http.post("/v1/feedback", json={"request_id": rid, "reward": 0.0}, headers=AUTH)
            assert r.status_code == 409, r.text
        # the pending feedback is learned at the next boundary, here one closed by time
        _predict(http, TEXTS[3:4])
        status = wait_until(
            lambda: http.get("/v1/status").json(), lambda s: s["slot"] > before["slot"]
        )
        assert status["pending_feedback"] == 0
        assert status["policy_updates"] > before["policy_updates"]
    with sqlite3.connect(state / DB_NAME) as db:
        reasons = [r[0] for r in db.execute("SELECT close_reason FROM slots ORDER BY slot")]
    assert reasons[-2] == "time"


def test_bad_start_arguments_are_one_line_errors(tiny_model: Path, tmp_path: Path) -> None:
    from tanbr.cli import main

    state = ["--state-dir", str(tmp_path / "state")]  # never the default folder in the cwd
    bad = [
        ["serve", "--model", str(tmp_path / "missing"), "--port", "0", *state],
        ["serve", "--model", str(tiny_model), "--policy", "task-oracle", "--port", "0", *state],
        ["serve", "--model", str(tiny_model), "--slot-size", "0", "--port", "0", *state],
        ["serve", "--model", str(tiny_model), "--port", "70000", *state],
        ["serve", "--model", str(tiny_model), "--set", "parameterization.kind=task-regmean",
         "--port", "0", *state],
    ]  # fmt: skip
    for argv in bad:
        assert main(argv) == 2, argv


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
_fields = st.sampled_from(["text", "texts", "request_id", "label", "reward"])


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=_json | st.dictionaries(_fields, _json, max_size=3),
    path=st.sampled_from(["/v1/predict", "/v1/feedback"]),
)
def test_random_bodies_never_cause_a_server_error(http: httpx.Client, body: Any, path: str) -> None:
    r = http.post(path, json=body, headers=AUTH)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert isinstance(r.json()["detail"], str) and r.json()["detail"]


@pytest.mark.slow
def test_kill_under_concurrent_load_loses_no_acknowledged_feedback(
    start_server: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """Clients predict and give feedback while slots turn every 4 texts; SIGKILL mid-stream."""
    import threading

    state = tmp_path / "state"
    server = start_server("--slot-size", "4", state_dir=state)
    acknowledged: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=server.url, timeout=30.0) as http:
            while not stop.is_set():
                try:
                    [p] = _predict(http, [TEXTS[int(rng.integers(len(TEXTS)))]])
                    r = http.post(
                        "/v1/feedback",
                        json={"request_id": p["request_id"], "reward": float(rng.random())},
                        headers=AUTH,
                    )
                except (httpx.HTTPError, AssertionError):
                    return  # the server died under us
                if r.status_code == 200:
                    with lock:
                        acknowledged.append(p["request_id"])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    wait_until(lambda: {"n": len(acknowledged)}, lambda v: v["n"] >= 60)
    server.kill()
    stop.set()
    for t in threads:
        t.join(60)
    survivor = start_server("--slot-size", "4", state_dir=state)
    with httpx.Client(base_url=survivor.url, timeout=60.0) as http:
        status = http.get("/v1/status").json()
        assert status["feedback"] >= len(acknowledged)
        for rid in acknowledged:
            r = http.post("/v1/feedback", json={"request_id": rid, "reward": 0.0}, headers=AUTH)
            assert r.status_code == 409, r.text
        closed = http.post("/v1/admin/close-slot", headers=AUTH).json()
        assert closed["slot"] == status["slot"] + 1
        assert http.get("/v1/status").json()["pending_feedback"] == 0


def test_a_second_server_on_the_same_state_folder_is_refused(
    server: ServerProcess, tiny_model: Path
) -> None:
    from tanbr.cli import main

    code = main(["serve", "--model", str(tiny_model), "--state-dir", str(server.state_dir)])
    assert code == 2  # a one-line error, before any model is loaded


def test_the_policy_learns_without_any_feedback(tiny_model: Path, tmp_path: Path) -> None:
    """Label-free all the way: with the proxy reward, each closing slot's sample is scored
    against the full MoE at the boundary, and the policy updates with no client feedback."""
    proc = ServerProcess(
        ["--model", str(tiny_model), "--threads", "1", "--slot-size", "4", "--max-texts", "16",
         "--set", "reward.kind=proxy", "--shadow", "3"],
        state_dir=tmp_path / "state",
        log_path=tmp_path / "server.log",
    )  # fmt: skip
    proc.start(timeout=300)
    try:
        with httpx.Client(base_url=proc.url, timeout=120.0) as http:
            for slot in range(2):  # fill a slot, then wait until the next one serves
                _predict(http, (TEXTS * 2)[4 * slot : 4 * slot + 4])
                wait_until(lambda: http.get("/v1/status").json(), lambda s: s["slot"] > slot)  # noqa: B023
            status = wait_until(
                lambda: http.get("/v1/status").json(), lambda s: s["policy_updates"] >= 2
            )
            assert status["feedback"] == 0 and status["slot"] >= 2
    finally:
        proc.kill()
    with sqlite3.connect(tmp_path / "state" / DB_NAME) as db:
        rows = db.execute("SELECT slot, reward, n_feedback FROM updates ORDER BY slot").fetchall()
    assert rows and all(0.0 <= r[1] <= 1.0 and r[2] == 3 for r in rows)
