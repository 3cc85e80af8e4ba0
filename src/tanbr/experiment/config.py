"""Experiment configuration: TOML files and dotted overrides into frozen dataclasses.

A config file is a TOML document whose tables mirror :class:`ExperimentConfig`; every key is
checked against the dataclass fields (an unknown key is an error naming the allowed ones), and
``--set workload.slot_size=64`` style overrides go through the same checks. The ``[policy.NAME]``
tables are passed as keyword arguments to the policy factory, whose signature is their schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    """Which model serves: a default-model variant (built and cached on first use) or a local
    checkpoint folder written by ``tanbr build-model``. ``lean``: memory-lean serving, the
    routed experts are read from the checkpoint's safetensors when a merge is built and never
    kept resident (the full MoE and soft merging read them back)."""

    variant: str = "default"
    path: str = ""
    threads: int = 2  # torch intra-op threads while serving
    dtype: str = "float32"  # serving precision: float32, bfloat16 or auto (see backend)
    lean: bool = True
    tasks: str = ""  # a task file (JSONL, CSV or JSON array) for a model folder of your own


@dataclass(frozen=True)
class WorkloadConfig:
    """How the stream is generated (see :mod:`tanbr.experiment.workload`)."""

    kind: str = "drift"
    slot_size: int = 128
    n_dominant: int = 2
    dominance: float = 0.85
    period: int = 25
    ramp: int = 5
    jitter: float = 200.0
    concentration: float = 50.0
    sharpness: float = 3.0
    mix: tuple[float, ...] = ()
    trace: str = ""  # a per-slot mix trace (kind "trace")
    requests: str = ""  # a request trace (kind "requests")
    # a task held out of calibration (the estimator never sees it there) that arrives at slot
    # new_task_at with new_task_share of each slot's mix (0: the schedule's own share)
    new_task: str = ""
    new_task_at: int = 100
    new_task_share: float = 0.25


@dataclass(frozen=True)
class EstimatorConfig:
    """The task-mix estimator (see :mod:`tanbr.experiment.estimator`).

    ``signature`` is what the estimator reads on the served path; with ``kind = "readout"``
    the task types are found once on calibration requests with the ``types`` signature (which
    may need the full MoE: paid once, offline) and read out from ``signature``."""

    kind: str = "cluster"
    n_types: int = 0  # 0: discover K from unlabeled history
    signature: str = "gate0"
    types: str = "gates+head"
    readout_c: float = 0.01
    head: int = 32
    forecast: str = "ema"
    alpha: float = 0.5
    beta: float = 0.2
    prior_strength: float = 16.0
    online_rate: float = 0.01
    # task types met mid-stream (readout only; see tanbr.experiment.novelty): detect and open
    # them, learn their profiles from profile_budget full-MoE gate passes per slot
    novelty: bool = False
    novelty_window: int = 4
    novelty_excess: float = 0.05
    profile_budget: int = 8


@dataclass(frozen=True)
class ParameterizationConfig:
    kind: str = "task-simplex"


@dataclass(frozen=True)
class MergeConfig:
    """How a slot's merge is served: ``experts`` merged experts per MoE block (m = 1: one
    dense expert; m > 1: the experts grouped by the task types the action weighs most, the
    gate re-mapped to the groups), each token routed to ``group_top_k`` of them."""

    experts: int = 1
    group_top_k: int = 1

    def __post_init__(self) -> None:
        if self.experts < 1:
            raise ValueError(f"merge.experts must be >= 1, got {self.experts}")
        if not 1 <= self.group_top_k <= max(1, self.experts):
            raise ValueError(
                f"merge.group_top_k must be in 1..merge.experts={self.experts}, "
                f"got {self.group_top_k}"
            )


@dataclass(frozen=True)
class RewardConfig:
    """Reward and simulated labelling (see :mod:`tanbr.experiment.reward`)."""

    kind: str = "accuracy"
    label_fraction: float = 1.0
    delay: int = 0
    probe: int = 16
    latency_budget_ms: float = 0.0
    latency_weight: float = 0.0
    memory_budget_bytes: int = 0
    memory_weight: float = 0.0


@dataclass(frozen=True)
class OracleConfig:
    """Candidate merges searched by the slot oracle: the task-type vertices, the centre, the
    edges at 1/2 (and 1/4, 3/4 plus points pulled towards the centre for up to 8 types; see
    :func:`tanbr.experiment.modes.candidate_actions`) and ``n_candidates``
    Dirichlet(``concentration``) samples, each scored per task on the test split (on its first
    ``rows_per_task`` requests of each task when set; 0: all of them)."""

    n_candidates: int = 64
    concentration: float = 1.0
    rows_per_task: int = 0


@dataclass(frozen=True)
class EvaluationConfig:
    """Offline evaluation budget. ``sample``: run only each slot's last ``sample`` requests
    through the model and score those (0: the whole slot; the estimator always reads the whole
    slot). ``memo``: reuse the predictions of a (merge, request) pair seen before (exact: the
    model is deterministic), which makes static baselines and repeated actions cheap.
    ``workers``: processes that run the (policy, seed) runs side by side, each with its own copy
    of the model (results are the same as with one; latency probes run afterwards in the main
    process). ``memory``: after the runs, serve a slot in fresh processes (one per serving kind
    and one with no model) and report their resident sets (:mod:`tanbr.experiment.memory`)."""

    sample: int = 0
    memo: bool = True
    workers: int = 1
    memory: bool = True  # measure the resident set of serving processes (one per kind)
    metric: str = ""  # what "accuracy" reports: a scorer's name ("": the model's own kind)
    tail: int = 0  # also report accuracy over the last `tail` slots (0: not)
    budget_s: float = 0.0  # wall-time budget of the whole command, checked in the report

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"evaluation.workers must be >= 1, got {self.workers}")


@dataclass(frozen=True)
class LatencyConfig:
    """Latency probes: ``batches`` real batches of ``batch_size`` requests per policy, spread
    evenly over the seeds (at least one per seed), timed end to end (tokenize + encoder + MoE
    layers + head) and for the MoE layers + head alone (cached lower states)."""

    batches: int = 8
    batch_size: int = 32


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    n_slots: int = 300
    seeds: tuple[int, ...] = (0,)
    policies: tuple[str, ...] = ("tanbr",)
    model: ModelConfig = field(default_factory=ModelConfig)
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    parameterization: ParameterizationConfig = field(default_factory=ParameterizationConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    oracle: OracleConfig = field(default_factory=OracleConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    policy: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_slots < 1:
            raise ValueError(f"n_slots must be >= 1, got {self.n_slots}")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed")
        if not self.policies:
            raise ValueError("policies must name at least one policy")
        if len(set(self.policies)) != len(self.policies):
            raise ValueError(f"policies are listed twice: {list(self.policies)}")
        for name, params in self.policy.items():
            if not isinstance(params, dict):
                raise ValueError(f"[policy.{name}] must be a table of parameters")


# --- building from plain dicts ------------------------------------------------------------------


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ValueError(f"{key} must be finite, got {value}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        (inner, _) = typing.get_args(tp)
        if isinstance(value, list | tuple):
            return tuple(_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value))
    elif origin is dict:
        if isinstance(value, Mapping):
            return {str(k): dict(v) if isinstance(v, Mapping) else v for k, v in value.items()}
    elif dataclasses.is_dataclass(tp) and isinstance(tp, type) and isinstance(value, Mapping):
        return _build(tp, value, prefix=f"{key}.")
    type_name = getattr(tp, "__name__", str(tp))
    raise ValueError(f"{key} must be {type_name}, got {value!r}")


def _build(cls: type[Any], data: Mapping[str, Any], *, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ValueError(f"unknown config key {prefix}{key}{hint}; allowed: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    return cls(**kwargs)


def from_dict(data: Mapping[str, Any]) -> ExperimentConfig:
    """Validate a plain dict (e.g. parsed TOML) into an :class:`ExperimentConfig`."""
    config: ExperimentConfig = _build(ExperimentConfig, data)
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data (tuples as lists), e.g. for writing TOML or JSON."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out[f.name] = to_dict(value)
        elif isinstance(value, tuple):
            out[f.name] = list(value)
        elif isinstance(value, dict):
            out[f.name] = {k: dict(v) for k, v in value.items()}
        else:
            out[f.name] = value
    return out


# --- files, presets, overrides ------------------------------------------------------------------


def _config_dirs() -> list[Path]:
    here = Path(__file__).resolve()
    return [Path.cwd() / "configs", here.parents[3] / "configs", here.parents[1] / "configs"]


def preset_path(name: str) -> Path:
    """``configs/NAME.toml`` from the current folder, the source tree or the package."""
    if not name or "/" in name or "\\" in name:
        raise ValueError(f"preset must be a bare name such as 'demo', got {name!r}")
    for folder in _config_dirs():
        path = folder / f"{name}.toml"
        if path.is_file():
            return path
    known = sorted({p.stem for d in _config_dirs() if d.is_dir() for p in d.glob("*.toml")})
    raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(known) or 'none'}")


def _parse_value(text: str) -> Any:
    """A TOML value (number, bool, string, array); a bare word is taken as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to raw config data (checked when it is built)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"--set expects key.sub=value, got {item!r}")
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"--set {key}: {part} is a value, not a table")
            node = child
        node[parts[-1]] = _parse_value(text.strip())
    return data


def load_config(
    path: str | Path | None = None, *, preset: str | None = None, overrides: Iterable[str] = ()
) -> ExperimentConfig:
    """Read a TOML config (or a preset by name), apply overrides, validate."""
    if path is not None and preset is not None:
        raise ValueError("give a config file or --preset, not both")
    data: dict[str, Any] = {}
    source = Path(path) if path is not None else (preset_path(preset) if preset else None)
    if source is not None:
        if not source.is_file():
            raise FileNotFoundError(f"config file not found: {source}")
        try:
            data = tomllib.loads(source.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{source}: invalid TOML: {err}") from None
    return from_dict(apply_overrides(data, overrides))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ValueError(f"cannot write {type(value).__name__} to TOML")


def dump_toml(data: Mapping[str, Any], _prefix: str = "") -> str:
    """A small TOML writer for config data (scalars, arrays, nested tables)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, Mapping)]
    for k, v in data.items():
        if isinstance(v, Mapping):
            name = f"{_prefix}{k}"
            scalars = {kk: vv for kk, vv in v.items() if not isinstance(vv, Mapping)}
            if scalars or not v:
                lines += ["", f"[{name}]"] + [
                    f"{kk} = {_toml_value(vv)}" for kk, vv in scalars.items()
                ]
            nested = {kk: vv for kk, vv in v.items() if isinstance(vv, Mapping)}
            if nested:
                lines += ["", dump_toml(nested, f"{name}.").rstrip("\n")]
    return "\n".join(lines).lstrip("\n") + "\n"


def write_config(path: Path, config: ExperimentConfig) -> None:
    """The resolved config, as TOML that :func:`load_config` reads back identically."""
    path.write_text(dump_toml(to_dict(config)), encoding="utf-8")
