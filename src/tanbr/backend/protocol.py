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
from typing import Protocol, runtime_checkable

import numpy as np

from tanbr.backend.requests import Requests, Truth
from tanbr.model.coeffs import MergedWeights

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

    def restore(self) -> float:
        """Serve the original MoE with its top-k gate; returns ms."""
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

    def replica(self) -> Backend:
        """A second backend on the same weights with its own module tree (one serves while
        the other is re-merged); merging never writes an original tensor, so sharing them
        is safe."""
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
