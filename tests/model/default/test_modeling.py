"""The MoE classifier: exact upcycling, routing math, lower/upper split, round trip, engine fit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, BertConfig, BertModel, BertTokenizerFast

from tanbr.model import Merger, find_moe_blocks, supports, uniform_plan
from tanbr.model.default.build import upcycle_bert
from tanbr.model.default.modeling import (
    LowerStates,
    StateBank,
    TanbrMoEClassifier,
    TanbrMoEConfig,
    compute_lower_states,
)

LABELS = ("a:x", "a:y", "b:u", "b:v", "b:w")


def tiny_bert(seed: int = 0) -> BertModel:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=120,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return BertModel(config, add_pooling_layer=False).eval()


def upcycled(noise: float = 0.0, *, experts: int = 4, top_k: int = 2) -> TanbrMoEClassifier:
    model = upcycle_bert(
        tiny_bert(),
        num_moe_layers=2,
        num_experts=experts,
        top_k=top_k,
        noise=noise,
        labels=LABELS,
        tasks=("a", "b"),
        generator=torch.Generator().manual_seed(0),
    )
    return model.eval()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 120, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return ids, mask


def upper_hidden(model: TanbrMoEClassifier, states: LowerStates) -> torch.Tensor:
    hidden = states.hidden
    mask = model._mask(hidden, states.attention_mask)
    for layer in model.layers[model.n_lower :]:
        hidden = layer(hidden, mask)
    return hidden


@torch.no_grad()
def test_upcycling_with_identical_experts_reproduces_the_encoder() -> None:
    bert = tiny_bert()
    model = upcycled(noise=0.0)
    ids, mask = batch()
    ref = bert(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
    ours = upper_hidden(model, model.encode_lower(ids, mask))
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], ref[keep], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_forward_is_encode_lower_then_forward_upper() -> None:
    model = upcycled(noise=0.05)
    ids, mask = batch()
    logits = model(ids, mask)
    assert logits.shape == (3, len(LABELS))
    torch.testing.assert_close(logits, model.forward_upper(model.encode_lower(ids, mask)))


@torch.no_grad()
@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_block_matches_reference_top_k_routing(top_k: int) -> None:
    model = upcycled(noise=0.2, top_k=top_k)
    block = model.moe_layers()[0].mlp
    torch.nn.init.normal_(block.gate.weight, std=1.0)
    x = torch.randn(2, 5, 32)
    out = block(x)
    ex = block.experts
    for b in range(2):
        for t in range(5):
            probs = F.softmax(block.gate(x[b, t]), dim=-1)
            w, idx = probs.topk(top_k)
            w = w / w.sum()
            ref = sum(
                w[j]
                * F.linear(
                    F.gelu(F.linear(x[b, t], ex.up_proj[e], ex.up_proj_bias[e])),
                    ex.down_proj[e],
                    ex.down_proj_bias[e],
                )
                for j, e in enumerate(idx.tolist())
            )
            torch.testing.assert_close(out[b, t], ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_grouped_mm_and_eager_dispatch_agree() -> None:
    model = upcycled(noise=0.2)
    for layer in model.moe_layers():
        torch.nn.init.normal_(layer.mlp.gate.weight, std=1.0)
    ids, mask = batch()
    assert model.config._experts_implementation == "grouped_mm"
    grouped = model(ids, mask)
    model.set_experts_implementation("eager")
    torch.testing.assert_close(model(ids, mask), grouped, atol=1e-5, rtol=1e-5)


def test_checkpoint_round_trip_through_auto_model(tmp_path: Path) -> None:
    model = upcycled(noise=0.1)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, TanbrMoEClassifier)
    assert loaded.config.id2label[4] == "b:w" and loaded.config.task_names == ["a", "b"]
    ids, mask = batch()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), model(ids, mask))


@torch.no_grad()
def test_merging_engine_finds_the_blocks_and_identical_experts_merge_exactly() -> None:
    model = upcycled(noise=0.0)
    for layer in model.moe_layers():
        torch.nn.init.normal_(layer.mlp.gate.weight, std=1.0)
    assert supports(model).ok
    blocks = find_moe_blocks(model)
    assert [b.name for b in blocks] == ["layers.1.mlp", "layers.2.mlp"]
    assert {b.layout for b in blocks} == {"fused"} and all(b.has_bias for b in blocks)
    ids, mask = batch()
    full = model(ids, mask)
    merger = Merger(model)
    merger.apply(uniform_plan(blocks))
    torch.testing.assert_close(model(ids, mask), full, atol=1e-5, rtol=1e-5)
    merger.restore()
    assert torch.equal(model(ids, mask), full)


def test_upcycling_freezes_the_lower_layers_and_attention() -> None:
    model = upcycled()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    assert all(n.startswith(("layers.1.", "layers.2.", "classifier.")) for n in trainable)
    assert not any(".attention." in n for n in trainable)
    assert "layers.1.mlp.gate.weight" in trainable


@torch.no_grad()
def test_state_bank_is_exact_per_text_and_round_trips(tmp_path: Path) -> None:
    model = upcycled(noise=0.1)
    vocab = tmp_path / "vocab.txt"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *(f"w{i}" for i in range(100))]
    vocab.write_text("\n".join(words) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab))
    texts = ["w1 w2 w3 w4 w5", "w7", "w9 w9 w10 w11 w12 w13 w14 w15 w16", "w3 w3"]
    bank = compute_lower_states(model, tok, texts, max_length=8, batch_size=2)
    assert len(bank) == 4
    assert bank.lengths().tolist() == [7, 3, 8, 4]  # [CLS] + words + [SEP], truncated to 8
    for i, text in enumerate(texts):
        enc = tok([text], truncation=True, max_length=8, return_tensors="pt")
        ref = model.encode_lower(enc["input_ids"], enc["attention_mask"]).hidden[0]
        got = bank.batch([i]).hidden[0].float()
        torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)  # fp16 storage
    padded = bank.batch([1, 2])
    assert padded.hidden.shape == (2, 8, 32)
    assert padded.attention_mask.sum(1).tolist() == [3, 8]
    path = tmp_path / "states.pt"
    bank.save(path)
    again = StateBank.load(path)
    assert torch.equal(again.tokens, bank.tokens) and torch.equal(again.offsets, bank.offsets)
    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="corrupt lower-state cache"):
        StateBank.load(path)
    with pytest.raises(ValueError, match="indices must be in"):
        bank.batch([4])


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        TanbrMoEConfig(num_experts=2, num_experts_per_tok=3)
    with pytest.raises(ValueError, match="num_moe_layers"):
        TanbrMoEConfig(num_hidden_layers=3, num_moe_layers=4)
    with pytest.raises(ValueError, match="LowerStates"):
        LowerStates(hidden=torch.zeros(2, 3, 4), attention_mask=torch.ones(2, 4))
    model = upcycled()
    with pytest.raises(ValueError, match="input_ids and attention_mask"):
        model.encode_lower(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4))
    assert np.isfinite(model(*batch()).detach().numpy()).all()
