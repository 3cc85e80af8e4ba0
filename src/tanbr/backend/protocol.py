"""The seam between the online system and a model: what any MoE can do, and what "right" means.

Everything above :mod:`tanbr.model` (the slot loop, the experiments, the service) speaks to a
model only through :class:`Backend`, and judges an answer only through a :class:`Scorer`. A
backend knows nothing about policies, slots or rewards; a scorer knows nothing about merging.
New models are one backend class and one registry line (:mod:`tanbr.backend.registry`); new
notions of "right" are one scorer class and one line in :data:`tanbr.backend.scorers.SCORERS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from tanbr.backend.requests import Requests, Truth
from tanbr.model.coeffs import MergedWeights

if TYPE_CHECKING:
    import torch

    from tanbr.model.task_regmean import TypeStats

Plan = Mapping[str, "np.ndarray | MergedWeights"]
"""Every MoE block's merge: block name -> coeffs (E,) on the simplex, (m, E) for m merged
experts, or merged weights (a static merge that is not one weight per expert)."""

BACKEND_KINDS = ("classifier", "lm")


@dataclass(frozen=True, eq=False)
class Prediction:
    """A backend's answer for a batch.

    ``probs`` (n, n_labels): a classifier's class probabilities (an LM's next-token view is not
    kept: (n, 0)). ``latency_ms``: the model's time on the batch (MoE layers and head when the
    requests carry cached rows, end to end otherwise); ``merge_ms``: any merge the backend had
    deferred until a forward pass needed it. ``ids`` (n,): what a language model predicts for
    each request (its greedy next-token id), where no class probabilities exist.
    """

    probs: np.ndarray
    latency_ms: float
    merge_ms: float = 0.0
    ids: np.ndarray | None = None

    @property
    def predictions(self) -> np.ndarray:
        """(n,) the predicted token ids when set, else the most probable label of each request."""
        if self.ids is not None:
            return np.asarray(self.ids, dtype=np.int64)
        return np.asarray(np.asarray(self.probs).argmax(axis=1), dtype=np.int64)


@runtime_checkable
class Backend(Protocol):
    """The served model: merges, restores, predicts; knows nothing about policies.

    ``blocks`` maps each MoE block's name to its number of experts (the keys of a plan);
    ``labels`` names a classifier's outputs (empty for a language model).
    """

    kind: str
    signature: str

    @property
    def blocks(self) -> Mapping[str, int]: ...

    @property
    def labels(self) -> tuple[str, ...]: ...

    @property
    def n_labels(self) -> int: ...

    @property
    def checkpoint(self) -> Path | None:
        """The folder the model was loaded from (fresh serving processes load it again)."""
        ...

    @property
    def signature_cost(self) -> float:
        """Milliseconds per request spent computing the configured signature so far."""
        ...

    def signatures(self, requests: Requests) -> np.ndarray:
        """(n, d) label-free signatures of the requests (the estimator's input), computed from
        what the served path computes anyway."""
        ...

    def features(self, requests: Requests, kind: str) -> np.ndarray:
        """(n, d) signatures of another kind than the configured one (e.g. a full-MoE
        signature used once, offline, to find the task types of calibration requests)."""
        ...

    def gate_probs(self, requests: Requests) -> dict[str, np.ndarray]:
        """Per block (n, E): each request's mean gate probabilities under the full MoE (the
        raw material of profiles and of the usage-frequency merge; label-free)."""
        ...

    def merge(self, plan: Plan) -> float:
        """Serve with one merged dense expert per block; returns the merge time in ms."""
        ...

    def merge_soft(self) -> float:
        """Serve each input with its own gate-weighted merge (SMEAR style); returns ms."""
        ...

    def static_plan(self, kind: str, requests: Requests) -> Plan:
        """A static merge (``regmean``, ``fisher``) computed with the full MoE on unlabeled
        calibration ``requests``."""
        ...

    def task_regmean_stats(
        self, requests: Requests, assign: np.ndarray, n_types: int
    ) -> Mapping[str, TypeStats]:
        """Task-aware RegMean's statistics (:mod:`tanbr.model.task_regmean`), per block: for
        each task type k, the token-normalised sums A_k, B_k of every linear map over the
        unlabeled calibration ``requests`` of type ``assign[i] == k`` (in [0, n_types)),
        computed with the full MoE. A backend that cannot raises a ValueError naming it."""
        ...

    def restore(self, *, streamed: bool = False) -> float:
        """Serve the original MoE with its top-k gate; returns ms. ``streamed``: a memory-lean
        model keeps its experts on disk and reads each block's just before it runs (the same
        numbers; no expert resident between passes), so that setting the model back costs no
        memory until a pass needs it."""
        ...

    def idle(self) -> None:
        """Nothing will run on the model until the next merge or forward pass: let go of what
        can be rebuilt (a memory-lean model drops its merged experts). Costs nothing to call."""
        ...

    def predict(self, requests: Requests) -> Prediction:
        """Outputs with the model as currently set, and what they cost."""
        ...

    def reference(self, requests: Requests) -> np.ndarray:
        """(n,) the full MoE's predictions, labels or token ids as :attr:`Prediction.predictions`
        (the label-free proxy reward's reference)."""
        ...

    def memory_bytes(self) -> int:
        """Parameter bytes the model as currently set needs resident."""
        ...

    def replica(self, *, experts: bool = True) -> Backend:
        """A second backend on the same weights with its own module tree (one serves while
        the other is re-merged); merging never writes an original tensor, so sharing them
        is safe. ``experts=False``: no replica will serve the full MoE or soft merging, so a
        memory-lean model never reads its experts in whole (each merge reads what it needs)."""
        ...


@runtime_checkable
class LikelihoodBackend(Protocol):
    """A backend that can say how likely its model finds a text (a language model).

    ``vocab_size``: the number of tokens the model chooses from (ln of it is the loss of a
    uniform guess, the scale of the ``log-likelihood`` scorer)."""

    @property
    def vocab_size(self) -> int: ...

    def nll(self, requests: Requests, targets: Sequence[str | None]) -> np.ndarray:
        """(n,) mean negative log-likelihood per token, under the model as currently set, of
        each target as the continuation of its request (of the request's text when None)."""
        ...


class DecodeBatch(Protocol):
    """Sequences of one model decoded together, one token each per step (rows in order)."""

    def __len__(self) -> int: ...

    def add(self, cache: Any) -> None:
        """Append a sequence, given the KV cache of its tokens so far, as the last row."""
        ...

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows``, in that order (the others' sequences have ended)."""
        ...

    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """(b, V) logits after feeding row i the token ``tokens[i]``."""
        ...


@runtime_checkable
class GenerativeBackend(Protocol):
    """A backend that generates text token by token (a causal language model): what the
    service's generation needs, each sequence with its own KV cache."""

    @property
    def context_length(self) -> int:
        """Tokens a prompt and its continuation may hold together."""
        ...

    @property
    def stop_token_ids(self) -> frozenset[int]:
        """Tokens that end a continuation."""
        ...

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's chat template; None when the model has none."""
        ...

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """A conversation as prompt text, ending with the cue for the assistant's turn."""
        ...

    def encode_prompt(self, text: str, *, special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def next_logits(self, ids: Sequence[int], cache: Any | None) -> tuple[torch.Tensor, Any]:
        """(V,) logits of the token after ``ids`` and the KV cache of the whole sequence
        (``cache``: the sequence before ``ids``; None for a new prompt)."""
        ...

    def decode_batch(self) -> DecodeBatch:
        """An empty batch of sequences decoded together (one forward pass per step)."""
        ...

    def nll_ids(
        self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
    ) -> np.ndarray:
        """(n,) mean NLL per token of each continuation's token ids given its prompt's."""
        ...

    def reference_nll_ids(
        self, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]
    ) -> np.ndarray:
        """:meth:`nll_ids` under the full MoE, whatever the model was set to."""
        ...


@runtime_checkable
class Scorer(Protocol):
    """What a task means by "right": a score in [0, 1] for each served request.

    ``needs_truth``: the scorer reads the hidden truth (labels or reference continuations);
    a label-free scorer (agreement with the full MoE) can run on live traffic.
    """

    name: str
    needs_truth: bool

    def score(
        self,
        backend: Backend,
        requests: Requests,
        predictions: np.ndarray,
        truth: Truth | None,
    ) -> np.ndarray:
        """(n,) scores of the served ``predictions`` (n,) of ``requests``."""
        ...
