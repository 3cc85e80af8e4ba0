"""The default MoE text classifier: MiniLM with sparse-upcycled feed-forward layers on top.

The lower ``num_hidden_layers - num_moe_layers`` BERT layers are the frozen pre-trained
encoder. In each of the top ``num_moe_layers`` layers the feed-forward network (BERT's
``intermediate.dense`` -> GELU -> ``output.dense``) is replaced by a sparse MoE block whose
experts use the transformers fused-experts layout (``up_proj (E, I, H)``, ``down_proj (E, H, I)``
plus biases), so the merging engine treats it exactly like a Mixtral- or OLMoE-style block. The
residual and LayerNorm of ``BertOutput`` stay outside the block and are shared by all experts.

Requests carry no task tag, so one joint head predicts ``"task:label"`` over all tasks.

The online loop serves hundreds of slots; the frozen lower layers do not change with the merge,
so their output (:class:`LowerStates`) is computed once per text and cached, and each slot runs
only :meth:`TanbrMoEClassifier.forward_upper`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers import initialization as hf_init
from transformers.activations import ACT2FN
from transformers.integrations.moe import use_experts_implementation
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.bert.modeling_bert import BertAttention, BertEmbeddings, BertLayer

from tanbr.model.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

MODEL_TYPE = "tanbr-moe-classifier"
TASKS_FILE = "tasks.json"


class TanbrMoEConfig(PreTrainedConfig):  # type: ignore[misc, no-untyped-call]
    """BERT's hyperparameters plus the MoE ones; ``id2label`` holds the joint labels."""

    model_type = MODEL_TYPE

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    is_decoder: bool = False
    add_cross_attention: bool = False
    classifier_dropout: float = 0.1
    num_moe_layers: int = 2
    num_experts: int = 6
    num_experts_per_tok: int = 2
    task_names: list[str] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)  # type: ignore[no-untyped-call]
        if not 1 <= self.num_moe_layers <= self.num_hidden_layers:
            raise ValueError(
                f"num_moe_layers must be in [1, num_hidden_layers={self.num_hidden_layers}], "
                f"got {self.num_moe_layers}"
            )
        if self.num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                f"got {self.num_experts_per_tok}"
            )


@use_experts_implementation(has_bias=True, has_gate=False)
class TanbrExperts(nn.Module):
    """E copies of BERT's GELU feed-forward network as fused 3-D tensors (HF experts layout)."""

    def __init__(self, config: TanbrMoEConfig) -> None:
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.intermediate_size
        self.num_experts = e
        self.hidden_dim = h
        self.intermediate_dim = i
        self.up_proj = nn.Parameter(torch.empty(e, i, h))  # (E, I, H)
        self.up_proj_bias = nn.Parameter(torch.zeros(e, i))  # (E, I)
        self.down_proj = nn.Parameter(torch.empty(e, h, i))  # (E, H, I)
        self.down_proj_bias = nn.Parameter(torch.zeros(e, h))  # (E, H)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self,
        hidden_states: torch.Tensor,  # (N, H)
        top_k_index: torch.Tensor,  # (N, k)
        top_k_weights: torch.Tensor,  # (N, k)
    ) -> torch.Tensor:
        """Eager reference dispatch: each expert runs only on the tokens routed to it."""
        out = torch.zeros_like(hidden_states)  # (N, H)
        for e in torch.unique(top_k_index).tolist():
            token, slot = torch.where(top_k_index == e)
            x = F.linear(hidden_states[token], self.up_proj[e], self.up_proj_bias[e])  # (n, I)
            x = F.linear(self.act_fn(x), self.down_proj[e], self.down_proj_bias[e])  # (n, H)
            out.index_add_(0, token, x * top_k_weights[token, slot, None].to(x.dtype))
        return out


class TanbrSparseMoeBlock(nn.Module):
    """Token gate (softmax -> top-k -> renormalise) over :class:`TanbrExperts`."""

    def __init__(self, config: TanbrMoEConfig) -> None:
        super().__init__()
        self.top_k: int = config.num_experts_per_tok
        self.num_experts: int = config.num_experts
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = TanbrExperts(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        b, t, h = hidden_states.shape
        flat = hidden_states.reshape(-1, h)  # (B*T, H)
        probs = F.softmax(self.gate(flat), dim=-1, dtype=torch.float32)  # (B*T, E)
        weights, index = torch.topk(probs, self.top_k, dim=-1)  # (B*T, k)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(flat.dtype)
        out: torch.Tensor = self.experts(flat, index, weights)  # (B*T, H)
        return out.reshape(b, t, h)


class TanbrMoELayer(nn.Module):
    """A BERT layer whose feed-forward network is the MoE block ``mlp``."""

    def __init__(self, config: TanbrMoEConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)  # type: ignore[no-untyped-call]
        self.mlp = TanbrSparseMoeBlock(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        ffn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        keep: torch.Tensor | None = None,
        tap: list[torch.Tensor] | None = None,
        attended: torch.Tensor | None = None,
    ) -> torch.Tensor:  # (B, T, H) -> (B, T, H)
        """``ffn`` (training only) stands in for the MoE block, (B, T, H) -> (B, T, H).

        ``keep`` (B, T), the real tokens: the MoE block then runs on those only, packed as one
        (1, N, H) sequence, and the padding positions get no feed-forward output (attention
        never reads them as keys and pooling skips them, so every real token's output is
        unchanged while the block's work drops by the padding share). ``tap``: the MoE block's
        input is appended to it (what a signature of the served path reads, for free).
        ``attended``: the attention's output, computed before (it does not depend on any merge
        in the first MoE layer): the attention is skipped."""
        if attended is None:
            attended, _ = self.attention(hidden_states, attention_mask)
        if tap is not None:
            tap.append(attended)
        if ffn is not None:
            y = ffn(attended)
        elif keep is None:
            y = self.mlp(attended)
        else:
            y = torch.zeros_like(attended)
            y[keep] = self.mlp(attended[keep].unsqueeze(0)).reshape(-1, attended.shape[-1])
        return self.LayerNorm(self.dropout(y) + attended)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class LowerStates:
    """Output of the frozen lower layers for a padded batch: what the merge never changes."""

    hidden: torch.Tensor  # (B, T, H)
    attention_mask: torch.Tensor  # (B, T), 1 for tokens, 0 for padding

    def __post_init__(self) -> None:
        if self.hidden.ndim != 3 or self.attention_mask.shape != self.hidden.shape[:2]:
            raise ValueError(
                f"LowerStates needs hidden (B, T, H) and attention_mask (B, T), got "
                f"{tuple(self.hidden.shape)} and {tuple(self.attention_mask.shape)}"
            )

    def __len__(self) -> int:
        return int(self.hidden.shape[0])


class TanbrMoEClassifier(PreTrainedModel):  # type: ignore[misc]
    """MiniLM with MoE feed-forward layers in its top layers and one joint classification head."""

    config_class = TanbrMoEConfig
    config: TanbrMoEConfig
    base_model_prefix = "tanbr"
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = ["BertLayer", "TanbrMoELayer"]  # noqa: RUF012 (a transformers hook)

    def __init__(self, config: TanbrMoEConfig) -> None:
        super().__init__(config)
        n_lower = config.num_hidden_layers - config.num_moe_layers
        self.embeddings = BertEmbeddings(config)  # type: ignore[no-untyped-call]
        layers: list[nn.Module] = [
            BertLayer(config, layer_idx=i)  # type: ignore[no-untyped-call]
            for i in range(n_lower)
        ]
        layers += [TanbrMoELayer(config) for _ in range(config.num_moe_layers)]
        self.layers = nn.ModuleList(layers)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, int(config.num_labels or 2))
        self.post_init()  # type: ignore[no-untyped-call]

    @property
    def n_lower(self) -> int:
        return int(self.config.num_hidden_layers - self.config.num_moe_layers)

    def moe_layers(self) -> list[TanbrMoELayer]:
        return [m for m in self.layers[self.n_lower :] if isinstance(m, TanbrMoELayer)]

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)  # type: ignore[no-untyped-call]
        std = self.config.initializer_range
        if isinstance(module, TanbrExperts):
            hf_init.normal_(module.up_proj, mean=0.0, std=std)
            hf_init.normal_(module.down_proj, mean=0.0, std=std)
            hf_init.zeros_(module.up_proj_bias)
            hf_init.zeros_(module.down_proj_bias)
        elif isinstance(module, BertEmbeddings):
            hf_init.copy_(
                module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1))
            )
            hf_init.zeros_(module.token_type_ids)

    def _mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        mask: torch.Tensor | None = create_bidirectional_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        return mask

    def encode_lower(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> LowerStates:
        """The frozen lower layers; their output is what the cache stores."""
        if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"input_ids and attention_mask must both be (B, T), got "
                f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
            )
        hidden = self.embeddings(input_ids=input_ids)  # (B, T, H)
        mask = self._mask(hidden, attention_mask)
        for layer in self.layers[: self.n_lower]:
            hidden = layer(hidden, mask)
        return LowerStates(hidden=hidden, attention_mask=attention_mask)

    def forward_upper(
        self,
        states: LowerStates,
        *,
        ffn: Callable[[int, TanbrExperts, torch.Tensor], torch.Tensor] | None = None,
        pack: bool = False,
        tap: list[torch.Tensor] | None = None,
        first: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MoE layers, masked mean pooling and the joint head: logits (B, n_labels).

        ``ffn(i, experts, attended)``, if given, replaces the MoE block of the i-th MoE layer
        (the upper layers are all MoE layers): training's differentiable merges use it.
        ``pack``: the MoE blocks run on the real tokens only (see :class:`TanbrMoELayer`); not
        for blocks that need each sequence whole (soft merging) or a per-sequence gate record.
        ``tap``: receives the first MoE block's input (B, T, H), which no merge changes;
        ``first``: that input, computed before (the first layer's attention is skipped)."""
        dtype = self.classifier.weight.dtype
        hidden = states.hidden.to(dtype)  # (B, T, H)
        keep = states.attention_mask.to(dtype)  # (B, T)
        mask = self._mask(hidden, states.attention_mask)
        if ffn is None:
            real = states.attention_mask.bool() if pack else None
            for i, layer in enumerate(self.layers[self.n_lower :]):
                hidden = layer(
                    hidden,
                    mask,
                    keep=real,
                    tap=tap if i == 0 else None,
                    attended=first if i == 0 else None,
                )
        else:
            for i, moe in enumerate(self.moe_layers()):
                hidden = moe(hidden, mask, ffn=functools.partial(ffn, i, moe.mlp.experts))
        pooled = (hidden * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp(min=1.0)
        logits: torch.Tensor = self.classifier(self.dropout(pooled))  # (B, n_labels)
        return logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_labels) for token ids (B, T)."""
        return self.forward_upper(self.encode_lower(input_ids, attention_mask))


AutoConfig.register(MODEL_TYPE, TanbrMoEConfig, exist_ok=True)
AutoModel.register(TanbrMoEConfig, TanbrMoEClassifier, exist_ok=True)


# ----------------------------------------------------------------------------------------------
# A ragged bank of lower states for many texts, and its content-keyed cache


@dataclass(frozen=True)
class StateBank:
    """Lower states of N texts stored ragged (no padding): tokens (S, H), offsets (N + 1,)."""

    tokens: torch.Tensor  # (S, H), fp16
    offsets: torch.Tensor  # (N + 1,), int64

    def __len__(self) -> int:
        return int(self.offsets.shape[0] - 1)

    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]  # (N,)

    def batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> LowerStates:
        """Pad the selected texts' states into one batch (padded to the longest selected)."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        if idx.ndim != 1 or idx.numel() == 0:
            raise ValueError(
                f"indices must be a non-empty 1-D sequence, got shape {tuple(idx.shape)}"
            )
        if int(idx.min()) < 0 or int(idx.max()) >= len(self):
            raise ValueError(f"indices must be in [0, {len(self)}), got {idx.min()}..{idx.max()}")
        starts, lengths = self.offsets[idx], self.lengths()[idx]
        t = int(lengths.max())
        hidden = self.tokens.new_zeros((idx.numel(), t, self.tokens.shape[1]))  # (B, T, H)
        mask = torch.zeros((idx.numel(), t), dtype=torch.long)  # (B, T)
        for row, (s, n) in enumerate(zip(starts.tolist(), lengths.tolist(), strict=True)):
            hidden[row, :n] = self.tokens[s : s + n]
            mask[row, :n] = 1
        return LowerStates(hidden=hidden, attention_mask=mask)

    def batches(
        self, indices: Sequence[int] | np.ndarray, batch_size: int
    ) -> Iterator[tuple[np.ndarray, LowerStates]]:
        """Length-sorted batches (less padding); yields (positions into ``indices``, states)."""
        idx = np.asarray(indices, dtype=np.int64)
        order = np.argsort(self.lengths().numpy()[idx], kind="stable")
        for start in range(0, len(order), batch_size):
            pos = order[start : start + batch_size]
            yield pos, self.batch(idx[pos])

    def save(self, path: Path) -> None:
        torch.save({"tokens": self.tokens, "offsets": self.offsets}, path)

    @classmethod
    def load(cls, path: Path) -> StateBank:
        try:
            blob = torch.load(path, weights_only=True)
            bank = cls(tokens=blob["tokens"], offsets=blob["offsets"])
        except Exception as err:  # a truncated or foreign file: say which one
            raise ValueError(f"corrupt lower-state cache file {path}: {err}") from err
        if bank.tokens.ndim != 2 or int(bank.offsets[-1]) != bank.tokens.shape[0]:
            raise ValueError(f"corrupt lower-state cache file {path}: inconsistent shapes")
        return bank


def _texts_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for text in texts:
        h.update(hashlib.sha256(text.encode()).digest())
    return h.hexdigest()


def lower_fingerprint(model: TanbrMoEClassifier) -> str:
    """sha256 of the frozen part (embeddings + lower layers): the states depend on nothing else."""
    h = hashlib.sha256()
    state = model.state_dict()
    lower_prefixes = ("embeddings.", *(f"layers.{i}." for i in range(model.n_lower)))
    for name in sorted(state):
        if name.startswith(lower_prefixes):
            tensor = state[name].detach().to(torch.float32).contiguous().numpy()
            h.update(name.encode())
            h.update(tensor.tobytes())
    return h.hexdigest()


@torch.inference_mode()
def compute_lower_states(
    model: TanbrMoEClassifier,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int,
    batch_size: int = 64,
    progress: bool = False,
) -> StateBank:
    """Run the frozen lower layers over ``texts`` (length-sorted batches) into a ragged bank."""
    if not texts:
        raise ValueError("texts must not be empty")
    from tqdm.auto import tqdm

    was_training = model.training
    model.train(False)
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    ids: list[list[int]] = enc["input_ids"]
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = torch.empty((int(offsets[-1]), model.config.hidden_size), dtype=torch.float16)
    bar = tqdm(total=len(texts), desc="lower states", unit="text", disable=not progress)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        t = int(lengths[rows].max())
        input_ids = torch.full((len(rows), t), tokenizer.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        for r, i in enumerate(rows):
            input_ids[r, : lengths[i]] = torch.tensor(ids[i])
            mask[r, : lengths[i]] = 1
        states = model.encode_lower(input_ids, mask)
        for r, i in enumerate(rows):
            tokens[offsets[i] : offsets[i + 1]] = states.hidden[r, : lengths[i]].to(torch.float16)
        bar.update(len(rows))
    bar.close()
    model.train(was_training)
    return StateBank(tokens=tokens, offsets=torch.as_tensor(offsets))


def cached_lower_states(
    model: TanbrMoEClassifier,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    *,
    max_length: int,
    fingerprint: str | None = None,
    batch_size: int = 64,
    progress: bool = False,
    compute: bool = True,
) -> StateBank | None:
    """:func:`compute_lower_states`, cached under ``cache_dir("lower-states", ...)`` by content.

    The key holds the lower layers' fingerprint, the tokenizer length limit and the texts
    themselves, so any change of model or input recomputes. ``compute=False``: only look the
    cache up (None when it has no entry).
    """
    from tanbr.cache import cache_dir

    fp = fingerprint or lower_fingerprint(model)
    folder = cache_dir("lower-states", fp, max_length, _texts_digest(texts), len(texts))
    path = folder / "states.pt"
    if path.is_file():
        bank = StateBank.load(path)
        if len(bank) == len(texts):
            log.debug("lower states from cache %s", folder)
            return bank
        log.warning("lower-state cache %s has %d texts, expected %d", folder, len(bank), len(texts))
    if not compute:
        return None
    bank = compute_lower_states(
        model, tokenizer, texts, max_length=max_length, batch_size=batch_size, progress=progress
    )
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"states.pt.tmp{id(bank)}"
    bank.save(tmp)
    tmp.replace(path)
    return bank


# ----------------------------------------------------------------------------------------------
# The tokenizer-aware front used by the CLI, the service and the experiments


class DefaultModel:
    """A loaded default-model checkpoint: model, tokenizer, labels and tasks."""

    def __init__(
        self,
        model: TanbrMoEClassifier,
        tokenizer: PreTrainedTokenizerBase,
        *,
        info: dict[str, Any],
        path: Path | None = None,
        lean: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.path = path
        self.lean = lean  # the experts stay in the checkpoint's safetensors (see load)
        id2label = {int(k): str(v) for k, v in (model.config.id2label or {}).items()}
        self.labels: tuple[str, ...] = tuple(id2label[i] for i in range(len(id2label)))
        self.tasks: tuple[str, ...] = tuple(model.config.task_names or ())
        self.max_length: int = int(info.get("max_length", 128))
        self._fingerprint: str | None = info.get("lower_fingerprint")

    @classmethod
    def load(
        cls, path: str | Path, *, lean: bool = False, dtype: torch.dtype | None = None
    ) -> DefaultModel:
        """Load a checkpoint folder written by :func:`tanbr.model.default.build_default_model`.

        ``lean``: memory-lean, the routed experts are never loaded (a merge reads them from the
        folder's safetensors; see :func:`tanbr.model.load_checkpoint`). ``dtype``: load in this
        precision instead of the checkpoint's (a serving process then holds one copy only).
        """
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"no checkpoint (config.json) in {path}")
        info_path = path / TASKS_FILE
        try:
            info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"corrupt {info_path}: {err}") from err
        if lean:
            model = load_checkpoint(path, lean=True, dtype=dtype).model
        else:
            model = AutoModel.from_pretrained(path, **({"dtype": dtype} if dtype else {}))
        if not isinstance(model, TanbrMoEClassifier):
            raise ValueError(f"{path} holds a {type(model).__name__}, not a {MODEL_TYPE} model")
        model.train(False)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(model, tokenizer, info=info, path=path, lean=lean)

    def task_of_label(self) -> np.ndarray:
        """Task id of each joint label, shape (n_labels,)."""
        index = {t: i for i, t in enumerate(self.tasks)}
        return np.array([index[label.split(":", 1)[0]] for label in self.labels])

    def lower_states(
        self, texts: Sequence[str], *, cache: bool = True, progress: bool = False
    ) -> StateBank:
        """Lower states of ``texts``, from the content-keyed cache when ``cache``.

        The build caches the states of the float32 encoder under its fingerprint; a model
        loaded in another precision reads them from there, and computes (and caches under its
        own fingerprint) only what that cache lacks."""
        if cache:
            fingerprint = self._fingerprint
            if fingerprint and self.model.dtype != torch.float32:
                bank = cached_lower_states(
                    self.model,
                    self.tokenizer,
                    texts,
                    max_length=self.max_length,
                    fingerprint=fingerprint,
                    compute=False,
                )
                if bank is not None:
                    return bank
                fingerprint = None
            bank = cached_lower_states(
                self.model,
                self.tokenizer,
                texts,
                max_length=self.max_length,
                fingerprint=fingerprint,
                progress=progress,
            )
            assert bank is not None
            return bank
        return compute_lower_states(
            self.model, self.tokenizer, texts, max_length=self.max_length, progress=progress
        )

    @torch.inference_mode()
    def predict_states(self, bank: StateBank, *, batch_size: int = 64) -> np.ndarray:
        """Class probabilities (N, n_labels) from precomputed lower states."""
        probs = np.zeros((len(bank), len(self.labels)), dtype=np.float32)
        for pos, states in bank.batches(np.arange(len(bank)), batch_size):
            probs[pos] = F.softmax(self.model.forward_upper(states), dim=-1).float().numpy()
        return probs

    def predict(self, texts: Sequence[str], *, cache: bool = False) -> np.ndarray:
        """Class probabilities (N, n_labels) over the joint ``"task:label"`` labels."""
        if isinstance(texts, str):
            raise ValueError("texts must be a sequence of strings, not one string")
        bad = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
        if bad:
            raise ValueError(f"texts must be non-empty strings; bad positions {bad[:10]}")
        return self.predict_states(self.lower_states(texts, cache=cache))
