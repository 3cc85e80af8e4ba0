from __future__ import annotations

import json
from pathlib import Path

import pytest

from tanbr.cli import main
from tanbr.model.bench import (
    REQUIRED_KEYS,
    format_grouped_table,
    format_table,
    parse_batches,
    parse_groups,
)
from tanbr.model.presets import PRESETS, get_preset


def test_parse_batches() -> None:
    assert parse_batches("1x32, 8X128") == [(1, 32), (8, 128)]
    for bad in ("8", "0x4", "ax3", "1x2x3"):
        with pytest.raises(ValueError, match="--batches"):
            parse_batches(bad)


def test_parse_groups() -> None:
    assert parse_groups("3, 2,2") == [2, 3] and parse_groups("") == []
    for bad in ("1", "x", "0"):
        with pytest.raises(ValueError, match="--groups"):
            parse_groups(bad)


def test_presets_follow_the_issue() -> None:
    medium, large = get_preset("medium"), get_preset("large")
    assert (medium.hidden_size, medium.intermediate_size, medium.n_layers) == (512, 1408, 6)
    assert (medium.n_experts, medium.top_k, medium.vocab_size) == (8, 2, 8192)
    assert (large.hidden_size, large.intermediate_size, large.n_layers, large.n_experts) == (
        1024,
        2816,
        8,
        8,
    )
    assert set(PRESETS) == {"tiny", "small", "medium", "large"}
    with pytest.raises(ValueError, match="preset must be one of"):
        get_preset("huge")


def test_bench_merge_json_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TANBR_CACHE", str(tmp_path))
    argv = [
        "bench",
        "merge",
        "--preset",
        "tiny",
        "--batches",
        "1x4,2x8",
        "--repeats",
        "1",
        "--threads",
        "1",
    ]
    assert main([*argv, "--no-rss", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["batch"] for r in rows] == ["1x4", "2x8"]
    for row in rows:
        assert set(REQUIRED_KEYS) <= set(row)
        assert row["latency_full_ms"] > 0 and row["latency_merged_ms"] > 0
        assert row["latency_full_all_logits_ms"] > 0 and row["latency_merged_all_logits_ms"] > 0
        assert row["params_merged_bytes"] < row["params_full_bytes"]
        assert row["merge_ms"] > 0 and row["memcpy_ms"] > 0 and row["lean_merge_ms"] > 0
        assert row["experts_implementation"] in ("eager", "grouped_mm")
        assert row["rss_full_bytes"] is None  # --no-rss
        assert row["dtype"] == "float32" and row["group_top_k"] == 1
        grouped = {g["m"]: g for g in row["grouped"]}
        assert sorted(grouped) == [1, 2, 3]
        assert grouped[1]["latency_ms"] == row["latency_merged_ms"]
        assert grouped[1]["params_bytes"] == row["params_merged_bytes"]
        # each further merged expert per block adds one expert's bytes (and its gate map)
        assert grouped[1]["params_bytes"] < grouped[2]["params_bytes"] < grouped[3]["params_bytes"]
        assert grouped[3]["params_bytes"] < row["params_full_bytes"]
        assert all(g["latency_ms"] > 0 and g["params_ratio"] < 1 for g in row["grouped"])
    assert "params MiB full/merged" in format_table(rows)
    assert "m=3, top-1" in format_grouped_table(rows)
    assert main([*argv[:-4], "--batches", "4", "--json"]) == 2  # a clear one-line error


def test_bench_merge_in_bfloat16(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TANBR_CACHE", str(tmp_path))
    argv = ["bench", "merge", "--preset", "tiny", "--batches", "1x4", "--repeats", "1"]
    argv += ["--threads", "1", "--dtype", "bfloat16", "--groups", "2", "--group-top-k", "2"]
    assert main([*argv, "--no-rss", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["dtype"] == "bfloat16" and row["group_top_k"] == 2
    assert [g["m"] for g in row["grouped"]] == [1, 2]
    assert row["merge_ms"] > 0 and row["lean_merge_ms"] > 0


@pytest.mark.slow
def test_bench_merge_measures_rss_in_fresh_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TANBR_CACHE", str(tmp_path))
    assert main(["bench", "merge", "--preset", "small", "--batches", "1x8", "--repeats", "1"]) == 0
    table = capsys.readouterr().out
    assert "RSS MiB full/merged" in table
    caption, _header, row = table.splitlines()[:3]
    assert caption.startswith("preset small, float32")
    pairs = [cell for cell in row.split() if "/" in cell]  # params, RSS
    full_rss, merged_rss = (float(x) for x in pairs[1].split("/"))
    assert merged_rss < full_rss  # small: 60 MiB of experts are never resident in lean mode
