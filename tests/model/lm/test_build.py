"""The tiny language model: built from scratch, loaded like any Mixtral, deterministic."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tanbr.model import find_moe_blocks
from tanbr.model.lm import BUILD_FILE, EVALUATION_FILE, TASKS_FILE, VARIANTS, LMSpec
from tanbr.model.lm.build import build_into, task_rows
from tanbr.model.lm.corpora import DOMAIN_NAMES, DomainSplit, documents, split_corpus
from tanbr.tasks import read_task_file

TINY = VARIANTS["lm-tiny"]


def _splits(spec: LMSpec) -> list[DomainSplit]:
    return split_corpus(
        spec.domains,
        n_heldout=spec.heldout_per_domain,
        train_chars=spec.train_chars,
        min_chars=spec.min_chars,
        max_chars=spec.max_chars,
        prompt_share=spec.prompt_share,
        seed=spec.seed,
    )


def test_specs_are_checked() -> None:
    with pytest.raises(ValueError, match="top_k must be <= num_experts"):
        LMSpec(top_k=9)
    with pytest.raises(ValueError, match="heldout_per_domain must be >= 12"):
        LMSpec(heldout_per_domain=5)
    with pytest.raises(ValueError, match="unknown domain"):
        LMSpec(domains=("news", "poetry"))
    with pytest.raises(ValueError, match="seq_len must be <= max_position_embeddings"):
        LMSpec(seq_len=1024)


def test_the_folder_holds_a_standard_checkpoint(tiny_lm: Path) -> None:
    names = {p.name for p in tiny_lm.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert {TASKS_FILE, BUILD_FILE, EVALUATION_FILE} <= names
    assert not any(n.endswith(".bin") for n in names)


def test_it_loads_with_transformers_and_has_mergeable_moe_blocks(tiny_lm: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_lm), local_files_only=True)
    assert isinstance(model, MixtralForCausalLM)
    config = model.config
    assert config.num_local_experts == 8 and config.num_experts_per_tok == 2
    assert config.router_aux_loss_coef > 0
    blocks = find_moe_blocks(model)
    assert len(blocks) == TINY.num_layers
    assert all(b.n_experts == 8 for b in blocks)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_lm), local_files_only=True)
    assert tokenizer.pad_token is None
    assert tokenizer.bos_token == "<s>" and tokenizer.eos_token == "</s>"
    assert len(tokenizer) <= config.vocab_size
    ids = tokenizer("Meine Damen und Herren", return_tensors="pt")["input_ids"]
    assert int(ids[0, 0]) == tokenizer.bos_token_id
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.usefixtures("require_data")
def test_the_tokenizer_round_trips_every_domain(tiny_lm: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_lm), local_files_only=True)
    for name in DOMAIN_NAMES:
        for text in documents(name)[:25]:
            text = text[:2000]
            ids = tokenizer(text)["input_ids"]
            assert tokenizer.decode(ids, skip_special_tokens=True) == text, name


def test_the_task_file_is_held_out_text(tiny_lm: Path) -> None:
    from transformers import AutoTokenizer

    task_file = read_task_file(tiny_lm / TASKS_FILE)
    assert task_file.kind == "lm"
    assert task_file.tasks == DOMAIN_NAMES
    assert all(c == {"": TINY.heldout_per_domain} for c in task_file.counts().values())
    assert all(e.target is not None and e.target.startswith(" ") for e in task_file.examples)
    splits = _splits(TINY)
    expected = [(r.text, r.task, r.target) for r in task_rows(splits)]
    assert [(e.text, e.task, e.target) for e in task_file.examples] == expected
    corpus = "\n".join(d.casefold() for s in splits for d in s.train)
    assert not [e.text for e in task_file.examples if e.text.casefold() in corpus]
    # prompt and target encoded apart (as the backend does) give the passage's encoding
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_lm), local_files_only=True)
    for e in task_file.examples[::7]:
        assert e.target is not None
        apart = (
            tokenizer(e.text)["input_ids"]
            + tokenizer(e.target, add_special_tokens=False)["input_ids"]
        )
        assert apart == tokenizer(e.text + e.target)["input_ids"]


def test_the_build_records_its_figures(tiny_lm: Path) -> None:
    info = json.loads((tiny_lm / BUILD_FILE).read_text())
    assert info["family"] == "mixtral"
    assert set(info["domains"]) == set(DOMAIN_NAMES)
    assert info["build"]["train_tokens_seen"] > 0
    assert len(info["ce_curve"]) == TINY.steps
    assert info["spec"] == dataclasses.asdict(TINY) | {"domains": list(DOMAIN_NAMES)}
    evaluation = json.loads((tiny_lm / EVALUATION_FILE).read_text())
    assert set(evaluation["loss"]["full"]) == set(DOMAIN_NAMES)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_building_twice_gives_identical_weights(tiny_lm: Path, tmp_path: Path) -> None:
    build_into(tmp_path / "again", TINY, variant="lm-tiny", progress=False)
    first, second = _weights(tiny_lm), _weights(tmp_path / "again")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    for name in ("tokenizer.json", TASKS_FILE):
        assert (tiny_lm / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_a_cached_build_is_reused(tiny_lm: Path) -> None:
    from tanbr.model.lm import build_lm

    stamp = (tiny_lm / BUILD_FILE).stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TANBR_CACHE", str(tiny_lm.parents[1]))
        assert build_lm("lm-tiny") == tiny_lm
    assert (tiny_lm / BUILD_FILE).stat().st_mtime_ns == stamp


def test_the_backend_serves_it_and_scores_like_the_evaluation(tiny_lm: Path) -> None:
    from tanbr.backend.registry import BackendSpec, open_backend
    from tanbr.backend.requests import Requests
    from tanbr.model.lm.evaluate import encode_rows, nll_sums
    from tanbr.tasks import TaskExample

    backend, calib, test = open_backend(
        BackendSpec(path=str(tiny_lm), tasks=str(tiny_lm / TASKS_FILE))
    )
    assert backend.kind == "lm"
    assert calib.task_names == DOMAIN_NAMES
    assert test.targets is not None
    served = backend.nll(Requests(test.texts[:12]), test.targets[:12])
    assert np.isfinite(served).all()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_lm), local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_lm), local_files_only=True)
    rows = [
        TaskExample(text=t, task=DOMAIN_NAMES[int(k)], target=g)
        for t, k, g in zip(test.texts[:12], test.tasks[:12], test.targets[:12], strict=True)
    ]
    sums, counts = nll_sums(
        model, encode_rows(tokenizer, rows, 512), batch_size=5, pad_id=tokenizer.eos_token_id
    )
    np.testing.assert_allclose(served, sums / counts, rtol=1e-4)
