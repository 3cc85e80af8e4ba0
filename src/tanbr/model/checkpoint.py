"""Load a local transformers checkpoint folder, offline, in normal or memory-lean mode.

Normal mode is ``from_pretrained`` on the folder. Memory-lean mode never materialises the
routed experts: the model is loaded from a state dict that holds the checkpoint's non-expert
tensors (memory-mapped) and, for every expert tensor, a zero-stride placeholder that costs no
memory; the placeholders are then replaced by meta tensors, and the returned
:class:`~tanbr.model.merge.Merger` reads the experts from the safetensors files whenever it
builds a merge. Legacy per-expert key names on disk (``block_sparse_moe.experts.0.w1.weight``,
``mlp.experts.0.gate_proj.weight``, ...) and fused ones are both understood.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from tanbr.model.discovery import MoEBlock, find_moe_blocks, get_module
from tanbr.model.lean import (
    SafetensorsExpertStore,
    disk_dtype,
    open_safetensors,
    safetensors_files,
)
from tanbr.model.merge import Merger

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """A model loaded from a folder, with the merger that serves it."""

    model: nn.Module
    merger: Merger
    config: Any
    path: Path
    lean: bool

    @property
    def blocks(self) -> list[MoEBlock]:
        return self.merger.blocks


def _register_project_models() -> None:
    """Import the default model so its config/model classes are registered with the Autos."""
    try:
        importlib.import_module("tanbr.model.default")
    except ImportError as err:  # the default model is optional for loading other checkpoints
        logger.debug("tanbr.model.default not importable: %s", err)


def resolve_model_class(config: Any) -> type[nn.Module]:
    """The model class of a config: ``config.architectures[0]`` in transformers, else AutoModel."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    for name in getattr(config, "architectures", None) or []:
        try:
            cls = getattr(transformers, name)
        except Exception:  # not a transformers class (e.g. registered by a project)
            continue
        if isinstance(cls, type):
            return cls
    try:
        return cast("type[nn.Module]", MODEL_MAPPING[type(config)])
    except KeyError as err:
        raise ValueError(
            f"cannot resolve a model class for model_type {getattr(config, 'model_type', '?')!r} "
            f"(architectures {getattr(config, 'architectures', None)})"
        ) from err


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    lean: bool = False,
    dtype: torch.dtype | None = None,
    group_top_k: int = 1,
) -> LoadedModel:
    """Load a local checkpoint folder (no network) and wrap it with a :class:`Merger`.

    Parameters
    ----------
    path
        A folder with ``config.json`` and weights, e.g. written by ``save_pretrained``.
    lean
        Memory-lean mode: keep only non-expert weights resident and read the experts from the
        folder's safetensors at each merge. The model must be merged (``merger.apply``) before
        it can run; ``merger.restore()`` reads the experts back.
    dtype
        Load in this dtype instead of the checkpoint's own.
    group_top_k
        Merged experts per token in grouped merges (see :class:`~tanbr.model.merge.Merger`).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"not a checkpoint folder (no config.json): {folder}")
    _register_project_models()
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{folder / 'config.json'}: cannot read the config ({err})") from err
    cls = resolve_model_class(config)
    if not lean:
        kwargs: dict[str, Any] = {"local_files_only": True}
        if dtype is not None:
            kwargs["dtype"] = dtype
        try:
            model = cls.from_pretrained(str(folder), **kwargs)  # type: ignore[attr-defined]
        except OSError as err:
            raise ValueError(f"{folder}: cannot load the weights ({err})") from err
        model.eval()
        merger = Merger(model, group_top_k=group_top_k)
        return LoadedModel(model, merger, model.config, folder, lean=False)
    model, store = _load_lean(folder, cls, config, dtype)
    merger = Merger(model, store=store, group_top_k=group_top_k)
    return LoadedModel(model, merger, model.config, folder, lean=True)


def _load_lean(
    folder: Path, cls: type[nn.Module], config: Any, dtype: torch.dtype | None
) -> tuple[nn.Module, SafetensorsExpertStore]:
    dtype = dtype or disk_dtype(folder)
    with torch.device("meta"):
        skeleton = cls._from_config(config, dtype=dtype)  # type: ignore[attr-defined]
    blocks = find_moe_blocks(skeleton)
    store = expert_store(folder, skeleton)
    expert_names = _expert_param_names(skeleton, blocks)
    meta_state = skeleton.state_dict()
    state: dict[str, Any] = {}
    with ExitStack() as stack:
        for file in safetensors_files(folder):
            handle = stack.enter_context(open_safetensors(folder / file))
            for key in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                if key not in store.expert_keys:
                    state[key] = handle.get_slice(key)  # memory-mapped until loaded
        for name in expert_names:  # zero-stride stand-ins: the experts never enter memory
            ref = meta_state[name]
            state[name] = torch.zeros((), dtype=ref.dtype).expand(ref.shape)
        model, info = cls.from_pretrained(  # type: ignore[attr-defined]
            None, config=config, state_dict=state, dtype=dtype, output_loading_info=True
        )
    missing = sorted(set(info.get("missing_keys", ())) - set(expert_names))
    if missing:
        logger.warning(
            "%s: %d weights not in the checkpoint, e.g. %s", folder, len(missing), missing[:3]
        )
    for name in expert_names:  # replace the stand-ins by meta tensors
        module_name, _, attr = name.rpartition(".")
        module = get_module(model, module_name)
        old = getattr(module, attr)
        meta = torch.empty(old.shape, dtype=old.dtype, device="meta")
        setattr(module, attr, nn.Parameter(meta, requires_grad=False))
    model.eval()
    logger.info("loaded %s lean: %d MoE blocks read from disk at merge time", folder, len(blocks))
    return model, store


def expert_store(folder: str | os.PathLike[str], model: nn.Module) -> SafetensorsExpertStore:
    """The memory-lean store of ``model``'s experts in the checkpoint ``folder`` it was loaded
    from (the model may be a copy in another dtype: merges are built in the model's dtype)."""
    blocks = find_moe_blocks(model)
    return SafetensorsExpertStore(Path(folder), blocks, rename=_renamer(model, blocks))


def _expert_param_names(model: nn.Module, blocks: list[MoEBlock]) -> list[str]:
    names = []
    for block in blocks:
        if block.fused:
            names += [f"{block.experts_name}.{t.name}" for t in block.targets]
            continue
        for key in get_module(model, block.experts_name)._modules:
            names += [f"{block.experts_name}.{key}.{t.name}" for t in block.targets]
    return names


def _renamer(model: nn.Module, blocks: list[MoEBlock]) -> Callable[[str], str]:
    """On-disk key -> model parameter name, with transformers' own legacy renamings."""
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    roots = tuple(b.experts_name + "." for b in blocks)
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key

        renamings = [
            t
            for t in get_model_conversion_mapping(model)  # type: ignore[arg-type]
            if isinstance(t, WeightRenaming)
        ]
        meta_state = model.state_dict()

        def hf_rename(key: str) -> str:
            return str(rename_source_key(key, renamings, [], prefix or None, meta_state)[0])

    except (ImportError, AttributeError, TypeError) as err:  # other transformers versions
        logger.warning("transformers key renaming unavailable (%s); using on-disk names", err)

        def hf_rename(key: str) -> str:
            return key

    def rename(key: str) -> str:
        name = hf_rename(key)
        if not prefix or name.startswith(roots):
            return name
        for candidate in (f"{prefix}.{name}", name.removeprefix(prefix + ".")):
            if candidate.startswith(roots):  # a base-model checkpoint in a head model, or back
                return candidate
        return name

    return rename
