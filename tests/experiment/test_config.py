from __future__ import annotations

from pathlib import Path

import pytest

from tanbr.experiment.config import (
    ExperimentConfig,
    load_config,
    preset_path,
    write_config,
)


def test_defaults_and_overrides() -> None:
    cfg = load_config(
        overrides=["policy.tanbr.rho=0.7", "workload.slot_size=64", "seeds=[0, 1]", "name=x y"]
    )
    assert cfg.workload.slot_size == 64
    assert cfg.seeds == (0, 1)
    assert cfg.policy == {"tanbr": {"rho": 0.7}}
    assert cfg.name == "x y"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("workload.slotsize=3", r"workload.slotsize \(did you mean workload.slot_size\?\)"),
        ("workload.slot_size=abc", "workload.slot_size must be int"),
        ("reward.latency_weight=true", "reward.latency_weight must be float"),
        ("nonsense", "key.sub=value"),
        ("n_slots=0", "n_slots must be >= 1"),
        ("policies=['tanbr', 'tanbr']", "listed twice"),
        ("workload.kind.x=1", "workload.kind must be str"),
    ],
)  # fmt: skip
def test_bad_overrides_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(overrides=[override])


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(
        overrides=["policy.tanbr.rho=0.7", "policy.hoo.nu=1.5", "workload.mix=[0.5, 0.5]"]
    )
    path = tmp_path / "config.toml"
    write_config(path, cfg)
    assert load_config(path) == cfg


def test_presets_exist_and_load() -> None:
    for name in ("demo", "tiny"):
        cfg = load_config(preset=name)
        assert isinstance(cfg, ExperimentConfig)
    demo = load_config(preset="demo")
    assert demo.n_slots >= 300 and len(demo.seeds) >= 3 and demo.workload.slot_size == 128
    assert {"tanbr", "slot-oracle", "task-oracle", "full-moe"} <= set(demo.policies)
    long = load_config(preset="long")  # issue 15's long run
    assert long.n_slots == 3000 and long.evaluation.tail == 2000
    assert long.evaluation.budget_s == 1800 and long.parameterization.kind == "task-regmean"
    assert {"tanbr", "tanbr-paper", "nucb", "plug-in", "regmean", "fisher", "uniform",
            "full-moe", "task-oracle", "slot-oracle"} <= set(long.policies)  # fmt: skip


def test_unknown_preset_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown preset 'nope'; known presets: .*demo"):
        preset_path("nope")
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("n_slots = [")
    with pytest.raises(ValueError, match="invalid TOML"):
        load_config(bad)
