"""What the service starts from: its config and the two replica systems it serves with."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tanbr.experiment.loop import System
from tanbr.serve.slots import SlotConfig
from tanbr.serve.state import read_snapshot

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Everything the service is started with.

    The model, estimator, parameterization and reward come from an experiment config
    (``experiment``: a TOML file, or ``preset``: a named one; neither: the defaults) with dotted
    ``overrides``. ``model`` (a default-model variant such as ``tiny``, or a local checkpoint
    folder) overrides the config's model; ``policy`` is a name the experiment's modes know
    (``tanbr``, ``full-moe``, ``uniform``, ...).
    """

    experiment: str | None = None
    preset: str | None = None
    overrides: tuple[str, ...] = ()
    model: str | None = None
    policy: str = "tanbr"
    state_dir: Path = Path("serve-state")
    seed: int = 0
    slots: SlotConfig = field(default_factory=SlotConfig)
    max_texts: int = 64
    max_chars: int = 2000
    max_body_bytes: int = 1 << 20
    token: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.max_texts <= 4096:
            raise ValueError(f"max_texts must be in 1..4096, got {self.max_texts}")
        if self.max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {self.max_chars}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.token is not None and len(self.token) < 8:
            raise ValueError("token must have at least 8 characters")
        if self.experiment is not None and self.preset is not None:
            raise ValueError("give an experiment config or a preset, not both")


@dataclass(frozen=True)
class Replicas:
    """Two replica systems sharing their learning state, the model's label names, and what a
    restart must find unchanged (``meta``: model folder, signature kind, policy)."""

    systems: tuple[System, System]
    labels: tuple[str, ...]
    meta: dict[str, Any]


def build_replicas(config: ServeConfig) -> Replicas:
    """Load the model and the learning state: two replicas.

    On a fresh state folder everything goes through the experiment's own setup
    (:func:`~tanbr.experiment.runner.prepare`: the estimator and the task-type profiles fitted
    on unlabeled calibration requests; :func:`~tanbr.experiment.runner.build_system`: the
    policy), so the service decides exactly as the offline loop does. When the folder holds a
    snapshot, the estimator, policy, reward and rng come from it and no refitting happens.

    The second replica is a structural copy of the first whose tensors are shared: merging
    never writes an original tensor (it builds new merged ones), so only the merged experts and
    the module tree are per replica.
    """
    import dataclasses

    import torch

    from tanbr.experiment.backend import DefaultBackend, default_backend
    from tanbr.experiment.config import load_config
    from tanbr.experiment.modes import MODES
    from tanbr.experiment.runner import build_system
    from tanbr.experiment.setup import first_per_task, prepare
    from tanbr.model.default.build import build_default_model
    from tanbr.model.default.modeling import DefaultModel

    cfg = load_config(config.experiment, preset=config.preset, overrides=config.overrides)
    mode_cls = MODES.get(config.policy)
    if mode_cls is not None and getattr(mode_cls, "needs_truth", False):
        raise ValueError(
            f"policy {config.policy!r} reads the requests' true task tags; live requests carry"
            " none, so it cannot be served"
        )
    if cfg.estimator.kind != "cluster":
        raise ValueError(
            f"estimator.kind {cfg.estimator.kind!r} reads task tags; the service needs 'cluster'"
        )
    folder = _model_folder(config.model, cfg.model.variant, cfg.model.path, build_default_model)
    snapshot = read_snapshot(config.state_dir)
    if snapshot is not None:
        meta = dict(snapshot.get("meta", {}))
        if meta.get("policy") != config.policy:
            raise ValueError(
                f"state folder {config.state_dir} belongs to policy {meta.get('policy')!r}, not"
                f" {config.policy!r}; give another --state-dir"
            )
        if meta.get("model") != str(folder):
            raise ValueError(
                f"state folder {config.state_dir} was built on model {meta.get('model')}, not"
                f" {folder}; give another --state-dir"
            )
        backend = DefaultBackend(
            DefaultModel.load(folder),
            signature=meta["signature"],
            dtype=meta.get("dtype", "float32"),
        )
        system = System(
            backend=backend,
            estimator=snapshot["estimator"],
            mode=snapshot["mode"],
            reward=snapshot["reward"],
            rng=snapshot["rng"],
        )
        logger.info("resuming from %s (no refit)", config.state_dir)
    else:
        signature = cfg.estimator.signature
        backend, calib, test = default_backend(
            path=str(folder), signature=signature, dtype=cfg.model.dtype
        )
        # The slot oracle's candidate table is an offline yardstick that the service never
        # uses: keep it to the minimum candidate set on one request per task.
        cfg = dataclasses.replace(cfg, oracle=dataclasses.replace(cfg.oracle, n_candidates=0))
        setup = prepare(cfg, backend, calib, first_per_task(test, 1))
        system = build_system(setup, config.policy, config.seed)
        meta = {
            "policy": config.policy,
            "model": str(folder),
            "signature": signature,
            "dtype": cfg.model.dtype,  # the serving precision (model.dtype of the config)
        }
    backend.restore()
    twin = dataclasses.replace(system, backend=_twin(backend))
    labels = tuple(backend.dm.labels)
    logger.info(
        "model ready: %d labels, %d MoE blocks, %d task types; policy %r (%d torch threads)",
        len(labels),
        len(backend.blocks),
        system.estimator.n_types,
        config.policy,
        torch.get_num_threads(),
    )
    return Replicas((system, twin), labels, meta)


def _model_folder(model: str | None, variant: str, path: str, build: Callable[[str], Path]) -> Path:
    """The checkpoint folder: ``model`` (a folder or a variant name) over the config's."""
    if model is not None:
        if Path(model).is_dir():
            return Path(model).resolve()
        if "/" in model or model.startswith("."):
            raise FileNotFoundError(f"model folder not found: {model}")
        return build(model)
    return Path(path).resolve() if path else build(variant)


def _twin(backend: Any) -> Any:
    """A copy of the backend with its own module tree, tokenizer and merger, sharing tensors.

    The tokenizer is copied because a fast tokenizer must not be used by two threads at once.
    """
    import copy

    backend.restore()  # the tree holds every original tensor, and no merged one
    shared: dict[int, Any] = {id(t): t for t in backend.model.parameters()}
    shared.update({id(t): t for t in backend.model.buffers()})
    for name in ("bank", "_sig_cache", "_ref_cache", "texts"):
        value = getattr(backend, name, None)
        if value is not None:
            shared[id(value)] = value
    return copy.deepcopy(backend, shared)
