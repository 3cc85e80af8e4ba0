"""Four tasks the project has never seen (real text the installed packages ship), end to end:
``tanbr tasks example`` writes them, ``tanbr build-model --tasks`` builds the embedded recipe on
them, ``tanbr compare --model`` runs the comparison, ``tanbr serve --model`` serves them."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tanbr import cli
from tanbr.serve.bench import ServerProcess

pytestmark = [pytest.mark.data, pytest.mark.timeout(900)]

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.toml"


def test_a_users_four_new_tasks_through_build_compare_and_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tasks = tmp_path / "my-tasks.jsonl"
    assert cli.main(["-q", "tasks", "example", str(tasks), "--per-task", "80"]) == 0
    capsys.readouterr()
    assert cli.main(["-q", "build-model", "--variant", "tiny", "--tasks", str(tasks)]) == 0
    folder = Path(capsys.readouterr().out.splitlines()[0])
    info = json.loads((folder / "tasks.json").read_text())
    assert info["tasks"] == ["debate_speaker", "hamlet_speaker", "chat_topic_pt", "novel_zh"]
    assert info["data"]["task_file"] == str(tasks.resolve())

    args = ["-q", "compare", str(CONFIG), "--model", str(folder), "--set", "n_slots=4",
            "--set", "evaluation.memory=false", "--set", "latency.batches=1",
            "--json", "--no-plots", "--out", str(tmp_path / "runs")]  # fmt: skip
    assert cli.main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {"tanbr", "plug-in", "full-moe", "slot-oracle"} <= set(summary["policies"])

    proc = ServerProcess(
        ["--model", str(folder), "--threads", "1", "--slot-size", "4"],
        state_dir=tmp_path / "state",
        log_path=tmp_path / "server.log",
    )
    proc.start(timeout=300)
    try:
        with httpx.Client(base_url=proc.url, timeout=120.0) as http:
            r = http.post(
                "/v1/predict",
                json={"texts": ["To be, or not to be, that is the question.",
                                "We will build the wall and make America great again.",
                                "Quem não arrisca não petisca.", "他走进了那座古老的城市。"]},
            )  # fmt: skip
            assert r.status_code == 200, r.text
            labels = [p["label"] for p in r.json()["predictions"]]
            assert all(label.split(":")[0] in info["tasks"] for label in labels)
    finally:
        proc.kill()
