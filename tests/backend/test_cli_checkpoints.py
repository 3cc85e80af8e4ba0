"""A user's checkpoint and task file, end to end from the command line: ``tanbr compare`` on
tiny checkpoints of every supported family, and ``tanbr serve`` on a classifier and on a causal
LM of each family (requests, slot turnovers, feedback, and learning with no feedback at all).

One family of each head runs in the default suite; the others are marked slow (each is a
whole comparison: set-up, runs, latency probes).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from hf_checkpoints import CLASSIFIER_FAMILIES, LM_FAMILIES

from support import wait_until
from tanbr import cli
from tanbr.experiment.records import read_trace
from tanbr.serve.bench import ServerProcess
from tanbr.serve.state import DB_NAME

FAST = [
    "--set", "n_slots=5",
    "--set", "seeds=[0]",
    "--set", "workload.slot_size=16",
    "--set", "workload.period=2",
    "--set", "estimator.head=8",
    "--set", "estimator.n_types=2",
    "--set", "oracle.n_candidates=2",
    "--set", "evaluation.sample=8",
    "--set", "evaluation.workers=1",
    "--set", "evaluation.memory=false",
    "--set", "latency.batches=1",
    "--set", "latency.batch_size=4",
    "--set", "model.dtype=float32",
    "--set", "policies=['tanbr', 'plug-in', 'uniform', 'full-moe']",
]  # fmt: skip
DEFAULT_FAMILIES = {"classifier": "qwen2_moe", "lm": "mixtral"}


def _cases() -> list[Any]:
    cases = []
    for kind, families in (("classifier", CLASSIFIER_FAMILIES), ("lm", LM_FAMILIES)):
        for family in families:
            marks = [] if DEFAULT_FAMILIES[kind] == family else [pytest.mark.slow]
            cases.append(pytest.param(family, kind, marks=marks, id=f"{kind}-{family}"))
    return cases


@pytest.mark.parametrize(("family", "kind"), _cases())
def test_compare_on_a_users_checkpoint_and_task_file(
    family: str,
    kind: str,
    checkpoint: Callable[[str, str], Path],
    task_files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = checkpoint(family, kind)
    args = ["-q", "compare", "--model", str(folder), "--tasks", str(task_files[kind]), *FAST]
    if kind == "lm":  # no head to type requests with: types from the full MoE's gates
        args += ["--set", "estimator.types=gates", "--set", "reward.kind=likelihood"]
    assert cli.main([*args, "--json", "--no-plots", "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    policies = summary["policies"]
    assert set(policies) >= {"tanbr", "plug-in", "uniform", "full-moe", "slot-oracle"}
    for row in policies.values():
        assert 0.0 <= row["accuracy"] <= 1.0
    assert policies["slot-oracle"]["regret"] == 0.0
    assert policies["tanbr"]["param_bytes"] < policies["full-moe"]["param_bytes"]
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    records = list(read_trace(run / "trace.jsonl"))
    assert {r.policy for r in records} >= {"tanbr", "full-moe"}
    assert all(r.reward is not None for r in records if r.policy == "tanbr")


def test_a_folder_the_project_cannot_use_is_refused_before_any_weight_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], task_files: dict[str, Path]
) -> None:
    folder = tmp_path / "dense"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertForSequenceClassification"]})
    )
    code = cli.main(["compare", "--model", str(folder), "--tasks", str(task_files["classifier"])])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"tanbr cannot serve {folder}" in err[0]


def _classifier_cases() -> list[Any]:
    return [
        pytest.param(
            f, marks=[] if f == DEFAULT_FAMILIES["classifier"] else [pytest.mark.slow], id=f
        )
        for f in CLASSIFIER_FAMILIES
    ]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", _classifier_cases())
def test_serve_a_users_classifier_checkpoint(
    family: str,
    checkpoint: Callable[[str, str], Path],
    task_files: dict[str, Path],
    tmp_path: Path,
) -> None:
    """Requests, a slot turnover seen in /v1/status, client feedback, and the shadow reward
    that learns with no feedback at all (the proxy scorer against the full MoE)."""
    folder = checkpoint(family, "classifier")
    proc = ServerProcess(
        ["--model", str(folder), "--tasks", str(task_files["classifier"]), "--threads", "1",
         "--slot-size", "4", "--shadow", "2",
         "--set", "estimator.n_types=2", "--set", "model.dtype=float32"],
        state_dir=tmp_path / "state",
        log_path=tmp_path / "server.log",
    )  # fmt: skip
    proc.start(timeout=300)
    texts = [f"ball goal team match {i}" for i in range(4)] + [
        f"bread soup salt cake {i}" for i in range(4)
    ]
    try:
        with httpx.Client(base_url=proc.url, timeout=120.0) as http:
            r = http.post("/v1/predict", json={"texts": texts[:4]})
            assert r.status_code == 200, r.text
            first = r.json()["predictions"]
            assert {p["label"] for p in first} <= {"sport:win", "sport:lose", "food:tasty",
                                                    "food:bland"}  # fmt: skip
            wait_until(lambda: http.get("/v1/status").json(), lambda s: s["slot"] >= 1)
            r = http.post(
                "/v1/feedback", json={"request_id": first[0]["request_id"], "label": "sport:win"}
            )
            assert r.status_code == 200, r.text
            assert http.post("/v1/predict", json={"texts": texts[4:]}).status_code == 200
            status = wait_until(
                lambda: http.get("/v1/status").json(),
                lambda s: s["slot"] >= 2 and s["policy_updates"] >= 2,
            )
            assert status["feedback"] == 1
    finally:
        proc.kill()
    with sqlite3.connect(tmp_path / "state" / DB_NAME) as db:
        updates = db.execute("SELECT slot, n_feedback FROM updates ORDER BY slot").fetchall()
    assert updates  # client feedback and shadow rewards both became policy updates


@pytest.mark.parametrize("kind", ["classifier", "lm"])
def test_eval_model_on_a_users_checkpoint(
    kind: str,
    checkpoint: Callable[[str, str], Path],
    task_files: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = checkpoint(DEFAULT_FAMILIES[kind], kind)
    args = ["-q", "eval-model", "--model", str(folder), "--tasks", str(task_files[kind])]
    assert cli.main([*args, "--repeats", "1", "--json", "--dtype", "float32"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metric"] == ("accuracy" if kind == "classifier" else "likelihood")
    assert set(report["mean"]) == {"full_moe", "uniform", "frequency", "own_merge"}
    for row in report["tasks"].values():
        assert all(0.0 <= v <= 1.0 for v in row.values())
    assert report["latency"]["merged_ms"] > 0 and report["latency"]["full_ms"] > 0
    assert cli.main(["eval-model", "--model", str(folder)]) == 2  # no task file: one line
    assert "give your task file" in capsys.readouterr().err


def _lm_cases() -> list[Any]:
    return [
        pytest.param(f, marks=[] if f == DEFAULT_FAMILIES["lm"] else [pytest.mark.slow], id=f)
        for f in LM_FAMILIES
    ]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", _lm_cases())
def test_serve_a_users_causal_lm_checkpoint(
    family: str,
    checkpoint: Callable[[str, str], Path],
    task_files: dict[str, Path],
    tmp_path: Path,
) -> None:
    """A causal LM of each family behind ``tanbr serve``: completions (whole and streamed)
    through the OpenAI client, slot turnovers, and the policy learning from the full MoE's
    scores of a sample of completions, with no client feedback at all."""
    import openai

    folder = checkpoint(family, "lm")
    proc = ServerProcess(
        ["--model", str(folder), "--tasks", str(task_files["lm"]), "--threads", "1",
         "--slot-size", "2", "--shadow", "2",
         "--set", "estimator.n_types=2", "--set", "model.dtype=float32"],
        state_dir=tmp_path / "state",
        log_path=tmp_path / "server.log",
    )  # fmt: skip
    proc.start(timeout=300)
    try:
        client = openai.OpenAI(base_url=f"{proc.url}/v1", api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        for i in range(4):
            reply = client.completions.create(
                model=model, prompt=f"the team won the match {i}", max_tokens=4, seed=i
            )
            assert reply.usage is not None and 1 <= reply.usage.completion_tokens <= 4
        pieces = client.completions.create(
            model=model, prompt="bread and soup", max_tokens=4, stream=True, temperature=0
        )
        assert [c for c in pieces if c.choices]  # streamed chunks arrived
        with httpx.Client(base_url=proc.url, timeout=120.0) as http:
            for i in range(12):  # more slots of two, until a second turnover is seen
                if http.get("/v1/status").json()["slot"] >= 2:
                    break
                client.completions.create(model=model, prompt=f"salt cake {i}", max_tokens=2)
            status = wait_until(
                lambda: http.get("/v1/status").json(),
                lambda s: s["slot"] >= 2 and s["policy_updates"] >= 1,
            )
        assert status["feedback"] == 0
    finally:
        proc.kill()
