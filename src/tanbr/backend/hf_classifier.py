"""A transformers MoE sequence classifier (``*ForSequenceClassification``) as a backend.

transformers' MoE classifiers (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2/V3, PhiMoE, GPT-OSS,
MiniMax, Qwen3-Next, Jamba, ...) all pool the last token: their ``score`` layer reads the final
hidden state of each sequence's last token, which the library finds as the rightmost token that
is not the config's pad token. Here the last real token is read from the attention mask of a
right-padded batch instead: the same token whenever the pad token does not occur in the text,
and the right one when it does (a tokenizer without a pad token pads with its end-of-sequence
token, which a text may well contain), or when the config names no pad token at all.

A user's task labels are mapped to the model's own labels (``config.id2label``) by
:func:`label_index`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tanbr.backend.hf import HFBackend
from tanbr.backend.protocol import Prediction
from tanbr.backend.tokenizer import Batch


class HFClassifierBackend(HFBackend):
    """Serves a transformers MoE ``*ForSequenceClassification`` checkpoint.

    ``predict`` gives class probabilities (n, n_labels) over the model's labels; ``reference``
    the full MoE's labels; ``gates+head`` is every block's gate probabilities under the full MoE
    followed by the full MoE's class probabilities. See :class:`~tanbr.backend.hf.HFBackend`
    for the parameters.
    """

    kind = "classifier"

    def __init__(self, loaded: Any, tokenizer: Any, **kwargs: Any) -> None:
        score = getattr(loaded.model, "score", None)
        if not isinstance(score, torch.nn.Module):
            raise ValueError(
                f"{type(loaded.model).__name__} has no `score` head: not a last-token sequence "
                "classifier"
            )
        super().__init__(loaded, tokenizer, **kwargs)
        self._labels = model_labels(self.config)

    @property
    def labels(self) -> tuple[str, ...]:
        return self._labels

    @property
    def _head_width(self) -> int:
        return len(self._labels)

    def _outputs(self, batch: Batch) -> np.ndarray:
        """(b, n_labels) class probabilities (float32) from each request's last real token."""
        hidden = self._body()(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state  # (b, T, H)
        pooled = hidden[torch.arange(hidden.shape[0]), batch.last]  # (b, H)
        logits = self.model.get_submodule("score")(pooled)  # (b, n_labels)
        return np.asarray(torch.softmax(logits.float(), dim=-1).numpy(), dtype=np.float32)

    def _head(self, batch: Batch) -> np.ndarray:
        return self._outputs(batch).astype(np.float64)

    def _prediction(self, values: np.ndarray, latency_ms: float, merge_ms: float) -> Prediction:
        return Prediction(np.asarray(values, dtype=np.float32), latency_ms, merge_ms)


def model_labels(config: Any) -> tuple[str, ...]:
    """The model's label names in index order (``config.id2label``; ``LABEL_i`` when unnamed)."""
    n = int(getattr(config, "num_labels", 0) or 0)
    id2label: Mapping[Any, Any] = getattr(config, "id2label", None) or {}
    by_index = {int(k): str(v) for k, v in id2label.items()}
    n = max(n, len(by_index))
    return tuple(by_index.get(i, f"LABEL_{i}") for i in range(n))


def label_index(task: str, label: str, labels: Sequence[str]) -> int:
    """The model label a task file's ``label`` of ``task`` means.

    In order: the joint name ``"task:label"``, the label itself, and an integer-looking label
    as an index into the model's labels. Anything else is a ValueError naming the task, the
    label and some of the model's labels.
    """
    index = {name: i for i, name in enumerate(labels)}
    for name in (f"{task}:{label}", label):
        if name in index:
            return index[name]
    text = label.strip()
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(labels):
        return int(text)
    shown = ", ".join(repr(x) for x in labels[:6]) + (", ..." if len(labels) > 6 else "")
    raise ValueError(
        f"task {task!r}: label {label!r} is not a label of the model (neither "
        f"{task + ':' + label!r} nor {label!r} nor an index below {len(labels)}); the model's "
        f"labels are {shown}"
    )
