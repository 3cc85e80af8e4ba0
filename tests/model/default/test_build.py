"""The tiny default-model build: a real checkpoint folder, cached, loadable, specialised by task."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tanbr.model.default import VARIANTS, BuildSpec, DefaultModel, build_default_model, load_tasks
from tanbr.model.default.build import suite_texts

pytestmark = pytest.mark.data


def test_checkpoint_folder_is_complete_and_loads_with_auto_model(tiny_path: Path) -> None:
    from transformers import AutoModel

    for name in ("config.json", "model.safetensors", "tokenizer.json", "tasks.json"):
        assert (tiny_path / name).is_file(), name
    info = json.loads((tiny_path / "tasks.json").read_text())
    assert info["tasks"] == list(VARIANTS["tiny"].tasks)
    assert all(label.split(":")[0] in info["tasks"] for label in info["labels"])
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    model = AutoModel.from_pretrained(tiny_path)
    assert type(model).__name__ == "TanbrMoEClassifier"
    assert [model.config.id2label[i] for i in range(len(info["labels"]))] == info["labels"]


def test_second_build_comes_from_the_cache(tiny_path: Path) -> None:
    stamp = (tiny_path / "model.safetensors").stat().st_mtime_ns
    assert build_default_model("tiny") == tiny_path
    assert (tiny_path / "model.safetensors").stat().st_mtime_ns == stamp  # not rebuilt


def test_predict_gives_probabilities_better_than_chance(tiny_path: Path) -> None:
    dm = DefaultModel.load(tiny_path)
    spec = VARIANTS["tiny"]
    suite = load_tasks(spec.tasks, per_task=spec.per_task, min_per_label=spec.min_per_label)
    texts = [e.text for e in suite.test]
    probs = dm.predict(texts)
    assert probs.shape == (len(texts), len(dm.labels))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    pred = [dm.labels[i] for i in probs.argmax(1)]
    accuracy = np.mean([p == e.target for p, e in zip(pred, suite.test, strict=True)])
    assert accuracy > 5.0 / len(dm.labels)  # chance is 1 / n_labels
    # the task part alone is easy: most predictions name the right task
    task_accuracy = np.mean(
        [p.split(":")[0] == e.task for p, e in zip(pred, suite.test, strict=True)]
    )
    assert task_accuracy > 0.5


def test_gates_route_each_task_to_its_home_expert(tiny_path: Path) -> None:
    from tanbr.model import GateRecorder

    dm = DefaultModel.load(tiny_path)
    info = dm.info
    spec = VARIANTS["tiny"]
    suite = load_tasks(spec.tasks, per_task=spec.per_task, min_per_label=spec.min_per_label)
    texts, where = suite_texts(suite)
    bank = dm.lower_states(texts)
    ids = suite.task_ids("train")
    hits = 0
    for i, task in enumerate(suite.tasks):
        with GateRecorder(dm.model) as rec, torch.inference_mode():
            for _, states in bank.batches(where["train"][ids == i], 64):
                rec.set_mask(states.attention_mask)
                dm.model.forward_upper(states)
        hits += sum(
            int(np.argmax(p) == info["home_experts"][task]) for p in rec.profiles().values()
        )
    assert hits >= 0.75 * len(suite.tasks) * dm.model.config.num_moe_layers


def test_lower_states_are_cached_by_content(tiny_path: Path) -> None:
    dm = DefaultModel.load(tiny_path)
    texts = ["a sentence to encode", "und noch ein deutscher Satz"]
    first = dm.lower_states(texts)
    again = dm.lower_states(texts)
    assert torch.equal(first.tokens, again.tokens)
    fresh = dm.lower_states(texts, cache=False)
    torch.testing.assert_close(fresh.tokens, first.tokens)


def test_bad_requests_are_rejected(tiny_path: Path) -> None:
    dm = DefaultModel.load(tiny_path)
    with pytest.raises(ValueError, match="non-empty strings"):
        dm.predict(["fine", "  "])
    with pytest.raises(ValueError, match="not one string"):
        dm.predict("just one string")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must not be empty"):
        dm.predict([])
    with pytest.raises(ValueError, match="variant must be one of"):
        build_default_model("huge")
    with pytest.raises(ValueError, match="top_k must be <="):
        BuildSpec(num_experts=2, top_k=3)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        DefaultModel.load(tiny_path.parent / "does-not-exist")
