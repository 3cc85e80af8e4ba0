"""``tanbr bench policy`` end to end, in process, on a tiny budget."""

from __future__ import annotations

import json

import pytest

from tanbr import cli

TINY = ["--slots", "240", "--at", "220", "--seeds", "2", "--families", "bump,ridge"]


def test_bench_policy_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "policy", "--json", *TINY, "--policies", "tanbr,plug-in,fixed"]
    assert cli.main([*argv, "--timing-slots", "60"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["surfaces"]) == {"bump-4", "ridge-4"}
    for rows in out["surfaces"].values():
        assert set(rows) == {"tanbr", "plug-in", "fixed"}
        for row in rows.values():
            assert set(row) == {"regret_mean", "regret_std", "slope"}
            assert row["regret_mean"] > 0 and row["regret_std"] >= 0
    # the fixed (uniform) merge has linear regret
    assert out["surfaces"]["bump-4"]["fixed"]["slope"] == pytest.approx(1.0, abs=0.05)
    timing = out["timing"]
    assert set(timing) == {"slots", "select_ms_p50", "select_ms_p99", "update_ms_p50", "leaves"}
    assert timing["slots"] == 60 and timing["leaves"] >= 64
    assert 0 < timing["select_ms_p50"] <= timing["select_ms_p99"]


def test_bench_policy_several_dims(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "policy", "--json", *TINY, "--dims", "2", "6", "--timing-slots", "0"]
    assert cli.main([*argv, "--policies", "tanbr,tanbr@absolute,plug-in"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["surfaces"]) == {"bump-2", "ridge-2", "bump-6", "ridge-6"}
    assert out["settings"]["dims"] == [2, 6] and out["timing"] == {}
    for rows in out["surfaces"].values():
        assert set(rows) == {"tanbr", "tanbr@absolute", "plug-in"}
    # the two charts are different policies
    six = out["surfaces"]["bump-6"]
    assert six["tanbr"]["regret_mean"] != six["tanbr@absolute"]["regret_mean"]


def test_bench_policy_table(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "policy", *TINY, "--policies", "random,fixed", "--timing-slots", "0"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "cumulative regret at T=220" in text
    assert "bump-4" in text and "ridge-4" in text and "random" in text
    assert "timing" not in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--policies", "router"], "unknown policy"),
        (["--policies", "hoo@relative"], "only tanbr"),
        (["--dims", "4", "1"], "--dims"),
        (["--families", "saddle"], "unknown surface family"),
        (["--schedule", "bursty"], "unknown schedule"),
        (["--slots", "100"], "--slots"),
        (["--at", "5000"], "--at"),
    ],
)
def test_bench_policy_bad_arguments(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["bench", "policy", *extra]) == 2
    assert message in capsys.readouterr().err
