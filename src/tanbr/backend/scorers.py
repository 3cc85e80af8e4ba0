"""What "right" means for a task: one scorer per notion, each a score in [0, 1] per request.

``accuracy`` compares a classifier's label with the true label that comes back; ``proxy``
compares the served prediction (a classifier's label, a language model's greedy next token)
with the full MoE's on the same request, which needs no label at all (the full MoE runs on a
small budgeted sample, off the request path in the service); ``likelihood`` is a language
model's per-token probability of the reference continuation, and ``log-likelihood`` its
per-token log-likelihood on the scale of a uniform guess (the paper's negative-loss reward in
[0, 1]). Adding a scorer is one class and
one line in :data:`SCORERS`. (A scorer that compares generated text with the reference, exact
match, is not written yet: it needs generation, not one next token.)
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tanbr.backend.protocol import Backend, LikelihoodBackend, Scorer
from tanbr.backend.requests import Requests, Truth


class LabelAccuracy:
    """1 where the served label is the true label (the labels must come back)."""

    name = "accuracy"
    needs_truth = True

    def score(
        self, backend: Backend, requests: Requests, predictions: np.ndarray, truth: Truth | None
    ) -> np.ndarray:
        if truth is None:
            raise ValueError("the accuracy scorer needs the true labels of the requests")
        labels = np.asarray(truth.labels, dtype=np.int64)
        if labels.size and labels.min() < 0:
            raise ValueError(
                "the accuracy scorer needs labels; these requests have none (-1: a language "
                "model's task): use the likelihood or proxy scorer"
            )
        predictions = np.asarray(predictions, dtype=np.int64)
        if labels.shape != predictions.shape:
            raise ValueError(f"{predictions.shape} predictions for {labels.shape} true labels")
        return np.asarray(predictions == labels, dtype=np.float64)


class Agreement:
    """1 where the served prediction is the full MoE's on the same request (label-free): the
    same label for a classifier, the same next token for a language model."""

    name = "proxy"
    needs_truth = False

    def score(
        self, backend: Backend, requests: Requests, predictions: np.ndarray, truth: Truth | None
    ) -> np.ndarray:
        reference = np.asarray(backend.reference(requests), dtype=np.int64)
        return np.asarray(np.asarray(predictions, dtype=np.int64) == reference, dtype=np.float64)


class Likelihood:
    """exp(-nll): the geometric mean probability per token that the served model gives the
    true continuation of each request (in (0, 1], 1 for a certain model).

    The model is the one currently set, i.e. the slot's merge right after serving it. The
    continuations are the truth's ``targets``, so the truth must come back; a request without
    one (a task file of texts only: ``targets`` None, or a None entry) scores its own text
    instead, a label-free likelihood of the request.
    """

    name = "likelihood"
    needs_truth = True

    def score(
        self, backend: Backend, requests: Requests, predictions: np.ndarray, truth: Truth | None
    ) -> np.ndarray:
        return np.asarray(np.exp(-reference_nll(backend, requests, truth)), dtype=np.float64)


def reference_nll(backend: Backend, requests: Requests, truth: Truth | None) -> np.ndarray:
    """(n,) mean NLL per token of each request's true continuation under the model as set
    (of the request's own text where it has none)."""
    if truth is None:
        raise ValueError("a likelihood scorer needs the requests' truth (their targets)")
    if not isinstance(backend, LikelihoodBackend):
        raise ValueError(
            f"a likelihood scorer needs a language model: the {backend.kind} backend "
            f"{type(backend).__name__} has no nll"
        )
    targets = truth.targets if truth.targets is not None else (None,) * len(requests)
    return np.asarray(backend.nll(requests, targets), dtype=np.float64)


class LogLikelihood:
    """``max(0, 1 - nll / ln V)``: the negative loss (mean NLL per token of the true
    continuation, ``V`` the vocabulary size) mapped affinely onto [0, 1] so that a uniform guess
    over the vocabulary scores 0 and a certain model 1 (a request the model finds less likely
    than a uniform guess scores 0).

    Unlike ``likelihood`` (exp(-nll), about 0.004 at a loss of 5.5 nats), it is linear in the
    loss: a slot's mean score is ``1 - loss / ln V`` of the mean loss (where no request is
    clipped), merges that differ by a tenth of a nat differ by ~0.01, and the slot oracle
    that maximises it minimises the loss.
    """

    name = "log-likelihood"
    needs_truth = True

    def score(
        self, backend: Backend, requests: Requests, predictions: np.ndarray, truth: Truth | None
    ) -> np.ndarray:
        nll = reference_nll(backend, requests, truth)
        assert isinstance(backend, LikelihoodBackend)  # checked by reference_nll
        return np.asarray(np.clip(1.0 - nll / np.log(backend.vocab_size), 0.0, 1.0))


SCORERS: dict[str, Callable[[], Scorer]] = {
    "accuracy": LabelAccuracy,
    "proxy": Agreement,
    "likelihood": Likelihood,
    "log-likelihood": LogLikelihood,
}


def make_scorer(name: str) -> Scorer:
    """The scorer registered as ``name``."""
    factory = SCORERS.get(name)
    if factory is None:
        raise ValueError(f"reward.kind must be one of {sorted(SCORERS)}, got {name!r}")
    return factory()


def default_metric(backend: Backend) -> str:
    """What a slot's accuracy means for a backend: label accuracy for a classifier, the
    per-token likelihood of the reference (or of the request itself) for a language model."""
    return "likelihood" if backend.kind == "lm" else "accuracy"
