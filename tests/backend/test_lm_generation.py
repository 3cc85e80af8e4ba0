"""Generation on a causal LM backend: a sequence's KV cache continues its forward pass, a
batch of sequences decoded together computes what each computes alone (rows joining and
leaving), and the likelihood of served token ids is what the model gave them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hf_checkpoints import LM_FAMILIES

from conftest import random_plan
from support import resident_while_running

ATOL = 1e-4


def _greedy(backend: Any, prompt: str, n: int) -> tuple[list[int], list[torch.Tensor]]:
    """n greedy tokens one by one with the KV cache, and the logits each was drawn from."""
    logits, cache = backend.next_logits(backend.encode_prompt(prompt), None)
    tokens, seen = [], []
    for _ in range(n):
        seen.append(logits)
        tokens.append(int(torch.argmax(logits)))
        logits, cache = backend.next_logits([tokens[-1]], cache)
    return tokens, seen


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_the_kv_cache_continues_the_forward_pass(family: str, open_hf: Callable[..., Any]) -> None:
    backend, _, test = open_hf(family, "lm", lean=False)
    backend.merge(random_plan(backend.blocks, seed=1))
    prompt = test.texts[0]
    tokens, seen = _greedy(backend, prompt, 5)
    ids = backend.encode_prompt(prompt)
    for k in range(5):  # the whole sequence at once, no cache
        whole, _ = backend.next_logits([*ids, *tokens[:k]], None)
        torch.testing.assert_close(whole, seen[k], atol=ATOL, rtol=0)
    # nll_ids of the served ids is the mean -log p the model gave them, token by token
    logp = [float(torch.log_softmax(x, -1)[t]) for x, t in zip(seen, tokens, strict=True)]
    [nll] = backend.nll_ids([ids], [tokens])
    assert nll == pytest.approx(-np.mean(logp), abs=ATOL)


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_a_decode_batch_computes_what_each_sequence_computes_alone(
    family: str, open_hf: Callable[..., Any]
) -> None:
    """Prompts of different lengths join a batch at different steps and leave it; every row's
    logits equal the same sequence's logits decoded alone."""
    backend, _, test = open_hf(family, "lm", lean=False)
    backend.merge(random_plan(backend.blocks, seed=2))
    prompts = [test.texts[i % len(test.texts)] + " " * (i % 3) for i in (0, 3, 5, 8)]
    assert len({len(backend.encode_prompt(p)) for p in prompts}) > 1  # left padding is used
    lengths = [4, 9, 3, 6]  # steps each sequence runs
    alone = [_greedy(backend, p, n) for p, n in zip(prompts, lengths, strict=True)]
    batch = backend.decode_batch()
    rows: list[tuple[int, int]] = []  # (sequence, step reached)
    worst = 0.0
    for step in range(14):
        if step % 2 == 0 and step // 2 < len(prompts):  # one joins every other step
            i = step // 2
            logits, cache = backend.next_logits(backend.encode_prompt(prompts[i]), None)
            torch.testing.assert_close(logits, alone[i][1][0], atol=ATOL, rtol=0)
            batch.add(cache)
            rows.append((i, 0))
        going = [r for r, (i, k) in enumerate(rows) if k + 1 < lengths[i]]
        batch.keep(going)
        rows = [rows[r] for r in going]
        assert len(batch) == len(rows)
        if not rows:
            continue
        out = batch.step([alone[i][0][k] for i, k in rows])
        assert out.shape[0] == len(rows)
        rows = [(i, k + 1) for i, k in rows]
        for row, (i, k) in enumerate(rows):
            worst = max(worst, float((out[row] - alone[i][1][k]).abs().max()))
    assert rows == [] and worst < ATOL
    if family == "mixtral":  # one batched pass per step (hybrid caches step row by row)
        assert batch.plain
    with pytest.raises(ValueError, match="tokens for a batch"):
        batch.step([1])


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_the_full_moe_scores_a_lean_models_generations_a_block_at_a_time(
    family: str, open_hf: Callable[..., Any]
) -> None:
    """The label-free reward's full-MoE likelihood, on a memory-lean model serving a merge:
    the very numbers of the full MoE read back whole, while no more than one block's experts
    is ever in memory (and none once it is done)."""
    backend, _, test = open_hf(family, "lm", lean=True)
    merger = backend.merger
    prompts = [backend.encode_prompt(t) for t in test.texts[:3]]
    continuations = [[5, 7, 11], [3], [2, 4]]
    backend.restore()  # every expert read back from disk
    reference = backend.nll_ids(prompts, continuations)
    backend.merge(random_plan(backend.blocks, seed=3))
    assert backend.nll_ids(prompts, continuations) != pytest.approx(reference)
    with resident_while_running(merger) as peak:
        scored = backend.reference_nll_ids(prompts, continuations)
    assert np.array_equal(scored, reference)
    assert peak and max(peak) == 1
    assert not any(merger._resident(b) for b in merger.blocks)
    assert backend.memory_bytes() < backend.served.shared_bytes + backend.served.all_experts_bytes


@pytest.mark.parametrize("family", LM_FAMILIES)
def test_an_idle_lean_model_drops_its_merge_and_builds_it_again(
    family: str, open_hf: Callable[..., Any]
) -> None:
    """A service's standby replica between two boundaries: memory-lean, it keeps only what
    the replicas share, and its next forward pass merges the same plan again (same numbers).
    The full MoE keeps its experts (the other replica may share them)."""
    backend, _, test = open_hf(family, "lm", lean=True)
    merger = backend.merger
    prompts = [backend.encode_prompt(t) for t in test.texts[:2]]
    continuations = [[5, 7], [3, 2, 9]]
    backend.merge(random_plan(backend.blocks, seed=4))
    served = backend.nll_ids(prompts, continuations)
    merged_bytes = merger.resident_bytes()
    backend.idle()
    assert merger.resident_bytes() == backend.served.shared_bytes < merged_bytes
    assert np.array_equal(backend.nll_ids(prompts, continuations), served)
    assert merger.merged and merger.resident_bytes() == merged_bytes
    backend.restore()
    full_bytes = merger.resident_bytes()
    backend.idle()
    assert merger.resident_bytes() == full_bytes and not merger.streaming
