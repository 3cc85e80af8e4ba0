"""The Hugging Face MoE backends on tiny random checkpoints of every served family: opened
from a folder and a task file, signed without running an expert, merged and restored exactly,
lean as in memory, replicated on shared tensors, memoised exactly."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hf_checkpoints import CLASSIFIER_FAMILIES, LM_FAMILIES

from conftest import assert_reordered_close, random_plan
from support import resident_while_running
from tanbr.backend.hf_signatures import SIGNATURES
from tanbr.backend.protocol import Backend, Prediction
from tanbr.backend.requests import Requests
from tanbr.model.discovery import get_module

CASES = [(f, "lm") for f in LM_FAMILIES] + [(f, "classifier") for f in CLASSIFIER_FAMILIES]


@pytest.fixture(params=CASES, ids=[f"{f}-{k}" for f, k in CASES])
def case(request: pytest.FixtureRequest) -> tuple[str, str]:
    family, kind = request.param
    return family, kind


def _head(pool: Any, n: int = 10) -> Requests:
    return Requests(pool.texts[:n], pool.rows[:n])


def _assert_same(kind: str, actual: Prediction, expected: Prediction) -> None:
    if kind == "lm":
        np.testing.assert_array_equal(actual.ids, expected.ids)
    else:
        assert_reordered_close(actual.probs, expected.probs)


def test_opens_with_the_pools_of_the_task_file(
    case: tuple[str, str], open_hf: Callable[..., Any], checkpoint: Callable[..., Any]
) -> None:
    family, kind = case
    backend, calib, test = open_hf(family, kind)
    assert isinstance(backend, Backend)
    assert backend.kind == kind
    assert backend.checkpoint == checkpoint(family, kind)
    assert backend.merger.lean
    names = ("sport", "food") if kind == "classifier" else ("count", "color")
    assert calib.task_names == test.task_names == names  # file order
    rows = np.concatenate([calib.rows, test.rows])
    assert len(set(rows.tolist())) == len(rows)  # one text list, no row twice
    for pool in (calib, test):
        assert [backend.texts[r] for r in pool.rows] == list(pool.texts)
    if kind == "classifier":
        assert test.targets is None
        for task, label in zip(test.tasks, test.labels, strict=True):
            assert backend.labels[label].startswith(names[task] + ":")
    else:
        assert backend.labels == () and (test.labels == -1).all()
        assert test.targets is not None and len(test.targets) == len(test.texts)
        assert any(t is None for t in test.targets) and any(t is not None for t in test.targets)


def test_signatures_have_their_shapes_and_meaning(
    case: tuple[str, str], open_hf: Callable[..., Any]
) -> None:
    family, kind = case
    backend, _, test = open_hf(family, kind, memo=True)
    requests = _head(test, 6)
    first = backend.merger.blocks[0]
    n_gates = sum(backend.blocks.values())
    feats = {k: backend.features(requests, k) for k in SIGNATURES}
    assert feats["input0"].shape == (6, first.hidden_size)
    assert feats["gate0"].shape == (6, first.n_experts)
    np.testing.assert_allclose(feats["gate0"].sum(1), 1.0, atol=1e-6)
    assert feats["gates"].shape == (6, n_gates)
    gates = backend.gate_probs(requests)
    assert list(gates) == list(backend.blocks)
    np.testing.assert_array_equal(np.concatenate(list(gates.values()), axis=1), feats["gates"])
    for probs in gates.values():
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    # gate0 reads the first block's gate on its input: what the full MoE's gates record there
    np.testing.assert_allclose(feats["gate0"], feats["gates"][:, : first.n_experts], atol=1e-6)
    np.testing.assert_array_equal(backend.signatures(requests), feats[backend.signature])
    if kind == "classifier":
        assert feats["gates+head"].shape == (6, n_gates + backend.n_labels)
        backend.restore()
        full = backend.predict(requests).probs
        np.testing.assert_allclose(feats["gates+head"][:, n_gates:], full, atol=1e-6)
    else:
        np.testing.assert_array_equal(feats["gates+head"], feats["gates"])  # no class head
    live = backend.features(Requests(requests.texts), "gate0")  # no rows: not from the cache
    np.testing.assert_allclose(live, feats["gate0"], atol=1e-6)


def test_served_signatures_run_no_expert_and_ignore_the_merge(
    case: tuple[str, str], open_hf: Callable[..., Any]
) -> None:
    """input0 and gate0 stop the forward pass before the first MoE block: no expert runs,
    whether the model is the lean one with no expert in memory yet, the full MoE, a merge or a
    soft merge, and the signatures are the same in every state."""
    family, kind = case
    backend, _, test = open_hf(family, kind)
    requests = Requests(test.texts[:6])  # live: computed every time, never cached
    model = backend.model
    blocks = backend.merger.blocks
    # the modules themselves are kept, not only their ids: a module freed by a merge could
    # hand its id to a new one elsewhere in the model
    forbidden: dict[int, torch.nn.Module] = {}

    def block_modules() -> None:  # the modules standing at the blocks' paths now, and within
        for b in blocks:
            for name in (b.name, b.experts_name):
                forbidden.update((id(m), m) for m in get_module(model, name).modules())

    ran: list[torch.nn.Module] = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: ran.append(module)
    )
    seen = []
    try:
        for setup in (
            lambda: None,  # lean, experts never read
            backend.restore,
            lambda: backend.merge(random_plan(backend.blocks, 0)),
            backend.merge_soft,
        ):
            setup()
            block_modules()
            ran.clear()
            seen.append((backend.features(requests, "input0"), backend.features(requests, "gate0")))
            assert ran, "the signature ran no module at all"
            assert not [type(m).__name__ for m in ran if id(m) in forbidden]
    finally:
        handle.remove()
    for input0, gate0 in seen[1:]:
        np.testing.assert_array_equal(input0, seen[0][0])
        np.testing.assert_array_equal(gate0, seen[0][1])


def test_a_live_lean_backend_streams_its_full_moe_passes(
    case: tuple[str, str], open_hf: Callable[..., Any]
) -> None:
    """No memo (a live service) and memory-lean: the full MoE's predictions (the proxy
    reward's reference) while a merge is served read one block's experts at a time, give the
    numbers of the full MoE read back whole, and leave no original expert in memory."""
    family, kind = case
    backend, _, test = open_hf(family, kind)
    assert backend.merger.lean and not backend.memo
    requests = _head(test, 8)
    backend.restore()
    full = backend.predict(requests)
    merger = backend.merger
    backend.merge(random_plan(backend.blocks, 3))
    with resident_while_running(merger) as peak:
        reference = backend.reference(requests)
    np.testing.assert_array_equal(reference, full.predictions)
    assert peak and max(peak) == 1
    assert merger.merged and not any(merger._resident(b) for b in merger.blocks)


def test_a_fresh_lean_backend_reads_no_expert_to_keep(
    case: tuple[str, str], open_hf: Callable[..., Any]
) -> None:
    """A service's set-up (memory-lean, no memo) runs the full MoE on calibration requests
    before it has served anything: those passes stream, and the model goes back to the full
    MoE without reading every expert (a service's start would otherwise peak at the full
    MoE's size); the numbers are those of the experts read back whole."""
    family, kind = case
    backend, _, test = open_hf(family, kind)
    merger = backend.merger
    requests = _head(test, 8)
    with resident_while_running(merger) as peak:
        gates = backend.gate_probs(requests)
    assert peak and max(peak) == 1
    assert not any(merger._resident(b) for b in merger.blocks)
    backend.restore()  # every expert read back, and kept
    assert all(merger._resident(b) for b in merger.blocks)
    again = backend.gate_probs(Requests(requests.texts))  # (not the cached rows)
    for name, probs in gates.items():
        np.testing.assert_array_equal(again[name], probs)


def test_replicas_of_a_lean_model_serving_merges_never_read_every_expert(
    case: tuple[str, str], open_hf: Callable[..., Any]
) -> None:
    """``replica(experts=False)`` (a service whose policy serves merges only): neither copy
    holds an original expert, each merges and serves on its own, and the full MoE, streamed
    on either, gives the numbers of the experts read back whole."""
    family, kind = case
    backend, _, test = open_hf(family, kind)
    requests = _head(test, 8)
    backend.restore()  # every expert read, as the set-up leaves it: the copies drop them
    twin = backend.replica(experts=False)
    copies = (backend, twin)
    for copy in copies:
        assert not any(copy.merger._resident(b) for b in copy.merger.blocks)
    first = twin.reference(requests)  # a standby's first pass: the full MoE, streamed
    plans = [random_plan(backend.blocks, 4), random_plan(backend.blocks, 5)]
    for copy, plan in zip(copies, plans, strict=True):
        copy.merge(plan)
    served = [copy.predict(requests) for copy in copies]
    full = twin.reference(requests)  # streamed on the twin (no memo), the merge served again
    for copy, plan, answer in zip(copies, plans, served, strict=True):
        copy.merge(plan)
        _assert_same(kind, copy.predict(requests), answer)
        assert not any(copy.merger._resident(b) for b in copy.merger.blocks)
    backend.restore()  # every expert read back, on this copy only
    np.testing.assert_array_equal(backend.predict(requests).predictions, full)
    np.testing.assert_array_equal(first, full)
    assert not any(twin.merger._resident(b) for b in twin.merger.blocks)


def test_merge_predict_restore_gives_back_the_full_model(
    case: tuple[str, str], open_hf: Callable[..., Any]
) -> None:
    family, kind = case
    backend, _, test = open_hf(family, kind)
    requests = _head(test, 12)
    backend.restore()
    full = backend.predict(requests)
    full_bytes = backend.memory_bytes()
    plan = random_plan(backend.blocks, 1)
    backend.merge(plan)
    merged = backend.predict(requests)
    assert backend.memory_bytes() < full_bytes  # one merged expert per block
    backend.merge(random_plan(backend.blocks, 2))  # re-merged in place
    backend.predict(requests)
    backend.merge(plan)
    _assert_same(kind, backend.predict(requests), merged)
    backend.merge_soft()
    soft = backend.predict(requests)
    assert backend.memory_bytes() == full_bytes
    backend.restore()
    _assert_same(kind, backend.predict(requests), full)
    np.testing.assert_array_equal(backend.reference(requests), full.predictions)
    if kind == "classifier":
        for p in (full, merged, soft):
            assert p.probs.shape == (12, backend.n_labels) and p.ids is None
            np.testing.assert_allclose(p.probs.sum(1), 1.0, atol=1e-5)
    else:
        vocab = backend.config.get_text_config().vocab_size
        for p in (full, merged, soft):
            assert p.probs.shape == (12, 0) and p.ids is not None
            assert p.ids.dtype == np.int64 and ((p.ids >= 0) & (p.ids < vocab)).all()


def test_outputs_are_the_models_own(case: tuple[str, str], open_hf: Callable[..., Any]) -> None:
    """Batched, right-padded serving gives each request what the transformers model gives it
    alone; a text that holds the pad token (the end-of-sequence token here) is pooled at its
    real last token."""
    family, kind = case
    backend, _, test = open_hf(family, kind, lean=False)
    eos = backend.tokenizer.eos_token
    texts = (*test.texts[:5], f"{test.texts[5]} {eos}", f"{eos} {test.texts[6]} {eos}")
    served = backend.predict(Requests(texts))
    for i, text in enumerate(texts):
        ids = backend.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            logits = backend.model(input_ids=ids).logits
        if kind == "classifier":
            probs = torch.softmax(logits.float(), dim=-1)[0].numpy()
            assert_reordered_close(served.probs[i], probs)
        else:
            assert served.ids is not None
            assert served.ids[i] == int(logits[0, -1].argmax())


def test_lean_serving_equals_in_memory_serving(
    case: tuple[str, str], open_hf: Callable[..., Any]
) -> None:
    family, kind = case
    lean, _, test = open_hf(family, kind, lean=True)
    full, _, _ = open_hf(family, kind, lean=False)
    assert lean.merger.lean and not full.merger.lean
    requests = _head(test, 8)
    assert_reordered_close(lean.features(requests, "input0"), full.features(requests, "input0"))
    plan = random_plan(lean.blocks, 3)
    for backend in (lean, full):
        backend.merge(plan)
    _assert_same(kind, lean.predict(requests), full.predict(requests))
    for backend in (lean, full):
        backend.restore()
    _assert_same(kind, lean.predict(requests), full.predict(requests))
    assert lean.memory_bytes() == full.memory_bytes()


def test_replica_shares_every_tensor(case: tuple[str, str], open_hf: Callable[..., Any]) -> None:
    family, kind = case
    backend, _, test = open_hf(family, kind)
    requests = _head(test, 8)
    twin = backend.replica()
    assert twin.model is not backend.model
    assert twin.merger is not backend.merger and twin.tokenizer is not backend.tokenizer
    own = {id(t) for t in [*backend.model.parameters(), *backend.model.buffers()]}
    assert all(id(t) in own for t in [*twin.model.parameters(), *twin.model.buffers()])
    assert all(a is b for a, b in zip(twin._caches(), backend._caches(), strict=True))
    full = backend.predict(requests)
    plan = random_plan(backend.blocks, 4)
    twin.merge(plan)  # (a lean twin drops its own originals' experts, not the first one's)
    served = twin.predict(requests)
    _assert_same(kind, backend.predict(requests), full)
    backend.merge(plan)
    _assert_same(kind, backend.predict(requests), served)
    twin.restore()
    _assert_same(kind, twin.predict(requests), full)


def test_memo_returns_identical_predictions(
    case: tuple[str, str], open_hf: Callable[..., Any]
) -> None:
    family, kind = case
    backend, _, test = open_hf(family, kind, memo=True)
    plain, _, _ = open_hf(family, kind)
    requests = _head(test, 12)
    plan = random_plan(backend.blocks, 5)
    assert backend.merge(plan) == 0.0  # deferred until a forward pass needs it
    first = backend.predict(requests)
    again = backend.predict(requests)
    assert again.latency_ms == 0.0 and again.merge_ms == 0.0  # nothing computed
    np.testing.assert_array_equal(again.probs, first.probs)
    np.testing.assert_array_equal(again.predictions, first.predictions)
    order = np.array([7, 2, 2, 11, 0])
    part = backend.predict(requests.take(order))
    np.testing.assert_array_equal(part.predictions, first.predictions[order])
    plain.merge(plan)
    _assert_same(kind, first, plain.predict(requests))
    backend.restore()
    plain.restore()
    _assert_same(kind, backend.predict(requests), plain.predict(requests))


def test_rows_must_hold_their_texts(open_hf: Callable[..., Any]) -> None:
    backend, _, test = open_hf("mixtral", "lm", memo=True)
    row = int(test.rows[1])
    with pytest.raises(ValueError, match=f"request 0 carries row {row}, which holds another text"):
        backend.predict(Requests((test.texts[0],), np.array([test.rows[1]])))
    with pytest.raises(ValueError, match=r"request rows must be in \[0, "):
        backend.predict(Requests(("x",), np.array([10**6])))


def test_bfloat16_serving(open_hf: Callable[..., Any]) -> None:
    backend, _, test = open_hf("qwen2_moe", "classifier", dtype="bfloat16")
    single, _, _ = open_hf("qwen2_moe", "classifier")
    assert backend.dtype == torch.bfloat16
    assert backend.memory_bytes() < 0.6 * single.memory_bytes()  # (rotary tables stay float32)
    requests = _head(test, 8)
    backend.merge(random_plan(backend.blocks, 6))
    probs = backend.predict(requests).probs
    assert probs.dtype == np.float32 and np.isfinite(probs).all()
