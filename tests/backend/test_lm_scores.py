"""What a language model's requests are scored by: the next token it predicts, the likelihood
of a continuation under the model as set, and the scorers built on them; the targets that
travel in the truth."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hf_checkpoints import LM_FAMILIES, VOCAB

from conftest import random_plan
from tanbr.backend.protocol import Prediction
from tanbr.backend.requests import Pool, Requests, Truth
from tanbr.backend.scorers import make_scorer


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_nll_prefers_the_models_own_continuation(family: str, open_hf: Callable[..., Any]) -> None:
    """The greedy next token is the one-token target of least nll (exactly: it is the argmax
    of the same distribution), and the model's greedy three-token continuations are likelier
    than random words."""
    backend, _, test = open_hf(family, "lm", lean=False)
    prompt = test.texts[0]
    greedy = int(backend.predict(Requests((prompt,))).ids[0])
    words = list(VOCAB)  # every token of the vocabulary as a one-token target
    nll = backend.nll(Requests((prompt,) * len(words)), [" " + w for w in words])
    assert np.isfinite(nll).all() and (nll > 0).all()
    best = backend.tokenizer.convert_ids_to_tokens(greedy)
    assert nll[words.index(best)] <= nll.min() + 1e-6
    np.testing.assert_allclose(np.exp(-nll).sum(), 1.0, atol=1e-5)  # a distribution

    rng = np.random.default_rng(0)
    prompts = test.texts[:8]
    greedy_targets, random_targets = [], []
    for text in prompts:
        grown = text
        for _ in range(3):
            token = int(backend.predict(Requests((grown,))).ids[0])
            grown += " " + backend.tokenizer.convert_ids_to_tokens(token)
        greedy_targets.append(grown[len(text) :])
        random_targets.append(" " + " ".join(rng.choice(words[3:], size=3)))
    own = backend.nll(Requests(prompts), greedy_targets)
    other = backend.nll(Requests(prompts), random_targets)
    assert own.mean() < other.mean()


def test_nll_follows_the_model_as_set(open_hf: Callable[..., Any]) -> None:
    backend, _, test = open_hf("qwen3_moe", "lm", memo=True)
    plain, _, _ = open_hf("qwen3_moe", "lm")
    requests = Requests(test.texts[:10], test.rows[:10])
    targets = test.targets[:10]
    backend.restore()
    full = backend.nll(requests, targets)
    backend.merge(random_plan(backend.blocks, 0))
    merged = backend.nll(requests, targets)
    assert not np.allclose(full, merged)
    np.testing.assert_array_equal(backend.nll(requests, targets), merged)  # memoised
    plain.merge(random_plan(backend.blocks, 0))
    np.testing.assert_allclose(plain.nll(Requests(requests.texts), targets), merged, rtol=1e-5)
    backend.restore()
    np.testing.assert_array_equal(backend.nll(requests, targets), full)
    texts_only = backend.nll(requests, [None] * 10)  # each request's own text
    assert np.isfinite(texts_only).all()
    with pytest.raises(ValueError, match="nll: 2 targets for 10 requests"):
        backend.nll(requests, targets[:2])


def test_likelihood_scorer(open_hf: Callable[..., Any]) -> None:
    backend, _, test = open_hf("olmoe", "lm")
    slot = test.slot(0, np.arange(8))
    assert slot.truth is not None and slot.truth.targets == test.targets[:8]
    backend.merge(random_plan(backend.blocks, 1))
    served = backend.predict(slot.requests)
    scorer = make_scorer("likelihood")
    assert scorer.needs_truth
    scores = scorer.score(backend, slot.requests, served.predictions, slot.truth)
    np.testing.assert_allclose(scores, np.exp(-backend.nll(slot.requests, slot.truth.targets)))
    assert ((scores > 0) & (scores <= 1)).all()
    bare = Truth(slot.truth.tasks, slot.truth.labels, slot.truth.task_names)  # no targets
    own = scorer.score(backend, slot.requests, served.predictions, bare)
    np.testing.assert_allclose(own, np.exp(-backend.nll(slot.requests, [None] * 8)))
    with pytest.raises(ValueError, match="needs the requests' truth"):
        scorer.score(backend, slot.requests, served.predictions, None)
    classifier, _, ctest = open_hf("mixtral", "classifier")
    cslot = ctest.slot(0, np.arange(4))
    with pytest.raises(ValueError, match="needs a language model: the classifier backend"):
        scorer.score(classifier, cslot.requests, np.zeros(4), cslot.truth)


def test_log_likelihood_scorer_is_the_loss_on_the_scale_of_a_uniform_guess(
    open_hf: Callable[..., Any],
) -> None:
    backend, _, test = open_hf("olmoe", "lm")
    slot = test.slot(0, np.arange(8))
    assert slot.truth is not None
    backend.merge(random_plan(backend.blocks, 2))
    served = backend.predict(slot.requests)
    scorer = make_scorer("log-likelihood")
    assert scorer.needs_truth
    scores = scorer.score(backend, slot.requests, served.predictions, slot.truth)
    nll = backend.nll(slot.requests, slot.truth.targets)
    vocab = backend.model.config.vocab_size
    assert backend.vocab_size == vocab
    np.testing.assert_allclose(scores, np.clip(1 - nll / np.log(vocab), 0, 1))
    assert ((scores >= 0) & (scores <= 1)).all()
    assert scores.std() > 0  # the requests differ: not a constant


def test_proxy_compares_next_tokens_with_the_full_moe(open_hf: Callable[..., Any]) -> None:
    backend, _, test = open_hf("gpt_oss", "lm")
    requests = Requests(test.texts[:12], test.rows[:12])
    proxy = make_scorer("proxy")
    backend.restore()
    full = backend.predict(requests).predictions
    np.testing.assert_array_equal(proxy.score(backend, requests, full, None), np.ones(12))
    backend.merge(random_plan(backend.blocks, 2))
    merged = backend.predict(requests).predictions
    scores = proxy.score(backend, requests, merged, None)
    np.testing.assert_array_equal(scores, (merged == full).astype(float))
    assert scores.min() == 0.0  # this merge changes some next tokens


def test_accuracy_refuses_requests_without_labels(open_hf: Callable[..., Any]) -> None:
    backend, _, test = open_hf("mixtral", "lm")
    slot = test.slot(0, np.arange(4))
    with pytest.raises(ValueError, match="use the likelihood or proxy scorer"):
        make_scorer("accuracy").score(backend, slot.requests, np.zeros(4), slot.truth)


def test_prediction_ids_are_its_predictions() -> None:
    probs = np.array([[0.1, 0.9], [0.8, 0.2]], dtype=np.float32)
    assert Prediction(probs, 1.0).predictions.tolist() == [1, 0]
    lm = Prediction(np.zeros((2, 0), dtype=np.float32), 1.0, ids=np.array([7, 3]))
    assert lm.predictions.tolist() == [7, 3] and lm.predictions.dtype == np.int64


def test_targets_travel_with_the_truth() -> None:
    pool = Pool(
        ("a", "b", "c"),
        np.array([0, 1, 0]),
        np.full(3, -1),
        ("x", "y"),
        rows=np.arange(3),
        targets=(" one", None, " two"),
    )
    slot = pool.slot(4, np.array([2, 1]))
    assert slot.truth is not None and slot.truth.targets == (" two", None)
    assert slot.truth.take([1]).targets == (None,)
    classifier = Pool(("a", "b"), np.array([0, 1]), np.array([0, 1]), ("x", "y"))
    truth = classifier.slot(0, np.array([1])).truth
    assert truth is not None and truth.targets is None and truth.take([0]).targets is None
    with pytest.raises(ValueError, match="pool: 1 targets for 3 requests"):
        Pool(("a", "b", "c"), np.zeros(3), np.zeros(3), ("x",), targets=(" t",))
    with pytest.raises(ValueError, match="truth: target 0 is int, not str or None"):
        Truth((0,), np.zeros(1), ("x",), targets=(3,))  # type: ignore[arg-type]


def test_long_prompts_keep_their_end(open_hf: Callable[..., Any]) -> None:
    backend, _, _ = open_hf("mixtral", "lm")
    backend.max_length = 4
    words = "one two three four five six"
    ids = backend.tokenizer(words)["input_ids"]  # <s> and six words
    assert backend._encode([words]) == [[ids[0], *ids[-3:]]]
    scored, start = backend._scored_ids(words, " seven eight")
    assert scored[:start] == [ids[0], ids[-1]] and len(scored) == 4
    short = backend.predict(Requests(("four five six",))).ids
    np.testing.assert_array_equal(backend.predict(Requests((words,))).ids, short)
