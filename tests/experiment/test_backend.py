"""The default model as the loop's backend (tiny variant: real MiniLM, real data)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tanbr.experiment.slots import Requests

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def tiny() -> Any:
    from tanbr.experiment.backend import default_backend

    backend, calib, test = default_backend(variant="tiny", memo=True)
    yield backend, calib, test
    backend.restore()


def _plan(backend: Any, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.dirichlet(np.ones(e)) for name, e in backend.blocks.items()}


def test_signatures_do_not_depend_on_the_merge(tiny: Any) -> None:
    backend, _, test = tiny
    requests = Requests(test.texts[:12], test.rows[:12])
    backend.restore()
    before = backend.signatures(requests)
    backend.merge(_plan(backend, 0))
    backend.predict(requests)  # the merge is really built
    live = backend.signatures(Requests(test.texts[:12]))  # computed from the texts
    np.testing.assert_allclose(before, live, atol=2e-3)  # cached states are fp16
    assert before.shape == (12, next(iter(backend.blocks.values())))
    np.testing.assert_allclose(before.sum(1), 1.0, atol=1e-6)  # gate probabilities


def test_memo_is_exact_and_merges_lazily(tiny: Any) -> None:
    backend, _, test = tiny
    requests = Requests(test.texts[:20], test.rows[:20])
    plan = _plan(backend, 1)
    assert backend.merge(plan) == 0.0  # deferred
    first = backend.predict(requests)
    assert first.merge_ms > 0.0 and first.latency_ms > 0.0
    again = backend.predict(requests)
    assert again.latency_ms == 0.0 and again.merge_ms == 0.0  # from the memo, no forward
    np.testing.assert_array_equal(first.probs, again.probs)
    backend.memo = False
    try:
        fresh = backend.predict(requests)
    finally:
        backend.memo = True
    np.testing.assert_allclose(fresh.probs, first.probs, atol=1e-6)


def test_full_merged_and_reference(tiny: Any) -> None:
    backend, _, test = tiny
    requests = Requests(test.texts[:16], test.rows[:16])
    backend.restore()
    full = backend.predict(requests).probs.argmax(1)
    full_bytes = backend.memory_bytes()
    backend.merge(_plan(backend, 2))
    assert backend.memory_bytes() < 0.8 * full_bytes  # one expert per block resident
    np.testing.assert_array_equal(backend.reference(requests), full)


def test_gate_probs_are_distributions(tiny: Any) -> None:
    backend, calib, _ = tiny
    probs = backend.gate_probs(Requests(calib.texts[:10], calib.rows[:10]))
    assert set(probs) == set(backend.blocks)
    for p in probs.values():
        assert p.shape == (10, backend.blocks[next(iter(backend.blocks))])
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-6)


def test_bad_rows_are_rejected(tiny: Any) -> None:
    backend, _, _ = tiny
    with pytest.raises(ValueError, match="rows must be in"):
        backend.predict(Requests(("x",), np.array([10**7])))
