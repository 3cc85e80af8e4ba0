"""``tanbr build-model --variant lm-tiny``: the build's figures on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tanbr import cli
from tanbr.model.lm import DOMAIN_NAMES


def test_build_model_prints_the_figures(
    tiny_lm: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TANBR_CACHE", str(tiny_lm.parents[1]))  # the fixture's cache
    assert cli.main(["-q", "build-model", "--variant", "lm-tiny", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["path"] == str(tiny_lm)
    assert out["family"] == "mixtral"
    assert list(out["domains"]) == list(DOMAIN_NAMES)
    assert set(out["loss"]) == {"full", "uniform", "usage_all", "own", "best"}
    assert "layer 0" in out["specialisation"]["summary"]
    assert isinstance(out["needs_adaptation"], bool)
    assert cli.main(["-q", "build-model", "--variant", "lm-tiny"]) == 0
    text = capsys.readouterr().out
    assert str(tiny_lm) in text and "best merge" in text


def test_build_model_refuses_a_task_file_for_the_lm(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["build-model", "--variant", "lm-tiny", "--tasks", "x.jsonl"])
    assert code == 2
    assert "--tasks does not apply to --variant lm-tiny" in capsys.readouterr().err
