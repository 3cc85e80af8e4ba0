"""The default model as the loop's :class:`~tanbr.experiment.loop.Backend`.

Serving cost is dominated by the frozen lower layers, which no merge changes, so requests that
carry ``rows`` are served from a bank of cached lower states and only the MoE layers and the
head run per slot (the experiment does this; live texts are tokenised and encoded end to end).

Request signatures (the estimator's input) must not depend on the merge being served, or the
estimator would see its own decisions. ``gate0`` uses the first MoE block's own gate: its input
is the output of the first upper layer's attention over the lower states, which no merge
touches; the signature is the gate's probabilities averaged over the request's tokens. Because
the default model's experts specialise by task, these probabilities are a compact, label-free
task fingerprint. ``embedding`` is the mean-pooled lower states (the frozen encoder's view);
``gate0+embedding`` concatenates both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tanbr.experiment.loop import Plan
from tanbr.experiment.slots import Requests
from tanbr.experiment.workload import Pool

log = logging.getLogger(__name__)

SIGNATURES = ("gate0", "embedding", "gate0+embedding")


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
    memo
        Reuse the class probabilities of a (served model, cached request) pair computed before.
        Exact (the model is deterministic in inference mode); the time reported for a slot is
        then only the time of the requests actually computed. Live texts are never memoised.
    """

    def __init__(
        self,
        model: Any,
        *,
        texts: Sequence[str] = (),
        signature: str = "gate0",
        batch_size: int = 64,
        memo: bool = False,
        progress: bool = False,
    ) -> None:
        from tanbr.model import Merger

        if signature not in SIGNATURES:
            raise ValueError(f"estimator.signature must be one of {SIGNATURES}, got {signature!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dm = model
        self.model = model.model.eval()
        self.signature = signature
        self.batch_size = batch_size
        self.merger = Merger(self.model)
        self._blocks = {b.name: b.n_experts for b in self.merger.blocks}
        self._first = self.merger.blocks[0]
        self._plan: dict[str, np.ndarray] | None = None
        self.texts = tuple(texts)
        self.bank = model.lower_states(self.texts, progress=progress) if self.texts else None
        self._sig_cache: np.ndarray | None = None
        self._ref_cache: np.ndarray | None = None
        self.memo = memo
        self._memo: dict[bytes, dict[int, np.ndarray]] = {}

    # --- Backend protocol -----------------------------------------------------------------------

    @property
    def blocks(self) -> Mapping[str, int]:
        return self._blocks

    @property
    def n_labels(self) -> int:
        return len(self.dm.labels)

    def signatures(self, requests: Requests) -> np.ndarray:
        if requests.rows is not None and self.bank is not None:
            if self._sig_cache is None:
                self._sig_cache = self._signatures_of(self._row_batches(np.arange(len(self.bank))))
            return np.asarray(self._sig_cache[requests.rows])
        return self._signatures_of(self._live_batches(requests.texts))

    def gate_probs(self, requests: Requests) -> dict[str, np.ndarray]:
        from tanbr.model import GateRecorder

        self.restore()
        out = {name: np.zeros((len(requests), e)) for name, e in self._blocks.items()}
        with torch.inference_mode(), GateRecorder(self.model, blocks=self.merger.blocks) as rec:
            for pos, states in self._batches(requests):
                rec.clear()
                rec.set_mask(states.attention_mask)
                self.model.forward_upper(states)
                for name in self._blocks:
                    out[name][pos] = rec.sequence_probs(name).double().numpy()  # (b, E)
        return out

    def merge(self, plan: Plan) -> float:
        if self._plan is not None and self.merger.merged and _same_plan(self._plan, plan):
            return 0.0  # the same merge is already being served
        stats = self.merger.apply(plan)
        self._plan = {k: np.array(v, dtype=np.float64) for k, v in plan.items()}
        return float(stats.merge_ms)

    def merge_soft(self) -> float:
        if self.merger.mode == "soft":
            return 0.0
        t0 = time.perf_counter()
        self.merger.apply_soft()
        self._plan = None
        return (time.perf_counter() - t0) * 1e3

    def restore(self) -> float:
        if self.merger.mode == "full":
            return 0.0
        t0 = time.perf_counter()
        self.merger.restore()
        self._plan = None
        return (time.perf_counter() - t0) * 1e3

    @torch.inference_mode()
    def predict(self, requests: Requests) -> tuple[np.ndarray, float]:
        if not self.memo or requests.rows is None or self.bank is None:
            return self._predict(requests)
        cache = self._memo.setdefault(self._state_key(), {})
        rows = requests.rows
        todo = np.array([i for i, r in enumerate(rows.tolist()) if r not in cache], dtype=np.int64)
        spent = 0.0
        if len(todo):
            fresh, spent = self._predict(requests.take(todo))
            for r, p in zip(rows[todo].tolist(), fresh, strict=True):
                cache[r] = p
        probs = (
            np.stack([cache[r] for r in rows.tolist()])
            if len(rows)
            else np.zeros((0, self.n_labels), dtype=np.float32)
        )
        return probs, spent

    def _state_key(self) -> bytes:
        """What the model currently computes: full, soft, or merged with a given plan."""
        if self.merger.mode != "merged" or self._plan is None:
            return self.merger.mode.encode()
        return b"merged" + b"".join(self._plan[name].tobytes() for name in sorted(self._plan))

    def _predict(self, requests: Requests) -> tuple[np.ndarray, float]:
        probs = np.zeros((len(requests), self.n_labels), dtype=np.float32)
        spent = 0.0
        soft = self.merger.mode == "soft"
        for pos, states in self._batches(requests):
            if soft:
                self.merger.set_token_mask(states.attention_mask)
            t0 = time.perf_counter()
            logits = self.model.forward_upper(states)  # (b, n_labels)
            spent += time.perf_counter() - t0
            probs[pos] = torch.softmax(logits.float(), dim=-1).numpy()
        return probs, spent * 1e3

    def reference(self, requests: Requests) -> np.ndarray:
        if requests.rows is not None and self.bank is not None:
            if self._ref_cache is None:
                everything = Requests(self.texts, np.arange(len(self.texts)))
                self._ref_cache = self._with_full(lambda: self.predict(everything)[0].argmax(1))
            return np.asarray(self._ref_cache[requests.rows])
        return self._with_full(lambda: self.predict(requests)[0].argmax(1))

    def memory_bytes(self) -> int:
        """Parameter bytes the model as currently set needs resident to serve end to end.

        Merged: the shared layers, gates and one merged expert per block (the originals stay on
        disk in memory-lean serving). Full MoE and soft merging need every expert.
        """
        tensors = [*self.model.parameters(), *self.model.buffers()]
        if self.merger.mode == "soft":
            tensors += [t for m in self.merger._originals.values() for t in m.parameters()]
        seen: set[int] = set()
        total = 0
        for t in tensors:
            if t.is_meta:
                continue
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total

    # --- internals ------------------------------------------------------------------------------

    def _with_full(self, fn: Any) -> np.ndarray:
        """Run ``fn`` on the full MoE, then put the served merge back."""
        mode, plan = self.merger.mode, self._plan
        self.restore()
        try:
            return np.asarray(fn())
        finally:
            if mode == "merged" and plan is not None:
                self.merge(plan)
            elif mode == "soft":
                self.merge_soft()

    def _batches(self, requests: Requests) -> Any:
        if requests.rows is not None and self.bank is not None:
            return self._row_batches(requests.rows)
        return self._live_batches(requests.texts)

    def _row_batches(self, rows: np.ndarray) -> Any:
        if self.bank is None:
            raise ValueError("requests carry rows but the backend has no cached lower states")
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self.bank)):
            raise ValueError(f"request rows must be in [0, {len(self.bank)}), got {rows.max()}")
        return self.bank.batches(rows, self.batch_size)

    def _live_batches(self, texts: Sequence[str]) -> Any:
        """Tokenise and run the lower layers (end to end), batch by batch."""
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
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
    def _signatures_of(self, batches: Any) -> np.ndarray:
        from tanbr.model import gate_probs as block_gate_probs
        from tanbr.model.discovery import get_module
        from tanbr.model.gates import masked_mean

        layer = self.model.moe_layers()[0]
        gate = get_module(self.model, self._first.gate_name)
        parts: list[tuple[np.ndarray, np.ndarray]] = []
        for pos, states in batches:
            feats: list[np.ndarray] = []
            hidden = states.hidden.to(self.model.classifier.weight.dtype)  # (b, T, H)
            mask = states.attention_mask  # (b, T)
            if self.signature in ("gate0", "gate0+embedding"):
                attended, _ = layer.attention(hidden, self.model._mask(hidden, mask))  # (b, T, H)
                probs = block_gate_probs(self._first, gate, attended)  # (b, T, E)
                feats.append(masked_mean(probs, mask).double().numpy())  # (b, E)
            if self.signature in ("embedding", "gate0+embedding"):
                pooled = masked_mean(hidden.float(), mask).double()  # (b, H)
                feats.append(torch.nn.functional.normalize(pooled, dim=-1).numpy())
            parts.append((np.asarray(pos), np.concatenate(feats, axis=1)))
        n = sum(len(p) for p, _ in parts)
        out = np.zeros((n, parts[0][1].shape[1]))
        for pos, block_feats in parts:
            out[pos] = block_feats
        return out


def _same_plan(a: Mapping[str, np.ndarray], b: Plan) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], np.asarray(b[k])) for k in a)


# --- loading the default model and its task pools -----------------------------------------------


def load_default(
    *, variant: str = "default", path: str = "", progress: bool = False
) -> tuple[Any, Any]:
    """The default model (built on first use) and its task suite (the same seeded splits)."""
    from tanbr.model.default.build import build_default_model
    from tanbr.model.default.data import load_tasks
    from tanbr.model.default.modeling import DefaultModel

    folder = Path(path) if path else build_default_model(variant, progress=progress)
    model = DefaultModel.load(folder)
    data = model.info.get("data", {})
    spec = model.info.get("spec", {})
    if not model.tasks or not data:
        raise ValueError(
            f"{folder} has no task information (tasks.json); build it with tanbr build-model"
        )
    suite = load_tasks(
        model.tasks,
        per_task=data.get("per_task"),
        min_per_label=data.get("min_per_label", 1),
        seed=data.get("seed", spec.get("seed", 0)),
    )
    digest = data.get("suite_digest")
    if digest and suite.digest() != digest:
        raise ValueError(
            f"the task data differs from what {folder} was built on (suite digest mismatch); "
            "rebuild the model with tanbr build-model"
        )
    return model, suite


def make_pools(model: Any, suite: Any) -> tuple[list[str], Pool, Pool]:
    """Calibration and test pools over one list of texts (rows index that list)."""
    label_index = {label: i for i, label in enumerate(model.labels)}
    task_index = {t: i for i, t in enumerate(model.tasks)}
    texts: list[str] = []
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
    threads: int = 0,
    memo: bool = False,
    progress: bool = False,
) -> tuple[DefaultBackend, Pool, Pool]:
    """Load (or build) the default model, cache the lower states of its calibration and test
    splits, and return the backend with the two pools."""
    if threads > 0:
        torch.set_num_threads(threads)
    model, suite = load_default(variant=variant, path=path, progress=progress)
    texts, calib, test = make_pools(model, suite)
    backend = DefaultBackend(model, texts=texts, signature=signature, memo=memo, progress=progress)
    return backend, calib, test
