"""Folders and task files the Hugging Face backends refuse, each with its reason, before any
weight is read; and how a task file's labels map to a classifier's."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hf_checkpoints import make_tokenizer, save_config_only

from tanbr.backend import hf_folder
from tanbr.backend.hf_classifier import label_index
from tanbr.backend.registry import BackendSpec, choose_loader, open_backend, serving_backend
from tanbr.backend.requests import Requests
from tanbr.tasks import TaskExample, write_task_file

DEFAULT = "default: not a tanbr-moe-classifier model"


def _refused(folder: Path, classifier: str, lm: str) -> str:
    return re.escape(
        f"tanbr cannot serve {folder} ({DEFAULT}; hf-classifier: {classifier}; hf-lm: {lm})"
    )


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to read a checkpoint's weights fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("weights were read before the refusal")

    monkeypatch.setattr(hf_folder, "load_checkpoint", refuse)


def test_a_dense_model_has_no_moe_block(tmp_path: Path) -> None:
    from transformers import Qwen2Config

    config = Qwen2Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, architectures=["Qwen2ForCausalLM"],
    )  # fmt: skip
    folder = save_config_only(config, tmp_path)
    expected = _refused(
        folder,
        "Qwen2ForCausalLM is not a *ForSequenceClassification model",
        "no MoE block found in Qwen2ForCausalLM: no module has an `experts` child (fused expert "
        "tensors gate_up_proj/up_proj + down_proj, or a list of expert modules)",
    )
    with pytest.raises(ValueError, match=expected):
        choose_loader(folder)


def test_an_unknown_architecture_is_named(tmp_path: Path) -> None:
    import transformers

    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["FooMoeForCausalLM"], "model_type": "foo"})
    )
    version = transformers.__version__
    reason = f"unknown architecture FooMoeForCausalLM: not a transformers {version} class"
    expected = _refused(
        tmp_path, "FooMoeForCausalLM is not a *ForSequenceClassification model", reason
    )
    with pytest.raises(ValueError, match=expected):
        choose_loader(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    none = "config.json names no architecture (`architectures`)"
    with pytest.raises(ValueError, match=_refused(tmp_path, none, none)):
        choose_loader(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match=r"is not a model folder: it has no config\.json"):
        choose_loader(tmp_path)


def test_experts_stored_transposed_without_saying_so(tmp_path: Path) -> None:
    """Llama 4 stores gate_up_proj (E, H, 2I) and down_proj (E, I, H) with no is_transposed
    flag; the reason states the shapes as they are."""
    from transformers import Llama4TextConfig

    config = Llama4TextConfig(
        hidden_size=32, intermediate_size=48, intermediate_size_mlp=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
        num_experts_per_tok=1, vocab_size=64, architectures=["Llama4ForCausalLM"],
    )  # fmt: skip
    folder = save_config_only(config, tmp_path)
    lm = (
        "MoE block 'model.layers.0.feed_forward' (Llama4TextMoe) stores its experts transposed, "
        "gate_up_proj (E=4, H=32, 2I=96) and down_proj (E=4, I=48, H=32), and does not say so "
        "(no is_transposed flag): the merge cannot read them"
    )
    classifier = "Llama4ForCausalLM is not a *ForSequenceClassification model"
    with pytest.raises(ValueError, match=_refused(folder, classifier, lm)):
        choose_loader(folder)


def test_an_encoder_decoder_is_refused(tmp_path: Path) -> None:
    from transformers import SwitchTransformersConfig

    config = SwitchTransformersConfig(
        d_model=32, d_ff=48, num_experts=4, vocab_size=64,
        architectures=["SwitchTransformersForConditionalGeneration"],
    )  # fmt: skip
    folder = save_config_only(config, tmp_path)
    name = "SwitchTransformersForConditionalGeneration"
    lm = f"{name} is an encoder-decoder model; the lm backend serves decoder-only *ForCausalLM "
    lm += "models"
    with pytest.raises(
        ValueError, match=_refused(folder, f"{name} is not a *ForSequenceClassification model", lm)
    ):
        choose_loader(folder)


def test_quantized_experts_are_refused(tmp_path: Path, checkpoint: Callable[..., Path]) -> None:
    source = checkpoint("gpt_oss", "lm")
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    make_tokenizer().save_pretrained(tmp_path)
    lm = "its weights are quantized (mxfp4); quantized experts cannot be merged"
    classifier = "GptOssForCausalLM is not a *ForSequenceClassification model"
    with pytest.raises(ValueError, match=_refused(tmp_path, classifier, lm)):
        choose_loader(tmp_path)


def test_a_folder_without_tokenizer(tmp_path: Path) -> None:
    from hf_checkpoints import build_checkpoint

    folder = build_checkpoint("mixtral", "classifier", tmp_path, tokenizer=False)
    reason = (
        "no tokenizer in the folder (none of tokenizer.json, tokenizer.model, spiece.model, "
        "vocab.json, vocab.txt)"
    )
    lm = "MixtralForSequenceClassification is not a *ForCausalLM model"
    with pytest.raises(ValueError, match=_refused(folder, reason, lm)):
        choose_loader(folder)


def test_the_task_file_must_match_the_model(
    checkpoint: Callable[..., Path], task_files: dict[str, Path], no_weights: None
) -> None:
    lm = BackendSpec(path=str(checkpoint("mixtral", "lm")), tasks=str(task_files["classifier"]))
    expected = (
        f"{task_files['classifier']} holds classification tasks (text, task, label) but the "
        "model is a causal language model: give a task file of language-model tasks (text, "
        "task, target)"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        open_backend(lm)
    classifier = BackendSpec(
        path=str(checkpoint("mixtral", "classifier")), tasks=str(task_files["lm"])
    )
    expected = (
        f"{task_files['lm']} holds language-model tasks (text, task, target) but the model is a "
        "sequence classifier: give a task file of classification tasks (text, task, label)"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        open_backend(classifier)
    folder = checkpoint("mixtral", "lm")
    expected = (
        f"{folder}: a ForCausalLM checkpoint brings no tasks; give a task file (model.tasks in "
        "the config, --tasks on the command line)"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        open_backend(BackendSpec(path=str(folder)))


def test_an_unmapped_label_is_named(
    tmp_path: Path, checkpoint: Callable[..., Path], no_weights: None
) -> None:
    rows = [
        TaskExample(text=f"{task} text {i}", task=task, label=labels[i % 2])
        for task, labels in (("sport", ("win", "draw")), ("food", ("tasty", "bland")))
        for i in range(12)
    ]
    tasks = tmp_path / "tasks.jsonl"
    write_task_file(tasks, rows)
    spec = BackendSpec(path=str(checkpoint("mixtral", "classifier")), tasks=str(tasks))
    expected = (
        "task 'sport': label 'draw' is not a label of the model (neither 'sport:draw' nor "
        "'draw' nor an index below 4); the model's labels are 'sport:win', 'sport:lose', "
        "'food:tasty', 'food:bland'"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        open_backend(spec)


def test_labels_map_by_joint_name_then_name_then_index() -> None:
    labels = ("sport:win", "sport:lose", "neg", "pos", "LABEL_4")
    assert label_index("sport", "lose", labels) == 1
    assert label_index("food", "pos", labels) == 3
    assert label_index("food", "4", labels) == 4
    assert label_index("food", "0", labels) == 0
    for bad in ("5", "-1", "win"):
        with pytest.raises(ValueError, match=f"task 'food': label '{bad}' is not a label"):
            label_index("food", bad, labels)
    many = tuple(f"l{i}" for i in range(9))
    with pytest.raises(
        ValueError, match=re.escape("labels are 'l0', 'l1', 'l2', 'l3', 'l4', 'l5', ...")
    ):
        label_index("t", "x", many)


def test_serving_needs_no_task_file(checkpoint: Callable[..., Path]) -> None:
    backend = serving_backend(BackendSpec(path=str(checkpoint("phimoe", "classifier")), lean=True))
    assert backend.kind == "classifier" and backend.labels[0] == "sport:win"
    backend.merge({name: [1.0 / e] * e for name, e in backend.blocks.items()})
    probs = backend.predict(Requests(("ball goal team", "bread soup"))).probs
    assert probs.shape == (2, 4)
