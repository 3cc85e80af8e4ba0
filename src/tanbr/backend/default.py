"""The embedded default model as a :class:`~tanbr.backend.protocol.Backend`.

Serving cost is dominated by the frozen lower layers, which no merge changes, so requests that
carry ``rows`` are served from a bank of cached lower states and only the MoE layers and the
head run per slot (the experiment does this; live texts are tokenised and encoded end to end).

Request signatures (the estimator's input) must not depend on the merge being served, or the
estimator would see its own decisions. Two families exist, and their costs differ:

* **On the served path** (:data:`SERVED_SIGNATURES`; no expert runs). ``input0`` is the input of
  the first MoE block (the output of the first upper layer's attention over the lower states)
  mean-pooled over the request's tokens; ``gate0`` is the first block's own gate probabilities on
  that input, averaged over the tokens. The served forward computes both anyway, before any
  expert, whatever merge is served. ``embedding`` is the mean-pooled lower states (the frozen
  encoder's view); ``gate0+embedding`` concatenates gate0 and embedding.
* **Full MoE** (``gates``: every block's gate probabilities under the full MoE; ``gates+head``:
  those and the full MoE's probability of each task, its joint labels' probabilities summed).
  They cost a full-MoE pass over every request they sign, a cost charged to the policies that
  use them; their place is the one-off clustering of calibration requests into task types
  (:class:`~tanbr.experiment.estimator.ReadoutEstimator`), not the served path.

The time spent computing the configured signature is counted
(:attr:`DefaultBackend.signature_cost`).
"""

from __future__ import annotations

import collections
import copy
import functools
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tanbr.backend.plans import ServedState
from tanbr.backend.protocol import Plan, Prediction
from tanbr.backend.requests import Pool, Requests
from tanbr.model import (
    GateRecorder,
    Merger,
    fisher_plan,
    regmean_plan,
    sampled_label_log_likelihood,
)
from tanbr.model import gate_probs as block_gate_probs
from tanbr.model.checkpoint import expert_store
from tanbr.model.default.build import build_default_model, built_suite
from tanbr.model.default.data import TaskSuite
from tanbr.model.default.modeling import DefaultModel
from tanbr.model.discovery import get_module
from tanbr.model.gates import masked_mean
from tanbr.model.precision import in_dtype, serving_dtype
from tanbr.model.task_regmean import TypeStats, group_by_type, task_regmean_stats

log = logging.getLogger(__name__)

SIGNATURES = ("input0", "gate0", "gates", "gates+head", "embedding", "gate0+embedding")
#: Signatures made of what the served forward computes anyway, before any expert runs.
SERVED_SIGNATURES = ("input0", "gate0", "embedding", "gate0+embedding")
STATIC_MERGES = ("regmean", "fisher")
LIVE_SIGNATURES = 8192  # live texts whose signature the service keeps from their forward


class DefaultBackend:
    """Serves a :class:`~tanbr.model.default.DefaultModel` through a :class:`~tanbr.model.Merger`.

    Parameters
    ----------
    model
        The loaded default model.
    texts
        Texts whose lower states are cached (rows of :class:`Requests` index this sequence).
    signature
        One of :data:`SIGNATURES`.
    batch_size
        Requests per forward pass (slots are split into length-sorted batches).
    dtype
        Serving precision: ``float32``, ``bfloat16`` (merges are summed in float32 and rounded
        once; about twice as fast on CPUs with AMX), or ``auto`` (bfloat16
        where the CPU has AMX tiles: :func:`~tanbr.model.precision.fast_bfloat16`).
    memo
        Reuse the class probabilities of a (served model, cached request) pair computed before.
        Exact up to float rounding (the model is deterministic in inference mode; only the
        grouping of requests into batches can differ); the time reported for a slot is
        then only the time of the requests actually computed. Live texts are never memoised.
    memo_batch_size
        Requests per forward pass when the memo computes what it lacks. Cached requests are run
        in length-sorted batches, so smaller batches carry less padding: a slot's 32 scored
        requests (half of a random batch of 32 is padding) take 220 ms in two batches of 16
        against 333 ms in one (float32, one thread). Timed serving keeps ``batch_size``.
    """

    def __init__(
        self,
        model: Any,
        *,
        texts: Sequence[str] = (),
        signature: str = "gate0",
        batch_size: int = 64,
        memo: bool = False,
        memo_batch_size: int = 16,
        progress: bool = False,
        dtype: str = "float32",
        group_top_k: int = 1,
    ) -> None:
        if signature not in SIGNATURES:
            raise ValueError(f"estimator.signature must be one of {SIGNATURES}, got {signature!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if memo_batch_size < 1:
            raise ValueError(f"memo_batch_size must be >= 1, got {memo_batch_size}")
        torch_dtype = serving_dtype(dtype)
        self.texts = tuple(texts)
        # the lower-state cache belongs to the float32 encoder the model was built with
        self.bank = model.lower_states(self.texts, progress=progress) if self.texts else None
        if torch_dtype != model.model.dtype:
            model = copy.copy(model)
            model.model = in_dtype(model.model, torch_dtype)
        self.dtype = torch_dtype
        self.dm = model
        self.model = model.model.eval()
        self.signature = signature
        self.batch_size = batch_size
        self.memo_batch_size = memo_batch_size
        lean = bool(getattr(model, "lean", False))
        store = expert_store(model.path, self.model) if lean else None
        self.merger = Merger(self.model, store=store, group_top_k=group_top_k)
        self.served = ServedState(self.merger, self.model)
        self._blocks = {b.name: b.n_experts for b in self.merger.blocks}
        self._n_gates = sum(self._blocks.values())  # width of the joined gate probabilities
        self._first = self.merger.blocks[0]
        self._sig_cache: dict[str, dict[int, np.ndarray]] = {}  # kind -> row -> signature
        self._sig_ms = 0.0  # time spent computing the configured signature, and for how many
        self._sig_n = 0
        # cached row -> the first MoE block's input (T, H) (offline evaluation with the memo)
        self._attended: dict[int, torch.Tensor] = {}
        # live text -> its served-path signature, recorded by the forward that served it
        self._live_sig: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._ref_cache: dict[int, int] = {}  # row -> the full MoE's predicted label
        # row -> every block's gate probs and the head's task probs under the full MoE, joined
        self._gate_cache: dict[int, np.ndarray] = {}
        self.memo = memo
        self._memo: dict[bytes, dict[int, np.ndarray]] = {}
        # (n_labels, K): which task each joint label "task:label" belongs to
        self._label_task = np.eye(len(model.tasks))[model.task_of_label()]

    def export_caches(self) -> dict[str, dict[Any, Any]]:
        """The per-request caches (signatures, gate probabilities, full-MoE labels), for another
        process serving the same texts (parallel experiment runs)."""
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

    # --- Backend protocol -----------------------------------------------------------------------

    kind = "classifier"

    @property
    def blocks(self) -> Mapping[str, int]:
        return self._blocks

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.dm.labels)

    @property
    def n_labels(self) -> int:
        return len(self.dm.labels)

    @property
    def checkpoint(self) -> Path | None:
        path = getattr(self.dm, "path", None)
        return None if path is None else Path(path)

    def replica(self, *, experts: bool = True) -> DefaultBackend:
        """A copy with its own module tree, tokenizer and merger, sharing every tensor (and the
        per-request caches). The tokenizer is copied because a fast tokenizer must not be used
        by two threads at once. ``experts=False``: see
        :meth:`~tanbr.backend.protocol.Backend.replica`."""
        self.served.originals(experts=experts)  # the original tree, no merged tensor
        shared: dict[int, Any] = {id(t): t for t in self.model.parameters()}
        shared.update({id(t): t for t in self.model.buffers()})
        caches = (self._sig_cache, self._ref_cache, self._gate_cache, self._live_sig)
        for value in (self.bank, self.texts, *caches):
            if value is not None:
                shared[id(value)] = value
        twin: DefaultBackend = copy.deepcopy(self, shared)
        return twin

    def release_bank(self) -> None:
        """Drop the cached lower states (a live service encodes its requests itself)."""
        self.bank = None
        self.texts = ()

    def signatures(self, requests: Requests) -> np.ndarray:
        """The configured signature of each request (the estimator's input on the served path)."""
        return self.features(requests, self.signature)

    @property
    def signature_cost(self) -> float:
        """Milliseconds per request spent computing the configured signature so far (cached
        requests counted once): what the estimator adds to each served request."""
        return self._sig_ms / self._sig_n if self._sig_n else 0.0

    def features(self, requests: Requests, kind: str) -> np.ndarray:
        """(n, d) signatures of any kind in :data:`SIGNATURES` (cached per request row)."""
        if kind not in SIGNATURES:
            raise ValueError(f"signature must be one of {SIGNATURES}, got {kind!r}")
        if requests.rows is None or self.bank is None:
            if kind != self.signature or not len(requests):
                return self._timed(kind, requests)
            return self._live_features(requests, kind)
        cache = self._sig_cache.setdefault(kind, {})
        rows = requests.rows.tolist()
        todo = np.array(sorted({r for r in rows if r not in cache}), dtype=np.int64)
        if len(todo):
            missing = Requests(tuple(self.texts[r] for r in todo), todo)
            cache.update(zip(todo.tolist(), self._timed(kind, missing), strict=True))
        if not rows:
            return np.zeros((0, 0))
        return np.stack([cache[r] for r in rows])

    def _live_features(self, requests: Requests, kind: str) -> np.ndarray:
        """Live texts: the signatures their serving forward recorded, the rest computed."""
        known = [self._live_sig.get(t) for t in requests.texts]
        missing = [i for i, sig in enumerate(known) if sig is None]
        if missing:
            fresh = self._timed(kind, requests.take(np.asarray(missing)))
            for i, sig in zip(missing, fresh, strict=True):
                known[i] = sig
        return np.stack([sig for sig in known if sig is not None])

    def _timed(self, kind: str, requests: Requests) -> np.ndarray:
        t0 = time.perf_counter()
        if kind == "gates":  # every block's gate under the full MoE
            out = self._full_features(requests)[:, : self._n_gates]
        elif kind == "gates+head":  # and the head's probability of each task
            out = self._full_features(requests)
        else:
            out = self._signatures_of(self._batches(requests, self.batch_size), kind)
        if kind == self.signature:
            self._sig_ms += (time.perf_counter() - t0) * 1e3
            self._sig_n += len(requests)
        return out

    def gate_probs(self, requests: Requests) -> dict[str, np.ndarray]:
        joined = self._full_features(requests)  # (n, sum E + K)
        bounds = np.cumsum([0, *self._blocks.values()])
        return {
            name: joined[:, a:b]
            for name, a, b in zip(self._blocks, bounds[:-1], bounds[1:], strict=True)
        }

    def task_probs(self, requests: Requests) -> np.ndarray:
        """(n, K) the full MoE's probability of each task: its joint labels' probabilities
        summed."""
        return self._full_features(requests)[:, self._n_gates :]

    def _full_features(self, requests: Requests) -> np.ndarray:
        """(n, sum E + K): every block's gate probabilities and the head's task probabilities
        under the full MoE, from one pass (cached per request row)."""
        if requests.rows is None or self.bank is None:
            live: np.ndarray = self._with_full(lambda: self._full_pass(requests))
            return live
        rows = requests.rows.tolist()
        todo = np.array(sorted({r for r in rows if r not in self._gate_cache}), dtype=np.int64)
        if len(todo):
            missing = Requests(tuple(self.texts[r] for r in todo), todo)
            fresh = self._with_full(lambda: self._full_pass(missing))
            self._gate_cache.update(zip(todo.tolist(), fresh, strict=True))
        return np.stack([self._gate_cache[r] for r in rows])

    def _full_pass(self, requests: Requests) -> np.ndarray:
        out = np.zeros((len(requests), self._n_gates + self._label_task.shape[1]))
        with torch.inference_mode(), GateRecorder(self.model, blocks=self.merger.blocks) as rec:
            for pos, states in self._batches(requests, self.batch_size):
                rec.clear()
                rec.set_mask(states.attention_mask)
                logits = self.model.forward_upper(states)  # (b, n_labels)
                gates = [rec.sequence_probs(name).double().numpy() for name in self._blocks]
                probs = torch.softmax(logits.float(), dim=-1).double().numpy()  # as predict
                out[pos] = np.concatenate([*gates, probs @ self._label_task], axis=1)
        return out

    def merge(self, plan: Plan) -> float:
        """Merge now, or (with the memo) when a forward pass first needs it: a slot whose
        predictions all come from the memo needs no merge at all."""
        self.served.want_merge(plan)
        return 0.0 if self.memo else self.served.sync()

    def static_plan(self, kind: str, requests: Requests) -> Plan:
        """A static merge computed on unlabeled calibration requests with the full MoE:
        ``regmean`` (RegMean's least-squares merge of each expert map, from the inputs the
        router sends each expert) or ``fisher`` (Fisher-weighted averaging, the Fisher taken at
        labels the model samples from its own predictions: no label is read)."""
        if kind not in STATIC_MERGES:
            raise ValueError(f"static merge must be one of {STATIC_MERGES}, got {kind!r}")
        with self.served.full_moe(sync_after=not self.memo):  # every expert in memory
            batches = self._token_batches(requests.texts, 16)
            if kind == "regmean":
                return regmean_plan(self.model, self.merger.blocks, batches)
            generator = torch.Generator().manual_seed(0)
            loss_fn = functools.partial(sampled_label_log_likelihood, generator=generator)
            return fisher_plan(self.model, self.merger.blocks, batches, loss_fn)

    def task_regmean_stats(
        self, requests: Requests, assign: np.ndarray, n_types: int
    ) -> Mapping[str, TypeStats]:
        """Task-aware RegMean's per-type statistics, from each type's unlabeled calibration
        requests run through the full MoE (tokenised as the static merges are)."""
        groups = group_by_type(requests.texts, assign, n_types)
        with self.served.full_moe(sync_after=not self.memo):  # every expert in memory
            batches = [self._token_batches(texts, 16) for texts in groups]
            return task_regmean_stats(self.model, self.merger.blocks, batches)

    def _token_batches(self, texts: Sequence[str], batch_size: int) -> list[dict[str, Any]]:
        """Tokenised batches the model's own forward takes (``model(**batch)``)."""
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self.dm.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.dm.max_length,
                return_tensors="pt",
            )
            out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        return out

    def merge_soft(self) -> float:
        self.served.want_soft()
        return 0.0 if self.memo else self.served.sync()

    def restore(self, *, streamed: bool = False) -> float:
        self.served.want_full(streamed=streamed)
        return self.served.sync()

    def idle(self) -> None:
        self.served.idle()

    @torch.inference_mode()
    def predict(self, requests: Requests) -> Prediction:
        if not self.memo or requests.rows is None or self.bank is None:
            merge_ms = self.served.sync()
            probs, spent = self._predict(requests)
            return Prediction(probs, spent, merge_ms)
        cache = self._memo.setdefault(self.served.key(), {})
        rows = requests.rows.tolist()
        todo = np.array([i for i, r in enumerate(rows) if r not in cache], dtype=np.int64)
        spent = merge_ms = 0.0
        if len(todo):
            merge_ms = self.served.sync()
            fresh, spent = self._predict(requests.take(todo), self.memo_batch_size)
            for i, p in zip(todo.tolist(), fresh, strict=True):
                cache[rows[i]] = p
        if not rows:
            return Prediction(np.zeros((0, self.n_labels), dtype=np.float32), 0.0)
        return Prediction(np.stack([cache[r] for r in rows]), spent, merge_ms)

    def reference(self, requests: Requests) -> np.ndarray:
        if requests.rows is not None and self.bank is not None:
            rows = requests.rows.tolist()
            todo = np.array(sorted({r for r in rows if r not in self._ref_cache}), dtype=np.int64)
            if len(todo):
                missing = Requests(tuple(self.texts[r] for r in todo), todo)
                labels = np.asarray(self._with_full(lambda: self.predict(missing).probs.argmax(1)))
                self._ref_cache.update(zip(todo.tolist(), labels.tolist(), strict=True))
            return np.array([self._ref_cache[r] for r in rows], dtype=np.int64)
        return np.asarray(self._with_full(lambda: self.predict(requests).probs.argmax(1)))

    def memory_bytes(self) -> int:
        """Parameter bytes the model as set needs resident to serve end to end.

        Merged: everything but the routed experts, and the plan's merged experts (one per
        block, or m for a grouped plan; the originals stay on disk in memory-lean serving). Full
        MoE and soft merging need every expert. The process's measured resident set is another
        figure (see :mod:`tanbr.experiment.memory`).
        """
        return self.served.param_bytes()

    # --- internals ------------------------------------------------------------------------------

    def _predict(
        self, requests: Requests, batch_size: int | None = None
    ) -> tuple[np.ndarray, float]:
        probs = np.zeros((len(requests), self.n_labels), dtype=np.float32)
        spent = 0.0
        soft = self.merger.mode == "soft"
        # live texts: keep the served-path signature the forward computes anyway
        record = requests.rows is None and self.signature in ("input0", "gate0")
        for pos, states in self._batches(requests, batch_size or self.batch_size):
            if soft:
                self.merger.set_token_mask(states.attention_mask)
            tap: list[torch.Tensor] | None = [] if record else None
            first = None
            if self.memo and requests.rows is not None:  # evaluation: reuse the merge-free part
                first = self._first_input(np.asarray(requests.rows)[pos], states)
            t0 = time.perf_counter()
            logits = self.model.forward_upper(states, pack=not soft, tap=tap, first=first)
            spent += time.perf_counter() - t0
            probs[pos] = torch.softmax(logits.float(), dim=-1).numpy()
            if tap:
                signed = self._from_input0(tap[0], states.attention_mask, self.signature)
                for i, sig in zip(np.asarray(pos).tolist(), signed, strict=True):
                    self._remember(requests.texts[i], sig)
        return probs, spent * 1e3

    def _first_input(self, rows: np.ndarray, states: Any) -> torch.Tensor:
        """The first MoE block's input for cached rows (b, T, H): the first upper layer's
        attention over the frozen lower states, which no merge changes, computed once per row
        and reused by every later merge (an evaluation device: exact up to float rounding, as
        the batch a row is computed in may differ)."""
        lengths = states.attention_mask.sum(1).tolist()
        if any(int(r) not in self._attended for r in rows):
            layer = self.model.moe_layers()[0]
            hidden = states.hidden.to(self.model.classifier.weight.dtype)
            attended, _ = layer.attention(hidden, self.model._mask(hidden, states.attention_mask))
            for i, (r, n) in enumerate(zip(rows.tolist(), lengths, strict=True)):
                self._attended[int(r)] = attended[i, : int(n)].clone()
            return attended  # type: ignore[no-any-return]
        out = torch.zeros(
            (len(rows), states.attention_mask.shape[1], states.hidden.shape[-1]),
            dtype=self.model.classifier.weight.dtype,
        )
        for i, (r, n) in enumerate(zip(rows.tolist(), lengths, strict=True)):
            out[i, : int(n)] = self._attended[int(r)]
        return out

    def _remember(self, text: str, signature: np.ndarray) -> None:
        """Keep a live text's signature (a bounded, oldest-first cache)."""
        self._live_sig[text] = signature
        self._live_sig.move_to_end(text)
        while len(self._live_sig) > LIVE_SIGNATURES:
            self._live_sig.popitem(last=False)

    def _from_input0(self, attended: torch.Tensor, mask: torch.Tensor, kind: str) -> np.ndarray:
        """The served-path signature from the first MoE block's input (b, T, H)."""
        if kind == "input0":
            return np.asarray(masked_mean(attended.float(), mask).double().numpy())
        gate = get_module(self.model, self._first.gate_name)
        probs = block_gate_probs(self._first, gate, attended)  # (b, T, E)
        return np.asarray(masked_mean(probs, mask).double().numpy())

    def _with_full(self, fn: Any) -> Any:
        """Run ``fn`` (forward passes) on the full MoE, then ask for the served merge again.

        Without a memo (a live service), a memory-lean model streams the full MoE, a block's
        experts at a time; with one (an experiment replaying its requests) such passes are
        rare, and reading every expert once is cheaper than once per batch."""
        with self.served.full_moe(sync_after=not self.memo, streamed=not self.memo):
            return fn()

    def _batches(self, requests: Requests, batch_size: int) -> Any:
        if requests.rows is not None and self.bank is not None:
            return self._row_batches(requests.rows, batch_size)
        return self._live_batches(requests.texts, batch_size)

    def _row_batches(self, rows: np.ndarray, batch_size: int) -> Any:
        if self.bank is None:
            raise ValueError("requests carry rows but the backend has no cached lower states")
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self.bank)):
            raise ValueError(f"request rows must be in [0, {len(self.bank)}), got {rows.max()}")
        return self.bank.batches(rows, batch_size)

    def _live_batches(self, texts: Sequence[str], batch_size: int) -> Any:
        """Tokenise and run the lower layers (end to end), batch by batch."""
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            enc = self.dm.tokenizer(
                chunk,
                padding=True,
                truncation=True,
                max_length=self.dm.max_length,
                return_tensors="pt",
            )
            with torch.inference_mode():
                states = self.model.encode_lower(enc["input_ids"], enc["attention_mask"])
            yield np.arange(start, start + len(chunk)), states

    @torch.inference_mode()
    def _signatures_of(self, batches: Any, kind: str) -> np.ndarray:
        layer = self.model.moe_layers()[0]
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        for pos, states in batches:
            feats: list[np.ndarray] = []
            hidden = states.hidden.to(self.model.classifier.weight.dtype)  # (b, T, H)
            mask = states.attention_mask  # (b, T)
            if kind in ("input0", "gate0", "gate0+embedding"):
                attended, _ = layer.attention(hidden, self.model._mask(hidden, mask))  # (b, T, H)
                feats.append(self._from_input0(attended, mask, kind.split("+")[0]))
            if kind in ("embedding", "gate0+embedding"):
                pooled = masked_mean(hidden.float(), mask).double()  # (b, H)
                feats.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
            parts.append((np.asarray(pos), np.concatenate(feats, axis=1)))
        n = sum(len(p) for p, _ in parts)
        out = np.zeros((n, parts[0][1].shape[1]))
        for pos, block_feats in parts:
            out[pos] = block_feats
        return out


# --- loading the default model and its task pools -----------------------------------------------


def load_default(
    *,
    variant: str = "default",
    path: str = "",
    progress: bool = False,
    lean: bool = False,
    dtype: str = "float32",
    tasks: str = "",
) -> tuple[DefaultModel, TaskSuite]:
    """The default model (built on first use) in the serving precision, and its task suite
    (the same seeded splits it was built on).

    Loaded once per process, folder and precision: commands run in one process (tests,
    notebooks) share it; whoever merges it must restore it (see :meth:`DefaultBackend.restore`).
    ``lean``: the routed experts stay on disk until a merge or a restore reads them. ``tasks``:
    where the task file of a model built on one is now (default: where it was at build time).
    """
    return _load_default(variant, str(path), progress, lean, dtype, tasks)


@functools.lru_cache(maxsize=2)
def _load_default(
    variant: str, path: str, progress: bool, lean: bool, dtype: str, tasks: str
) -> tuple[DefaultModel, TaskSuite]:
    folder = Path(path) if path else build_default_model(variant, progress=progress)
    model = DefaultModel.load(folder, lean=lean, dtype=serving_dtype(dtype))
    return model, built_suite(model.info, folder, tasks=tasks)


def make_pools(model: DefaultModel, suite: TaskSuite) -> tuple[list[str], Pool, Pool]:
    """Calibration and test pools whose rows index one list of texts: the suite's train,
    calibration and test texts in that order (the list the model's build cached the lower
    states of, so the cache is reused)."""
    label_index = {label: i for i, label in enumerate(model.labels)}
    task_index = {t: i for i, t in enumerate(model.tasks)}
    texts: list[str] = [e.text for e in suite.split("train")]
    pools = []
    for split in ("calib", "test"):
        examples = suite.split(split)
        rows = np.arange(len(texts), len(texts) + len(examples))
        texts += [e.text for e in examples]
        pools.append(
            Pool(
                tuple(e.text for e in examples),
                np.array([task_index[e.task] for e in examples]),
                np.array([label_index[e.target] for e in examples]),
                tuple(model.tasks),
                rows=rows,
            )
        )
    return texts, pools[0], pools[1]


def default_backend(
    *,
    variant: str = "default",
    path: str = "",
    signature: str = "gate0",
    memo: bool = False,
    progress: bool = False,
    dtype: str = "float32",
    lean: bool = False,
    tasks: str = "",
    group_top_k: int = 1,
) -> tuple[DefaultBackend, Pool, Pool]:
    """Load (or build) the default model, cache the lower states of its calibration and test
    splits, and return the backend with the two pools."""
    model, suite = load_default(
        variant=variant, path=path, progress=progress, lean=lean, dtype=dtype, tasks=tasks
    )
    texts, calib, test = make_pools(model, suite)
    backend = DefaultBackend(
        model,
        texts=texts,
        signature=signature,
        memo=memo,
        progress=progress,
        dtype=dtype,
        group_top_k=group_top_k,
    )
    return backend, calib, test
