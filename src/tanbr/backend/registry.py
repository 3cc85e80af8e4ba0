"""Which backend serves a model: one registry, looked up by what a folder holds.

A :class:`BackendSpec` is a picklable recipe (the experiment's worker processes and the memory
probes rebuild the same backend from it). :func:`open_backend` resolves it: no path means a
model built here and cached on first use, named by its variant (the embedded default model's
variants, or the MoE language model's ``lm`` and ``lm-tiny``, which resolve to their checkpoint
folder and its task file, :meth:`BackendSpec.resolved`); a folder is offered to each registered
loader in turn, and the first that supports it loads it. A folder no loader can use is refused
with every loader's one-line reason, before any weights are read. Adding a kind of model is one
loader class and one line in :data:`BACKENDS`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tanbr.backend.default import DefaultBackend, default_backend
from tanbr.backend.hf_folder import HEADS, check_folder, load_backend, open_folder
from tanbr.backend.protocol import Backend
from tanbr.backend.requests import Pool
from tanbr.model.default.build import build_default_model
from tanbr.model.default.modeling import DefaultModel
from tanbr.model.lm.build import TASKS_FILE, build_lm
from tanbr.model.lm.build import VARIANTS as LM_VARIANTS
from tanbr.model.precision import serving_dtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendSpec:
    """Everything needed to open a backend and its calibration and test pools.

    ``path``: a model folder (empty: the default model's ``variant``); ``tasks``: a task file
    (the user's tasks; the default model brings its own); ``signature``: the estimator's
    served-path signature; ``memo``: reuse predictions of a (merge, request) pair (offline
    evaluation only); ``dtype``: serving precision; ``lean``: memory-lean serving;
    ``group_top_k``: merged experts each token runs in a grouped merge.
    """

    variant: str = "default"
    path: str = ""
    tasks: str = ""
    signature: str = "gate0"
    memo: bool = False
    dtype: str = "float32"
    lean: bool = False
    group_top_k: int = 1

    @classmethod
    def from_config(cls, config: Any) -> BackendSpec:
        """The recipe an :class:`~tanbr.experiment.config.ExperimentConfig` describes."""
        return cls(
            variant=config.model.variant,
            path=config.model.path,
            tasks=config.model.tasks,
            signature=config.estimator.signature,
            memo=config.evaluation.memo,
            dtype=config.model.dtype,
            lean=config.model.lean,
            group_top_k=config.merge.group_top_k,
        )

    def load(self, *, progress: bool = False) -> tuple[Backend, Pool, Pool]:
        """The backend with its calibration and test pools."""
        return open_backend(self, progress=progress)

    def __call__(self) -> Backend:
        return self.load()[0]

    def replace(self, **changes: Any) -> BackendSpec:
        return dataclasses.replace(self, **changes)

    def resolved(self, *, progress: bool = False) -> BackendSpec:
        """The same recipe with a language-model variant name (``lm``, ``lm-tiny``) replaced by
        its checkpoint folder (built on first use, then cached) and, unless a task file is
        given, the task file beside its weights: from here on it is served like any user's
        folder. Other specs are returned as they are."""
        if self.path or self.variant not in LM_VARIANTS:
            return self
        folder = build_lm(self.variant, progress=progress)
        return self.replace(path=str(folder), tasks=self.tasks or str(folder / TASKS_FILE))


@dataclass(frozen=True)
class Verdict:
    """A loader's answer for a folder: whether it can serve it, and why not."""

    ok: bool
    reason: str


class BackendLoader(Protocol):
    """Recognises the folders it serves (cheaply, from their config) and opens them."""

    name: str

    def check(self, folder: Path, config: dict[str, Any]) -> Verdict: ...

    def open(self, spec: BackendSpec, *, progress: bool) -> tuple[Backend, Pool, Pool]: ...

    def serving(self, spec: BackendSpec) -> Backend: ...


DEFAULT_MODEL_TYPE = "tanbr-moe-classifier"


class DefaultLoader:
    """The embedded default model: a variant built here, or a folder written by
    ``tanbr build-model``; its task suite comes with it."""

    name = "default"

    def check(self, folder: Path, config: dict[str, Any]) -> Verdict:
        if config.get("model_type") != DEFAULT_MODEL_TYPE:
            return Verdict(False, f"not a {DEFAULT_MODEL_TYPE} model")
        if not (folder / "tasks.json").is_file():
            return Verdict(False, "no tasks.json beside the weights (build it with build-model)")
        return Verdict(True, "the embedded default model")

    def open(self, spec: BackendSpec, *, progress: bool) -> tuple[Backend, Pool, Pool]:
        return default_backend(
            variant=spec.variant,
            path=spec.path,
            signature=spec.signature,
            memo=spec.memo,
            progress=progress,
            dtype=spec.dtype,
            lean=spec.lean,
            tasks=spec.tasks,
            group_top_k=spec.group_top_k,
        )

    def serving(self, spec: BackendSpec) -> Backend:
        folder = Path(spec.path) if spec.path else build_default_model(spec.variant)
        model = DefaultModel.load(folder, lean=spec.lean, dtype=serving_dtype(spec.dtype))
        return DefaultBackend(
            model, signature=spec.signature, dtype=spec.dtype, group_top_k=spec.group_top_k
        )


class HFLoader:
    """A Hugging Face MoE checkpoint folder with its tokenizer: a ``*ForSequenceClassification``
    (``kind="classifier"``) or a ``*ForCausalLM`` (``kind="lm"``), served on the user's task
    file (:mod:`tanbr.backend.hf_folder`)."""

    def __init__(self, kind: str) -> None:
        if kind not in HEADS:
            raise ValueError(f"kind must be one of {sorted(HEADS)}, got {kind!r}")
        self.kind = kind
        self.name = f"hf-{kind}"

    def check(self, folder: Path, config: dict[str, Any]) -> Verdict:
        support = check_folder(folder, config, self.kind)
        return Verdict(support.ok, support.reason)

    def open(self, spec: BackendSpec, *, progress: bool) -> tuple[Backend, Pool, Pool]:
        return open_folder(
            self.kind,
            spec.path,
            spec.tasks,
            signature=spec.signature,
            memo=spec.memo,
            dtype=spec.dtype,
            lean=spec.lean,
        )

    def serving(self, spec: BackendSpec) -> Backend:
        return load_backend(
            self.kind, spec.path, signature=spec.signature, dtype=spec.dtype, lean=spec.lean
        )


#: Loaders in the order a folder is offered to them.
BACKENDS: dict[str, BackendLoader] = {
    "default": DefaultLoader(),
    "hf-classifier": HFLoader("classifier"),
    "hf-lm": HFLoader("lm"),
}


def read_config(folder: Path) -> dict[str, Any]:
    """A model folder's ``config.json`` as a dict; a clear error when it is missing or bad."""
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder not found: {folder}")
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"{folder} is not a model folder: it has no config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return config


def choose_loader(folder: str | Path) -> BackendLoader:
    """The first loader that serves ``folder``; a ValueError with every loader's reason."""
    folder = Path(folder).expanduser()
    config = read_config(folder)
    reasons = []
    for loader in BACKENDS.values():
        verdict = loader.check(folder, config)
        if verdict.ok:
            return loader
        reasons.append(f"{loader.name}: {verdict.reason}")
    raise ValueError(f"tanbr cannot serve {folder} ({'; '.join(reasons)})")


def open_backend(spec: BackendSpec, *, progress: bool = False) -> tuple[Backend, Pool, Pool]:
    """Open the backend a spec describes, with its calibration and test pools."""
    spec = spec.resolved()
    loader = choose_loader(spec.path) if spec.path else BACKENDS["default"]
    log.debug("opening %s with the %s backend", spec.path or spec.variant, loader.name)
    return loader.open(spec, progress=progress)


def serving_backend(spec: BackendSpec) -> Backend:
    """The backend alone, for live requests (no pools, nothing cached for offline rows): what a
    serving process holds."""
    spec = spec.resolved()
    loader = choose_loader(spec.path) if spec.path else BACKENDS["default"]
    return loader.serving(spec)
