from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tanbr.model import (
    Merger,
    SafetensorsExpertStore,
    find_moe_blocks,
    load_checkpoint,
    uniform_plan,
)
from tanbr.model.discovery import get_module


def _plan(blocks: Any, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {b.name: rng.dirichlet(np.ones(b.n_experts)) for b in blocks}


def _expert_params(model: nn.Module, blocks: Any) -> list[torch.Tensor]:
    out = []
    for b in blocks:
        experts = get_module(model, b.experts_name)
        names = {t.name for t in b.targets}
        out += [
            p for n, p in experts.named_parameters() if n in names or n.split(".", 1)[-1] in names
        ]
    return out


def _merged_tensors(model: nn.Module, blocks: Any) -> list[torch.Tensor]:
    return [
        get_module(model, b.name).expert.get_parameter(t.name) for b in blocks for t in b.targets
    ]


def _run(loaded: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(**inputs).logits  # type: ignore[no-any-return]


@torch.no_grad()
def test_lean_load_keeps_no_original_expert_resident(hf_case: Any, tmp_path: Path) -> None:
    hf_case.model.save_pretrained(tmp_path)
    lean = load_checkpoint(tmp_path, lean=True)
    full = load_checkpoint(tmp_path)
    assert lean.lean and lean.merger.lean and not full.lean
    blocks = lean.blocks
    assert blocks == full.blocks
    assert all(p.is_meta for p in _expert_params(lean.model, blocks))
    expert_bytes = sum(b.n_experts * b.expert_bytes for b in blocks)
    assert full.merger.resident_bytes() - lean.merger.resident_bytes() == expert_bytes
    with pytest.raises(RuntimeError, match=r"not resident .*memory-lean"):
        lean.model(**hf_case.inputs)
    # soft merging needs every expert: a lean model reads them back, and a merge drops them
    lean.merger.apply_soft()
    assert not any(p.is_meta for p in _expert_params(lean.model, blocks))
    lean.merger.apply(uniform_plan(blocks))
    assert all(p.is_meta for p in _expert_params(lean.model, blocks))


@torch.no_grad()
def test_lean_merges_equal_in_memory_merges(hf_case: Any, tmp_path: Path, close: Any) -> None:
    hf_case.model.save_pretrained(tmp_path)  # legacy per-expert key names on disk
    before = hf_case.run()
    full = load_checkpoint(tmp_path)
    lean = load_checkpoint(tmp_path, lean=True)
    # separately loaded models: the same math, maybe other kernels (see assert_reordered_close)
    close(_run(full, hf_case.inputs), before)
    for seed in (0, 1, 2):  # a first merge, then two in-place re-merges
        plan = _plan(full.blocks, seed)
        mem_stats = full.merger.apply(plan)
        lean_stats = lean.merger.apply(plan)
        assert lean_stats.lean and lean_stats.bytes_read == mem_stats.bytes_read
        for a, b in zip(
            _merged_tensors(full.model, full.blocks),
            _merged_tensors(lean.model, lean.blocks),
            strict=True,
        ):
            close(b, a)  # fused in memory, per-expert on disk: the sum may run another way
        close(_run(lean, hf_case.inputs), _run(full, hf_case.inputs))
    full.merger.restore()
    lean.merger.restore()  # reads the experts back from disk
    for a, b in zip(
        _expert_params(full.model, full.blocks),
        _expert_params(lean.model, lean.blocks),
        strict=True,
    ):
        assert torch.equal(a, b)  # the very bytes of the checkpoint
    close(_run(lean, hf_case.inputs), before)
    lean.merger.apply(_plan(full.blocks, 5))
    assert all(p.is_meta for p in _expert_params(lean.model, lean.blocks))  # dropped again


@torch.no_grad()
def test_streamed_full_moe_holds_one_block_at_a_time(hf_case: Any, tmp_path: Path) -> None:
    hf_case.model.save_pretrained(tmp_path)
    lean = load_checkpoint(tmp_path, lean=True)
    blocks = lean.blocks
    lean.merger.restore()  # every expert read back: the reference
    reference = _run(lean, hf_case.inputs)
    lean.merger.apply(_plan(blocks, 0))
    lean.merger.restore(streamed=True)
    assert lean.merger.mode == "full" and lean.merger.streaming
    assert all(p.is_meta for p in _expert_params(lean.model, blocks))  # nothing read yet
    resident: list[int] = []  # blocks with experts in memory while each block runs

    def count(module: nn.Module, args: Any) -> None:
        resident.append(sum(not _expert_params(lean.model, [b])[0].is_meta for b in blocks))

    hooks = [get_module(lean.model, b.name).register_forward_pre_hook(count) for b in blocks]
    for _ in range(2):  # a block reads its experts again on every pass
        assert torch.equal(_run(lean, hf_case.inputs), reference)  # the same bytes, same math
        assert all(p.is_meta for p in _expert_params(lean.model, blocks))
    for hook in hooks:
        hook.remove()
    assert resident == [1] * (2 * len(blocks))
    # a merge ends the streaming; a plain restore reads every expert back and keeps it
    lean.merger.apply(_plan(blocks, 1))
    assert not lean.merger.streaming
    lean.merger.restore(streamed=True)
    lean.merger.restore()
    assert not lean.merger.streaming
    assert not any(p.is_meta for p in _expert_params(lean.model, blocks))
    assert torch.equal(_run(lean, hf_case.inputs), reference)
    assert not any(p.is_meta for p in _expert_params(lean.model, blocks))


@torch.no_grad()
def test_a_newer_merger_takes_a_streamed_model_over(hf_case: Any, tmp_path: Path) -> None:
    """A model shared within a process may be handed on while its Merger streams it (a
    backend's set-up ends streamed): the newer Merger's experts stay where it put them, the
    older one's hooks no longer read or drop any."""
    hf_case.model.save_pretrained(tmp_path)
    lean = load_checkpoint(tmp_path, lean=True)
    lean.merger.restore()
    reference = _run(lean, hf_case.inputs)
    lean.merger.restore(streamed=True)
    newer = Merger(lean.model, store=lean.merger.source)
    newer.restore()  # every expert read back, to be kept
    for _ in range(2):
        assert torch.equal(_run(lean, hf_case.inputs), reference)
        assert newer.experts_resident  # nothing dropped after the pass
    newer.restore(streamed=True)
    assert torch.equal(_run(lean, hf_case.inputs), reference)
    assert all(p.is_meta for p in _expert_params(lean.model, lean.blocks))


@torch.no_grad()
def test_streamed_restore_on_a_model_in_memory_is_a_plain_restore(hf_case: Any) -> None:
    merger = Merger(hf_case.model)
    before = hf_case.run()
    merger.apply(_plan(merger.blocks, 0))
    merger.restore(streamed=True)  # nothing on disk to stream from: the experts stay
    assert not merger.streaming and merger.mode == "full"
    assert torch.equal(hf_case.run(), before)


@torch.no_grad()
def test_store_reads_fused_keys_on_disk(make_case: Any, tmp_path: Path, close: Any) -> None:
    case = make_case("fused_plain")  # the default model's layout, saved with fused tensors
    save_file(
        {k: v.contiguous() for k, v in case.model.state_dict().items()},
        tmp_path / "model.safetensors",
    )
    blocks = find_moe_blocks(case.model)
    lean_model = copy.deepcopy(case.model)
    for b in blocks:  # what a lean load leaves: the experts on the meta device
        experts = get_module(lean_model, b.experts_name)
        for t in b.targets:
            meta = torch.empty(getattr(experts, t.name).shape, device="meta")
            setattr(experts, t.name, nn.Parameter(meta, requires_grad=False))
    store = SafetensorsExpertStore(tmp_path, blocks)
    assert store.expert_keys == {f"{b.experts_name}.{t.name}" for b in blocks for t in b.targets}
    lean = Merger(lean_model, store=store)
    memory = Merger(case.model)
    before = case.run()
    plan = _plan(blocks, 0)
    lean.apply(plan)
    memory.apply(plan)
    close(lean_model(**case.inputs), case.model(**case.inputs))
    lean.restore()
    memory.restore()
    restored = zip(
        _expert_params(lean_model, blocks), _expert_params(case.model, blocks), strict=True
    )
    for a, b in restored:
        assert torch.equal(a, b)
    close(lean_model(**case.inputs), before)


@torch.no_grad()
def test_sharded_checkpoint_loads_lean(make_case: Any, tmp_path: Path, close: Any) -> None:
    case = make_case("mixtral")
    case.model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    full = load_checkpoint(tmp_path)
    lean = load_checkpoint(tmp_path, lean=True)
    plan = _plan(full.blocks, 0)
    full.merger.apply(plan)
    lean.merger.apply(plan)
    close(_run(lean, case.inputs), _run(full, case.inputs))


def test_bad_folders_get_clear_errors(make_case: Any, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint folder not found"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_checkpoint(tmp_path)
    case = make_case("mixtral")
    case.model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(
        b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!"
    )
    with pytest.raises(ValueError, match="unreadable safetensors"):
        load_checkpoint(tmp_path, lean=True)


def test_missing_expert_on_disk_is_named(make_case: Any, tmp_path: Path) -> None:
    case = make_case("olmoe")
    case.model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp' expert 3 tensor 'gate_up_proj'"):
        load_checkpoint(tmp_path, lean=True)


@torch.no_grad()
def test_default_model_checkpoint_loads_lean(tmp_path: Path, close: Any) -> None:
    default = pytest.importorskip("tanbr.model.default.modeling")
    config = default.TanbrMoEConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=48,
        num_moe_layers=2,
        num_experts=4,
        num_experts_per_tok=2,
        num_labels=5,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = default.TanbrMoEClassifier(config).eval()
        for block in find_moe_blocks(model):  # break the symmetry of the zero-initialised biases
            experts = get_module(model, block.experts_name)
            experts.up_proj_bias.normal_()
            experts.down_proj_bias.normal_()
    model.save_pretrained(tmp_path)
    assert (
        json.loads((tmp_path / "config.json").read_text())["model_type"] == "tanbr-moe-classifier"
    )
    ids = torch.randint(1, 50, (3, 7), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    full = load_checkpoint(tmp_path)
    lean = load_checkpoint(tmp_path, lean=True)
    assert [b.layout for b in lean.blocks] == ["fused", "fused"]
    close(full.model(**inputs), model(**inputs))
    plan = _plan(full.blocks, 0)
    full.merger.apply(plan)
    lean.merger.apply(plan)
    close(lean.model(**inputs), full.model(**inputs))
    lean.merger.restore()
    close(lean.model(**inputs), model(**inputs))
