"""The default model as the loop's backend (tiny variant: real MiniLM, real data)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from support import resident_while_running
from tanbr.backend.requests import Requests

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def tiny() -> Any:
    from tanbr.backend.default import default_backend

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


def test_task_probs_sum_the_heads_labels_per_task(tiny: Any) -> None:
    from tanbr.backend.default import DefaultBackend

    backend, _, test = tiny
    requests = Requests(test.texts[:10], test.rows[:10])
    backend.merge(_plan(backend, 3))  # the signature is the full MoE's, whatever is served
    tasks = backend.task_probs(requests)
    backend.restore()
    probs = backend.predict(requests).probs  # (n, n_labels), the full MoE
    owner = backend.dm.task_of_label()
    assert tasks.shape == (10, len(backend.dm.tasks))
    for k in range(len(backend.dm.tasks)):
        np.testing.assert_allclose(tasks[:, k], probs[:, owner == k].sum(1), atol=1e-6)
    np.testing.assert_allclose(tasks.sum(1), 1.0, atol=1e-5)
    signed = DefaultBackend(backend.dm, texts=backend.texts, signature="gates+head", memo=True)
    sig = signed.signatures(requests)
    n_gates = sum(backend.blocks.values())
    assert sig.shape == (10, n_gates + len(backend.dm.tasks))
    np.testing.assert_allclose(sig[:, n_gates:], tasks, atol=1e-5)
    gates = backend.gate_probs(requests)
    joined = np.concatenate([gates[name] for name in backend.blocks], axis=1)
    np.testing.assert_allclose(sig[:, :n_gates], joined, atol=1e-6)


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


def test_a_live_lean_default_model_streams_its_reference(tiny: Any) -> None:
    """A service's default model (memory-lean, no memo): the proxy reward's full-MoE
    predictions, while a merge is served, read a block's experts at a time and leave none."""
    from tanbr.backend.default import default_backend

    _, _, test = tiny
    live, _, _ = default_backend(variant="tiny", memo=False, lean=True)
    requests = Requests(test.texts[:16], test.rows[:16])
    live.restore()
    full = live.predict(requests).probs.argmax(1)
    merger = live.merger
    live.merge(_plan(live, 2))
    try:
        with resident_while_running(merger) as peak:
            np.testing.assert_array_equal(live.reference(requests), full)
        assert peak and max(peak) == 1
        assert merger.merged and not any(merger._resident(b) for b in merger.blocks)
    finally:
        live.restore()  # the process keeps one model per variant: leave it as it was


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


def test_bfloat16_serving_follows_float32(tiny: Any) -> None:
    """bfloat16 serving keeps the float32 model (and its lower-state cache) untouched, merges
    exactly as many blocks, halves the resident bytes, and mostly predicts the same labels."""
    from tanbr.backend.default import DefaultBackend, serving_dtype

    backend, _, test = tiny
    backend.restore()  # a model merged by another Merger cannot be copied into a new one
    half = DefaultBackend(backend.dm, texts=backend.texts, dtype="bfloat16")
    assert half.model.dtype == serving_dtype("bfloat16")
    assert backend.model.dtype == serving_dtype("float32")  # the shared model is not cast
    assert dict(half.blocks) == dict(backend.blocks)
    requests = Requests(test.texts[:64], test.rows[:64])
    plan = _plan(backend, 2)
    agree = []
    for b in (backend, half):
        b.merge(plan)
    a, h = backend.predict(requests), half.predict(requests)
    agree.append(float((a.probs.argmax(1) == h.probs.argmax(1)).mean()))
    assert half.memory_bytes() < 0.6 * backend.memory_bytes()
    for b in (backend, half):
        b.restore()
    agree.append(
        float(
            (
                backend.predict(requests).probs.argmax(1) == half.predict(requests).probs.argmax(1)
            ).mean()
        )
    )
    assert min(agree) >= 0.9
    with pytest.raises(ValueError, match=r"model\.dtype must be one of"):
        serving_dtype("float8")
    assert serving_dtype("auto") in (serving_dtype("bfloat16"), serving_dtype("float32"))


@pytest.mark.parametrize("kind", ["input0", "gate0"])
def test_live_signatures_are_a_by_product_of_serving(tiny: Any, kind: str) -> None:
    """A served text's signature is read off the forward that served it (no second pass,
    whatever merge served it) and equals the one computed on its own."""
    from tanbr.backend.default import DefaultBackend

    backend, _, test = tiny
    served = DefaultBackend(backend.dm, signature=kind)
    alone = DefaultBackend(backend.dm, signature=kind)
    texts = Requests(test.texts[:9])
    served.merge(_plan(served, 5))
    served.predict(texts)  # records the signatures
    calls: list[int] = []
    hook = served.model.moe_layers()[0].attention.register_forward_hook(lambda *_: calls.append(1))
    try:
        recorded = served.signatures(texts)
    finally:
        hook.remove()
    assert not calls  # nothing ran again
    np.testing.assert_allclose(recorded, alone.signatures(texts), atol=1e-5)
    served.restore()


@pytest.mark.parametrize("kind", ["regmean", "fisher"])
def test_static_merges_serve_through_the_backend(tiny: Any, kind: str) -> None:
    """RegMean and Fisher come from unlabeled calibration requests and serve like any plan:
    the memo keys them, the model's outputs change, and restore gives the full MoE back."""
    from tanbr.model import MergedWeights

    backend, calib, test = tiny
    requests = Requests(test.texts[:16], test.rows[:16])
    backend.restore()
    full = backend.predict(requests).probs
    plan = backend.static_plan(kind, Requests(calib.texts[:32]))
    assert set(plan) == set(backend.blocks)
    assert all(isinstance(v, MergedWeights) for v in plan.values())
    backend.merge(plan)
    merged = backend.predict(requests).probs
    assert not np.allclose(merged, full)
    merged_bytes = backend.memory_bytes()  # one merged expert per block
    backend.restore()
    assert merged_bytes < backend.memory_bytes()
    np.testing.assert_allclose(backend.predict(requests).probs, full, atol=1e-5)


def test_task_regmean_at_the_token_shares_is_static_regmean(tiny: Any) -> None:
    """Per-type statistics from the backend: the action of each type's share of the
    calibration tokens is RegMean on all of them; a plan is served through the memo like any
    merged weights, and the merge that installs it is charged its solve."""
    import pickle

    from tanbr.backend.plans import build_ms, plan_key
    from tanbr.experiment.parameterization import TaskRegMean

    backend, calib, test = tiny
    requests = Requests(test.texts[:16], test.rows[:16])
    backend.restore()
    full = backend.predict(requests).probs
    cal = Requests(calib.texts[:32])
    assign = np.arange(32) % 3  # three types, label-free
    stats = backend.task_regmean_stats(cal, assign, 3)
    param = TaskRegMean(stats, backend.blocks)
    assert param.dim == 3 and param.nbytes > 0
    tokens = next(iter(stats.values())).tokens
    assert all((s.tokens == tokens).all() and (tokens > 0).all() for s in stats.values())
    shares = param.plan(tokens / tokens.sum())
    static = backend.static_plan("regmean", cal)
    # float32 statistics (tests/model checks float64 ones to 1e-10): the solve's rounding lies
    # in directions the calibration inputs hardly take, so the outputs agree closer than weights
    for name, value in shares.items():
        for target, tensor in value.tensors.items():
            np.testing.assert_allclose(
                tensor.float().numpy(), static[name].tensors[target].float().numpy(), atol=2e-3
            )
    outputs = []
    for plan in (shares, static):
        backend.merge(plan)
        outputs.append(backend.predict(requests).probs)
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5)
    vertex = param.plan(np.array([1.0, 0.0, 0.0]))
    backend.merge(vertex)  # deferred by the memo until a prediction needs it
    served = backend.predict(requests)
    assert served.merge_ms >= build_ms(vertex) > 0
    assert not np.allclose(served.probs, full)
    backend.restore()
    # an action played again is served from the plan cache: the same tensors, no solve
    again = param.plan(np.array([1.0, 0.0, 0.0]))
    assert build_ms(again) == 0.0
    for name, value in again.items():
        assert all(value.tensors[t] is vertex[name].tensors[t] for t in value.tensors)
    # the memo identifies a plan by the statistics and the action, not by hashing its weights
    assert plan_key(again) == plan_key(vertex) != plan_key(shares)
    backend.merge(again)
    assert backend.predict(requests).merge_ms < served.merge_ms
    np.testing.assert_array_equal(backend.predict(requests).probs, served.probs)
    backend.restore()
    fresh = pickle.loads(pickle.dumps(param))  # worker processes start with no cached plan
    solved = fresh.plan(np.array([1.0, 0.0, 0.0]))
    assert build_ms(solved) > 0 and plan_key(solved) == plan_key(vertex)
    with pytest.raises(ValueError, match="cache"):
        TaskRegMean(stats, backend.blocks, cache=-1)
    np.testing.assert_allclose(backend.predict(requests).probs, full, atol=1e-5)
