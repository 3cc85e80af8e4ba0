"""``tanbr bench policy`` end to end, in process, on a tiny budget."""

from __future__ import annotations

import json

import pytest

from tanbr import cli

TINY = ["--slots", "240", "--at", "220", "--seeds", "2", "--families", "bump,ridge"]


def test_bench_policy_json(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "policy", "--json", *TINY, "--policies", "tanbr,plug-in,fixed"]
    timing = ["--timing-slots", "60", "--timing-dims", "8", "24", "--timing-types", "4"]
    assert cli.main([*argv, *timing]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["surfaces"]) == {"bump-4", "ridge-4"}
    assert out["settings"]["seeds"] == [0, 1] and out["settings"]["feedback"] == "per-type"
    for rows in out["surfaces"].values():
        assert set(rows) == {"tanbr", "plug-in", "fixed"}
        for row in rows.values():
            assert set(row) == {"regret_mean", "regret_std", "slope", "select_ms_p50"}
            assert row["regret_mean"] > 0 and row["regret_std"] >= 0
            assert row["select_ms_p50"] > 0
    # the fixed (uniform) merge has linear regret
    assert out["surfaces"]["bump-4"]["fixed"]["slope"] == pytest.approx(1.0, abs=0.05)
    runs = out["timing"]
    assert [(t["policy"], t["experts"], t["types"]) for t in runs] == [
        ("tanbr", 8, 4), ("tanbr-paper", 8, 4), ("tanbr", 24, 4), ("tanbr-paper", 24, 4)
    ]  # fmt: skip
    for t in runs:
        assert t["slots"] == 60 and t["leaves"] >= 1
        assert 0 < t["select_ms_p50"] <= t["select_ms_p99"]


def test_bench_policy_tuning_seeds_and_families(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "policy", "--json", "--slots", "240", "--at", "220", "--seeds", "1",
            "--tuning", "--policies", "plug-in", "--timing-slots", "0",
            "--feedback", "scalar"]  # fmt: skip
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["seeds"] == [100] and out["settings"]["held_out"] == []
    assert set(out["surfaces"]) == {"bump-4", "multimodal-4", "ridge-4", "flat-4"}


def test_bench_policy_reports_the_held_out_families(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "policy", "--json", "--slots", "240", "--at", "220", "--seeds", "1",
            "--policies", "fixed", "--timing-slots", "0"]  # fmt: skip
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["held_out"] == ["shifted", "plateau"]
    assert "flat-4" not in out["surfaces"] and "plateau-4" in out["surfaces"]


def test_bench_policy_several_dims(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", "policy", "--json", *TINY, "--dims", "2", "6", "--timing-slots", "0"]
    assert cli.main([*argv, "--policies", "tanbr,tanbr@absolute,plug-in"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["surfaces"]) == {"bump-2", "ridge-2", "bump-6", "ridge-6"}
    assert out["settings"]["dims"] == [2, 6] and out["timing"] == []
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


def test_fairness_rows_give_baselines_tanbrs_network_input() -> None:
    from tanbr.bandit.bench import _policy_spec

    assert _policy_spec("nucb-anchored@sqrt") == ("nucb-anchored", {"encoding": "sqrt"})
    assert _policy_spec("tanbr-paper@sqrt") == ("tanbr-paper", {"encoding": "sqrt"})
    assert _policy_spec("tanbr@action") == ("tanbr", {"encoding": "action"})


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--policies", "router"], "unknown policy"),
        (["--policies", "hoo@relative"], "only tanbr"),
        (["--policies", "tanbr@wide"], "only tanbr"),
        (["--policies", "nucb@absolute"], "nucb-anchored@sqrt"),
        (["--dims", "4", "1"], "--dims"),
        (["--families", "saddle"], "unknown surface family"),
        (["--schedule", "bursty"], "unknown schedule"),
        (["--feedback", "labels"], "--feedback"),
        (["--timing-dims", "1"], "--timing-dims"),
        (["--slots", "100"], "--slots"),
        (["--at", "5000"], "--at"),
    ],
)
def test_bench_policy_bad_arguments(
    extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["bench", "policy", *extra]) == 2
    assert message in capsys.readouterr().err
