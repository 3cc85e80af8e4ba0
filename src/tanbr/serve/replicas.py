"""What the service starts from: its config and the two replica systems it serves with."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tanbr.backend.scorers import make_scorer
from tanbr.experiment.loop import System
from tanbr.model.lm import TASKS_FILE as LM_TASKS_FILE
from tanbr.model.lm import VARIANTS as LM_VARIANTS
from tanbr.model.lm import build_lm
from tanbr.serve.generation import GenerationConfig
from tanbr.serve.slots import SlotConfig
from tanbr.serve.state import read_snapshot

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """Everything the service is started with.

    The model, estimator, parameterization and reward come from an experiment config
    (``experiment``: a TOML file, or ``preset``: a named one; neither: the defaults) with dotted
    ``overrides``. ``model`` (a default-model variant such as ``tiny``, a language-model variant
    ``lm`` or ``lm-tiny``, or a local checkpoint folder) overrides the config's model; a folder
    with a ``tasks.jsonl`` beside its weights (a built language model) serves its tasks unless
    ``tasks`` names others; ``policy`` is a name the experiment's modes know
    (``tanbr``, ``full-moe``, ``uniform``, ...). A language model is served under
    ``model_name`` (the OpenAI-compatible API's model id; default: its folder's name) with the
    ``generation`` limits.
    """

    experiment: str | None = None
    preset: str | None = None
    overrides: tuple[str, ...] = ()
    model: str | None = None
    tasks: str | None = None
    policy: str = "tanbr"
    state_dir: Path = Path("serve-state")
    seed: int = 0
    slots: SlotConfig = field(default_factory=SlotConfig)
    max_texts: int = 64
    max_chars: int = 2000
    max_body_bytes: int = 1 << 20
    token: str | None = None
    model_name: str | None = None
    generation: GenerationConfig = field(default_factory=GenerationConfig)

    def model_id(self, checkpoint: Path | None) -> str:
        """The language model's id in the OpenAI-compatible API: ``model_name``, else the
        variant asked for (``lm``), else the checkpoint folder's name."""
        if self.model_name is not None:
            return self.model_name
        if self.model in LM_VARIANTS:
            return self.model
        return checkpoint.name if checkpoint is not None else "tanbr"

    def __post_init__(self) -> None:
        if not 1 <= self.max_texts <= 4096:
            raise ValueError(f"max_texts must be in 1..4096, got {self.max_texts}")
        if self.max_chars < 1:
            raise ValueError(f"max_chars must be >= 1, got {self.max_chars}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.token is not None and len(self.token) < 8:
            raise ValueError("token must have at least 8 characters")
        if self.model_name is not None and not self.model_name.strip():
            raise ValueError("model_name must not be empty")
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
    (:func:`~tanbr.experiment.setup.prepare`: the estimator and the task-type profiles fitted
    on unlabeled calibration requests; :func:`~tanbr.experiment.runner.build_system`: the
    policy), so the service decides exactly as the offline loop does. When the folder holds a
    snapshot, the estimator, policy, reward and rng come from it and no refitting happens.

    The model is loaded once, memory-lean and in the serving precision; the second replica is
    :meth:`~tanbr.backend.protocol.Backend.replica`, a structural copy whose tensors are shared
    (merging never writes an original tensor, so only the merged experts and the module tree
    are per replica).
    """
    import torch

    from tanbr.backend.registry import BackendSpec, serving_backend
    from tanbr.experiment.config import load_config
    from tanbr.experiment.modes import MODES
    from tanbr.experiment.runner import build_system
    from tanbr.experiment.setup import first_per_task, prepare

    cfg = load_config(config.experiment, preset=config.preset, overrides=config.overrides)
    mode_cls = MODES.get(config.policy)
    if mode_cls is not None and getattr(mode_cls, "needs_truth", False):
        raise ValueError(
            f"policy {config.policy!r} reads the requests' true task tags; live requests carry"
            " none, so it cannot be served"
        )
    if cfg.estimator.kind == "oracle":
        raise ValueError(
            "estimator.kind 'oracle' reads task tags; the service needs a label-free one"
        )
    if cfg.parameterization.kind == "task-regmean":
        raise ValueError(
            "parameterization 'task-regmean' is not served yet: its plans are merged weights, "
            "and the service's slot history and /v1/status keep plans as coefficients; use it "
            "with tanbr run or compare"
        )
    spec = BackendSpec.from_config(cfg).replace(memo=False)
    if config.model is not None:
        if Path(config.model).is_dir():
            spec = spec.replace(path=str(Path(config.model).resolve()))
        elif "/" in config.model or config.model.startswith("."):
            raise FileNotFoundError(f"model folder not found: {config.model}")
        elif config.model in LM_VARIANTS:  # the language model built here (cached)
            spec = spec.replace(path=str(build_lm(config.model)))
        else:
            spec = spec.replace(variant=config.model, path="")
    if config.tasks is not None:
        spec = spec.replace(tasks=str(Path(config.tasks).resolve()))
    elif spec.path and not spec.tasks and (Path(spec.path) / LM_TASKS_FILE).is_file():
        spec = spec.replace(tasks=str(Path(spec.path) / LM_TASKS_FILE))  # a built lm's own
    snapshot = read_snapshot(config.state_dir)
    if snapshot is not None:
        meta = dict(snapshot.get("meta", {}))
        if meta.get("policy") != config.policy:
            raise ValueError(
                f"state folder {config.state_dir} belongs to policy {meta.get('policy')!r}, not"
                f" {config.policy!r}; give another --state-dir"
            )
        spec = spec.replace(signature=meta["signature"], dtype=meta.get("dtype", "float32"))
        backend = serving_backend(spec)
        if meta.get("model") != str(backend.checkpoint):
            raise ValueError(
                f"state folder {config.state_dir} was built on model {meta.get('model')}, not"
                f" {backend.checkpoint}; give another --state-dir"
            )
        system = System(
            backend=backend,
            estimator=snapshot["estimator"],
            mode=snapshot["mode"],
            reward=snapshot["reward"],
            scorer=make_scorer(snapshot["reward"].kind),
            rng=snapshot["rng"],
        )
        logger.info("resuming from %s (no refit)", config.state_dir)
    else:
        backend, calib, test = spec.load()
        # The slot oracle's candidate table is an offline yardstick that the service never
        # uses: keep it to the minimum candidate set on one request per task.
        cfg = dataclasses.replace(cfg, oracle=dataclasses.replace(cfg.oracle, n_candidates=0))
        setup = prepare(cfg, backend, calib, first_per_task(test, 1))
        system = build_system(setup, config.policy, config.seed)
        meta = {
            "policy": config.policy,
            "model": str(backend.checkpoint),
            "signature": spec.signature,
            "dtype": cfg.model.dtype,  # the serving precision (model.dtype of the config)
        }
    release = getattr(backend, "release_bank", None)
    if release is not None:
        release()  # live requests are encoded as they come
    twin = standby_copy(system)
    labels = tuple(backend.labels)
    logger.info(
        "model ready: %d labels, %d MoE blocks, %d task types; policy %r (%d torch threads)",
        len(labels),
        len(backend.blocks),
        system.estimator.n_types,
        config.policy,
        torch.get_num_threads(),
    )
    return Replicas((system, twin), labels, meta)


def standby_copy(system: System) -> System:
    """The second model copy a service serves with, sharing ``system``'s learning state
    (:meth:`~tanbr.backend.protocol.Backend.replica`): a policy that serves merges only never
    makes a memory-lean model read every expert."""
    experts = bool(getattr(system.mode, "all_experts", True))
    return dataclasses.replace(system, backend=system.backend.replica(experts=experts))
