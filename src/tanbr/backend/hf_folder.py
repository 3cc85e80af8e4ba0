"""Hugging Face MoE checkpoint folders: whether one can be served, and opening it on the user's
tasks.

:func:`check_folder` decides from ``config.json``, the folder's file names and a skeleton of the
model built on the meta device (no weights are read, nothing is allocated), so that a folder no
backend can serve is refused with its reason before any weight is loaded. :func:`open_folder`
reads and checks the user's task file and maps its labels before the weights are loaded too, so
a wrong task file costs nothing either.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from torch import nn
from transformers import AutoConfig
from transformers.modeling_layers import GenericForSequenceClassification

from tanbr.backend.hf import HFBackend
from tanbr.backend.hf_classifier import HFClassifierBackend, label_index, model_labels
from tanbr.backend.hf_lm import HFCausalLMBackend
from tanbr.backend.requests import Pool
from tanbr.backend.tokenizer import TOKENIZER_FILES, load_tokenizer, tokenizer_files
from tanbr.model import Support, load_checkpoint, supports
from tanbr.model.precision import serving_dtype
from tanbr.tasks import read_task_file, split_tasks

log = logging.getLogger(__name__)

#: Backend kind -> the model head it serves (the suffix of a transformers class name).
HEADS = {"classifier": "ForSequenceClassification", "lm": "ForCausalLM"}
#: Backend kind -> the task-file kind it serves (:attr:`tanbr.tasks.TaskFile.kind`).
TASK_KINDS = {"classifier": "classification", "lm": "lm"}
#: What a task file of each kind holds, and what model each backend kind serves, in words.
TASK_FILES = {
    "classification": "classification tasks (text, task, label)",
    "lm": "language-model tasks (text, task, target)",
}
MODELS = {"classifier": "a sequence classifier", "lm": "a causal language model"}
BACKEND_CLASSES: dict[str, type[HFBackend]] = {
    "classifier": HFClassifierBackend,
    "lm": HFCausalLMBackend,
}


def check_folder(folder: Path, config: Mapping[str, Any], kind: str) -> Support:
    """Whether the backend of ``kind`` can serve ``folder``, and why not, without reading any
    weight."""
    head = HEADS[kind]
    names = config.get("architectures")
    if not isinstance(names, list) or not names or not isinstance(names[0], str):
        return Support(False, "config.json names no architecture (`architectures`)")
    name = names[0]
    if not name.endswith(head):
        if kind == "lm" and config.get("is_encoder_decoder"):
            return Support(
                False,
                f"{name} is an encoder-decoder model; the lm backend serves decoder-only "
                "*ForCausalLM models",
            )
        return Support(False, f"{name} is not a *{head} model")
    cls = getattr(transformers, name, None)
    if not isinstance(cls, type):
        return Support(
            False,
            f"unknown architecture {name}: not a transformers {transformers.__version__} class",
        )
    if kind == "classifier" and not issubclass(cls, GenericForSequenceClassification):
        return Support(
            False, f"{name} does not pool the last token like transformers' generic classifiers"
        )
    quantized = config.get("quantization_config")
    if quantized:
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else "?"
        return Support(
            False, f"its weights are quantized ({method}); quantized experts cannot be merged"
        )
    if not tokenizer_files(folder):
        return Support(False, f"no tokenizer in the folder (none of {', '.join(TOKENIZER_FILES)})")
    try:
        skeleton = _skeleton(folder, cls)
    except Exception as err:  # a config transformers cannot build must not crash the check
        return Support(False, f"cannot build {name} from config.json ({type(err).__name__}: {err})")
    verdict = supports(skeleton)
    if not verdict.ok:
        return Support(False, _transposed_reason(skeleton) or verdict.reason)
    return Support(True, f"{name}: {verdict.reason}")


def _skeleton(folder: Path, cls: type) -> nn.Module:
    """The model built from the folder's config on the meta device: structure, no memory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    with torch.device("meta"):
        model: nn.Module = cls._from_config(config)  # type: ignore[attr-defined]
    return model


def _transposed_reason(model: nn.Module) -> str | None:
    """The reason to refuse experts stored transposed without saying so: gate_up_proj
    (E, H, 2I) and down_proj (E, I, H) with no ``is_transposed`` flag would be read as
    (E, 2I, H) and (E, H, I) by the merge, so they are refused, shapes stated as they are."""
    for name, module in model.named_modules():
        experts = module._modules.get("experts")
        up = getattr(experts, "gate_up_proj", None)
        down = getattr(experts, "down_proj", None)
        if not isinstance(up, torch.Tensor) or not isinstance(down, torch.Tensor):
            continue
        if up.dim() != 3 or down.dim() != 3 or getattr(experts, "is_transposed", False):
            continue
        n, hidden, double = up.shape
        _, inner, out = down.shape
        if out == hidden and double == 2 * inner:
            return (
                f"MoE block {name!r} ({type(module).__name__}) stores its experts transposed, "
                f"gate_up_proj (E={n}, H={hidden}, 2I={double}) and down_proj (E={n}, I={inner}, "
                f"H={out}), and does not say so (no is_transposed flag): the merge cannot read "
                "them"
            )
    return None


def load_backend(
    kind: str,
    path: str | Path,
    *,
    texts: Sequence[str] = (),
    signature: str = "gate0",
    memo: bool = False,
    dtype: str = "float32",
    lean: bool = True,
) -> HFBackend:
    """The backend of ``kind`` on a checkpoint folder: tokenizer first, then the weights
    (memory-lean by default: the routed experts stay on disk until a merge reads them)."""
    folder = Path(path).expanduser()
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    vocab = getattr(config.get_text_config(), "vocab_size", None)
    tokenizer = load_tokenizer(folder, vocab_size=vocab if isinstance(vocab, int) else None)
    loaded = load_checkpoint(folder, lean=lean, dtype=serving_dtype(dtype))
    cls = BACKEND_CLASSES[kind]
    backend = cls(loaded, tokenizer, texts=texts, signature=signature, memo=memo)
    log.info(
        "serving %s as a %s (%d MoE blocks, %s%s)",
        folder,
        kind,
        len(backend.blocks),
        backend.dtype,
        ", lean" if lean else "",
    )
    return backend


def open_folder(
    kind: str,
    path: str | Path,
    tasks: str | Path,
    *,
    signature: str = "gate0",
    memo: bool = False,
    dtype: str = "float32",
    lean: bool = True,
) -> tuple[HFBackend, Pool, Pool]:
    """The backend with the calibration and test pools of the user's task file.

    The task file is read, split (:func:`tanbr.tasks.split_tasks`: its train split is not
    served) and, for a classifier, its labels mapped to the model's before any weight is read.
    """
    folder = Path(path).expanduser()
    if not tasks:
        raise ValueError(
            f"{folder}: a {HEADS[kind]} checkpoint brings no tasks; give a task file "
            "(model.tasks in the config, --tasks on the command line)"
        )
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    texts, calib, test = task_pools(kind, tasks, model_labels(config))
    backend = load_backend(
        kind, folder, texts=texts, signature=signature, memo=memo, dtype=dtype, lean=lean
    )
    return backend, calib, test


def task_pools(
    kind: str, tasks: str | Path, labels: Sequence[str] = ()
) -> tuple[list[str], Pool, Pool]:
    """Calibration and test pools of a task file, tasks indexed in file order, rows indexing
    one list of texts (calibration then test); ``labels``: the classifier's labels."""
    task_file = read_task_file(tasks)
    if task_file.kind != TASK_KINDS[kind]:
        raise ValueError(
            f"{task_file.path} holds {TASK_FILES[task_file.kind]} but the model is "
            f"{MODELS[kind]}: give a task file of {TASK_FILES[TASK_KINDS[kind]]}"
        )
    label_of: dict[tuple[str, str], int] = {}
    if kind == "classifier":  # every label of the file, not only those the splits drew
        for task, names in task_file.labels.items():
            for name in names:
                label_of[(task, name)] = label_index(task, name, labels)
    splits = split_tasks(task_file)
    task_index = {t: i for i, t in enumerate(task_file.tasks)}
    texts: list[str] = []
    pools = []
    for examples in (splits.calib, splits.test):
        rows = np.arange(len(texts), len(texts) + len(examples))
        texts += [e.text for e in examples]
        pools.append(
            Pool(
                tuple(e.text for e in examples),
                np.array([task_index[e.task] for e in examples], dtype=np.int64),
                np.array([label_of.get((e.task, str(e.label)), -1) for e in examples]),
                task_file.tasks,
                rows=rows,
                targets=None if kind == "classifier" else tuple(e.target for e in examples),
            )
        )
    return texts, pools[0], pools[1]
