"""What the backends of Hugging Face MoE checkpoints share: merging, signatures, caches, memo.

A checkpoint folder (``config.json``, safetensors weights, the tokenizer) is loaded with
:func:`tanbr.model.load_checkpoint`, memory-lean by default (the routed experts stay on disk
until a merge or a restore reads them), and served end to end: every request is tokenised and
runs through the whole model in length-sorted, right-padded batches. The sequence classifier
(:mod:`tanbr.backend.hf_classifier`) and the causal language model (:mod:`tanbr.backend.hf_lm`)
differ only in what a batch's forward pass returns.

Signatures are those of :mod:`tanbr.backend.hf_signatures`: ``input0`` and ``gate0`` on the
served path (the forward pass stops before the first MoE block), ``gates`` and ``gates+head``
from a full-MoE pass.

Requests whose ``rows`` index :attr:`HFBackend.texts` (the pools' texts) are cached per row:
signatures, gate probabilities and the full MoE's predictions once, and, with ``memo``, the
outputs of every (served model, request) pair. Live requests (no rows) are never cached.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar

import numpy as np
import torch
from torch import nn

from tanbr.backend.hf_signatures import (
    SIGNATURES,
    full_moe_gates,
    scatter,
    served_signatures,
)
from tanbr.backend.plans import ServedState
from tanbr.backend.protocol import Plan, Prediction
from tanbr.backend.requests import Requests
from tanbr.backend.tokenizer import Batch, encode, pad_batches
from tanbr.model import (
    LoadedModel,
    fisher_plan,
    regmean_plan,
    sampled_label_log_likelihood,
    sampled_token_log_likelihood,
)
from tanbr.model.task_regmean import TypeStats, group_by_type, task_regmean_stats

log = logging.getLogger(__name__)

T = TypeVar("T")


class HFBackend:
    """The machinery of a backend on a transformers MoE checkpoint; subclasses say what a
    batch's forward pass returns (:meth:`_outputs`, :meth:`_head`, :meth:`_prediction`).

    Parameters
    ----------
    loaded
        The checkpoint as :func:`tanbr.model.load_checkpoint` returns it (model and merger).
    tokenizer
        The folder's tokenizer (see :func:`tanbr.backend.tokenizer.load_tokenizer`).
    texts
        The texts that ``rows`` of :class:`Requests` index (the pools' texts).
    signature
        One of :data:`SIGNATURES`.
    batch_size
        Requests per forward pass when serving.
    memo
        Reuse the outputs of a (served model, request row) pair computed before (offline
        evaluation repeats them); merges are then deferred until a forward pass needs them.
    memo_batch_size
        Requests per forward pass when the memo computes what it lacks.
    max_length
        Tokens kept per request.
    """

    kind = ""

    def __init__(
        self,
        loaded: LoadedModel,
        tokenizer: Any,
        *,
        texts: Sequence[str] = (),
        signature: str = "gate0",
        batch_size: int = 32,
        memo: bool = False,
        memo_batch_size: int = 16,
        max_length: int = 512,
    ) -> None:
        if signature not in SIGNATURES:
            raise ValueError(f"estimator.signature must be one of {SIGNATURES}, got {signature!r}")
        for name, value in (
            ("batch_size", batch_size),
            ("memo_batch_size", memo_batch_size),
            ("max_length", max_length),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.model: nn.Module = loaded.model.eval()
        self.merger = loaded.merger
        self.config = loaded.config
        self.path = Path(loaded.path)
        self.tokenizer = tokenizer
        self.texts = tuple(texts)
        self.signature = signature
        self.batch_size = batch_size
        self.memo = memo
        self.memo_batch_size = memo_batch_size
        limit = getattr(self.config.get_text_config(), "max_position_embeddings", None)
        self.max_length = min(max_length, limit) if isinstance(limit, int) else max_length
        self.dtype = next(self.model.parameters()).dtype
        blocks = self.merger.blocks
        self.served = ServedState(self.merger, self.model)
        self._blocks = {b.name: b.n_experts for b in blocks}
        self._n_gates = sum(self._blocks.values())
        self._first = blocks[0]
        self._sig_cache: dict[str, dict[int, np.ndarray]] = {}  # kind -> row -> signature
        self._sig_ms = 0.0  # time spent computing the configured signature, and for how many
        self._sig_n = 0
        self._gate_cache: dict[int, np.ndarray] = {}  # row -> gates (and head) of the full MoE
        self._ref_cache: dict[int, int] = {}  # row -> the full MoE's prediction
        self._memo: dict[bytes, dict[int, np.ndarray]] = {}  # state -> row -> outputs

    # --- what subclasses define -------------------------------------------------------------

    def _outputs(self, batch: Batch) -> np.ndarray:
        """(b, ...) what the model as set answers for a batch (class probabilities, token ids)."""
        raise NotImplementedError

    def _head(self, batch: Batch) -> np.ndarray:
        """(b, d) the head's part of the ``gates+head`` signature; runs the forward pass."""
        raise NotImplementedError

    def _prediction(self, values: np.ndarray, latency_ms: float, merge_ms: float) -> Prediction:
        raise NotImplementedError

    @property
    def _head_width(self) -> int:
        return 0

    # --- Backend protocol -------------------------------------------------------------------

    @property
    def blocks(self) -> Mapping[str, int]:
        return self._blocks

    @property
    def labels(self) -> tuple[str, ...]:
        return ()

    @property
    def n_labels(self) -> int:
        return len(self.labels)

    @property
    def checkpoint(self) -> Path | None:
        return self.path

    @property
    def signature_cost(self) -> float:
        """Milliseconds per request spent computing the configured signature so far (cached
        requests counted once): what the estimator adds to each served request."""
        return self._sig_ms / self._sig_n if self._sig_n else 0.0

    def signatures(self, requests: Requests) -> np.ndarray:
        """The configured signature of each request (the estimator's input on the served path)."""
        return self.features(requests, self.signature)

    def features(self, requests: Requests, kind: str) -> np.ndarray:
        """(n, d) signatures of any kind in :data:`SIGNATURES` (cached per request row)."""
        if kind not in SIGNATURES:
            raise ValueError(f"signature must be one of {SIGNATURES}, got {kind!r}")
        cache = self._sig_cache.setdefault(kind, {})
        return self._per_row(cache, requests, lambda r: self._timed(kind, r), self._width(kind))

    def gate_probs(self, requests: Requests) -> dict[str, np.ndarray]:
        joined = self._full_features(requests)
        bounds = np.cumsum([0, *self._blocks.values()])
        return {
            name: joined[:, a:b]
            for name, a, b in zip(self._blocks, bounds[:-1], bounds[1:], strict=True)
        }

    def merge(self, plan: Plan) -> float:
        """Merge now, or (with the memo) when a forward pass first needs it."""
        self.served.want_merge(plan)
        return 0.0 if self.memo else self.served.sync()

    def static_plan(self, kind: str, requests: Requests) -> Plan:
        """A static merge computed with the full MoE on unlabeled calibration ``requests``:
        ``regmean`` or ``fisher`` (the Fisher taken at outputs the model samples from its own
        predictions: no label or target is read)."""
        if kind not in ("regmean", "fisher"):
            raise ValueError(f"static merge must be one of ('regmean', 'fisher'), got {kind!r}")
        with self.served.full_moe(sync_after=not self.memo), torch.inference_mode(False):
            batches = [
                {"input_ids": b.input_ids, "attention_mask": b.attention_mask}
                for b in self._batches(requests.texts, 8)
            ]
            if kind == "regmean":
                return regmean_plan(self.model, self.merger.blocks, batches)
            generator = torch.Generator().manual_seed(0)
            sampled = (
                sampled_token_log_likelihood if self.kind == "lm" else sampled_label_log_likelihood
            )
            loss_fn = functools.partial(sampled, generator=generator)
            return fisher_plan(self.model, self.merger.blocks, batches, loss_fn)

    def task_regmean_stats(
        self, requests: Requests, assign: np.ndarray, n_types: int
    ) -> Mapping[str, TypeStats]:
        """Task-aware RegMean's per-type statistics, from each type's unlabeled calibration
        requests run through the full MoE (batched as the static merges are)."""
        groups = group_by_type(requests.texts, assign, n_types)
        with self.served.full_moe(sync_after=not self.memo), torch.inference_mode(False):
            batches = [
                [
                    {"input_ids": b.input_ids, "attention_mask": b.attention_mask}
                    for b in (self._batches(texts, 8) if texts else ())
                ]
                for texts in groups
            ]
            return task_regmean_stats(self.model, self.merger.blocks, batches)

    def merge_soft(self) -> float:
        self.served.want_soft()
        return 0.0 if self.memo else self.served.sync()

    def restore(self, *, streamed: bool = False) -> float:
        self.served.want_full(streamed=streamed)
        return self.served.sync()

    def idle(self) -> None:
        self.served.idle()

    def predict(self, requests: Requests) -> Prediction:
        rows = self._rows(requests)
        if not self.memo or rows is None:
            merge_ms = self.served.sync()
            values, spent = self._serve(requests.texts, self.batch_size)
            return self._prediction(values, spent, merge_ms)
        cache = self._memo.setdefault(self.served.key(), {})
        todo = list(dict.fromkeys(r for r in rows if r not in cache))
        spent = merge_ms = 0.0
        if todo:
            merge_ms = self.served.sync()
            fresh, spent = self._serve([self.texts[r] for r in todo], self.memo_batch_size)
            cache.update(zip(todo, fresh, strict=True))
        values = np.stack([cache[r] for r in rows]) if rows else self._serve([], 1)[0]
        return self._prediction(values, spent, merge_ms)

    def reference(self, requests: Requests) -> np.ndarray:
        def full(r: Requests) -> np.ndarray:
            values, _ = self._with_full(lambda: self._serve(r.texts, self.batch_size))
            return self._prediction(values, 0.0, 0.0).predictions

        out = self._per_row(self._ref_cache, requests, full, None)
        return np.asarray(out, dtype=np.int64)

    def memory_bytes(self) -> int:
        """Parameter bytes the model as set needs resident: everything but the routed experts
        and one merged expert per block when merged (memory-lean serving keeps the originals
        on disk); every expert for the full MoE and soft merging."""
        return self.served.param_bytes()

    def replica(self, *, experts: bool = True) -> Self:
        """A copy with its own module tree, tokenizer and merger, sharing every tensor and the
        per-request caches (and the memo). The tokenizer is copied because a fast tokenizer
        must not be used by two threads at once. ``experts=False``: see
        :meth:`~tanbr.backend.protocol.Backend.replica`."""
        self.served.originals(experts=experts)  # the original tree, no merged tensor
        shared: dict[int, Any] = {id(t): t for t in self.model.parameters()}
        shared.update({id(t): t for t in self.model.buffers()})
        for value in (*self._caches(), self.texts):
            shared[id(value)] = value
        twin: Self = copy.deepcopy(self, shared)
        return twin

    def _caches(self) -> list[dict[Any, Any]]:
        """The per-request caches and memos, which replicas share (their values depend on the
        request and the merge, never on which replica computed them)."""
        return [self._sig_cache, self._gate_cache, self._ref_cache, self._memo]

    # --- caches shared with other processes -------------------------------------------------

    def export_caches(self) -> dict[str, dict[Any, Any]]:
        """The per-request caches (signatures, gate probabilities, full-MoE predictions), for
        another process serving the same texts (parallel experiment runs)."""
        return {
            "sig": self._sig_cache,
            "gate": self._gate_cache,
            "ref": self._ref_cache,
            "sig_cost": {0: (self._sig_ms, self._sig_n)},
        }

    def import_caches(self, caches: Mapping[str, Mapping[Any, Any]]) -> None:
        for kind, cache in caches.get("sig", {}).items():
            self._sig_cache.setdefault(str(kind), {}).update(cache)
        cost = caches.get("sig_cost", {}).get(0)
        if cost is not None:
            self._sig_ms, self._sig_n = float(cost[0]), int(cost[1])
        self._gate_cache.update(caches.get("gate", {}))
        self._ref_cache.update(caches.get("ref", {}))

    def release_bank(self) -> None:
        """Forget the pools' texts (a live service serves texts, not rows)."""
        self.texts = ()

    # --- model state ------------------------------------------------------------------------

    def _with_full(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (forward passes) on the full MoE, then ask for the served merge again.

        Without a memo (a live service), a memory-lean model streams the full MoE, a block's
        experts at a time; with one (an experiment replaying its requests) such passes are
        rare, and reading every expert once is cheaper than once per batch."""
        with self.served.full_moe(sync_after=not self.memo, streamed=not self.memo):
            return fn()

    # --- requests ---------------------------------------------------------------------------

    def _rows(self, requests: Requests) -> list[int] | None:
        """The requests' rows into :attr:`texts`, checked; None for live requests."""
        if requests.rows is None or not self.texts:
            return None
        rows = requests.rows.tolist()
        for i, (row, text) in enumerate(zip(rows, requests.texts, strict=True)):
            if row >= len(self.texts):
                raise ValueError(f"request rows must be in [0, {len(self.texts)}), got {row}")
            if self.texts[row] != text:
                raise ValueError(f"request {i} carries row {row}, which holds another text")
        return [int(r) for r in rows]

    def _per_row(
        self,
        cache: dict[int, Any],
        requests: Requests,
        compute: Callable[[Requests], np.ndarray],
        width: int | None,
    ) -> np.ndarray:
        """``compute`` on the requests, reading and filling a per-row cache when they have
        rows. ``width``: the second dimension of the result (None: a vector)."""
        if len(requests) == 0:  # (no full-MoE pass, no expert read, for nothing)
            return np.zeros((0,) if width is None else (0, width))
        rows = self._rows(requests)
        if rows is None:
            return compute(requests)
        todo = sorted(set(rows) - cache.keys())
        if todo:
            missing = Requests(tuple(self.texts[r] for r in todo), np.asarray(todo))
            cache.update(zip(todo, compute(missing), strict=True))
        values = [cache[r] for r in rows]
        return np.asarray(values) if width is None else np.stack(values)

    def _encode(self, texts: Sequence[str]) -> list[list[int]]:
        return encode(self.tokenizer, texts, max_length=self.max_length)

    def _batches(self, texts: Sequence[str], batch_size: int) -> Iterator[Batch]:
        pad = int(self.tokenizer.pad_token_id)
        return pad_batches(self._encode(texts), batch_size, pad)

    def _body(self) -> nn.Module:
        """The transformer under the head (embeddings, layers, final norm)."""
        body: nn.Module = getattr(self.model, str(getattr(self.model, "base_model_prefix", "")))
        return body

    # --- forward passes ---------------------------------------------------------------------

    def _serve(self, texts: Sequence[str], batch_size: int) -> tuple[np.ndarray, float]:
        """The outputs of the model as set for ``texts``, and the time spent (tokenising
        included: the requests are served end to end)."""
        t0 = time.perf_counter()
        batches = list(self._batches(texts, batch_size))
        spent = time.perf_counter() - t0
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        soft = self.merger.mode == "soft"
        with torch.inference_mode():
            for batch in batches:
                if soft:
                    self.merger.set_token_mask(batch.attention_mask)
                t0 = time.perf_counter()
                parts.append((batch.pos, self._outputs(batch)))
                spent += time.perf_counter() - t0
        return scatter(parts, len(texts), self._empty_outputs()), spent * 1e3

    def _empty_outputs(self) -> np.ndarray:
        return np.zeros((0, self.n_labels), dtype=np.float32)

    def _width(self, kind: str) -> int:
        return {
            "input0": self._first.hidden_size,
            "gate0": self._first.n_experts,
            "gates": self._n_gates,
            "gates+head": self._n_gates + self._head_width,
        }[kind]

    def _timed(self, kind: str, requests: Requests) -> np.ndarray:
        t0 = time.perf_counter()
        if kind in ("gates", "gates+head"):
            out = self._full_features(requests)[:, : self._width(kind)]
        else:
            out = self._prefix_signatures(requests.texts, kind)
        if kind == self.signature:
            self._sig_ms += (time.perf_counter() - t0) * 1e3
            self._sig_n += len(requests)
        return out

    def _prefix_signatures(self, texts: Sequence[str], kind: str) -> np.ndarray:
        parts = []
        with torch.inference_mode():
            for batch in self._batches(texts, self.batch_size):
                feats = served_signatures(self.model, self._body(), self._first, batch, kind)
                parts.append((batch.pos, feats))
        return scatter(parts, len(texts), np.zeros((0, self._width(kind))))

    def _full_features(self, requests: Requests) -> np.ndarray:
        """(n, sum E + head): every block's gate probabilities and the head's part under the
        full MoE, from one pass (cached per request row)."""

        def full(r: Requests) -> np.ndarray:
            return self._with_full(lambda: self._full_pass(r.texts))

        return self._per_row(self._gate_cache, requests, full, self._width("gates+head"))

    def _full_pass(self, texts: Sequence[str]) -> np.ndarray:
        batches = list(self._batches(texts, self.batch_size))
        with torch.inference_mode():
            parts = full_moe_gates(self.model, self.merger.blocks, batches, self._head)
        return scatter(parts, len(texts), np.zeros((0, self._width("gates+head"))))
