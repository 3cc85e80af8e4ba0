"""Merge-aware and task-routed training: the differentiable merged forward is the merge the
engine serves, and task-routed passes train each expert on its own task alone."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from tanbr.model.default import BuildSpec, DefaultModel
from tanbr.model.default.build import (
    forward_upper_home,
    forward_upper_merged,
    home_coeffs,
    sample_merge_coeffs,
    task_gate_means,
)

pytestmark = pytest.mark.data


def test_merged_forward_matches_the_merging_engine_per_example(tiny_path: Path) -> None:
    from tanbr.model import Merger

    dm = DefaultModel.load(tiny_path)
    texts = ["a short review of a film", "Herr Präsident, meine Damen und Herren", "hi there"]
    states = dm.lower_states(texts, cache=False).batch([0, 1, 2])
    blocks = [f"layers.{i}.mlp" for i in range(dm.model.n_lower, 6)]
    rng = np.random.default_rng(3)
    coeffs = torch.as_tensor(rng.dirichlet(np.ones(6), size=(3, len(blocks))), dtype=torch.float32)
    with torch.inference_mode():
        ours = forward_upper_merged(dm.model, states, coeffs)  # (3, n_labels)
    merger = Merger(dm.model)
    for row in range(3):
        merger.apply({b: coeffs[row, i].numpy().astype(np.float64) for i, b in enumerate(blocks)})
        try:
            with torch.inference_mode():
                expected = dm.model.forward_upper(states)[row]
        finally:
            merger.restore()
        torch.testing.assert_close(ours[row], expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="coeffs must be"):
        forward_upper_merged(dm.model, states, coeffs[:, :1])


def test_sampled_slot_coeffs_are_plug_in_merges_that_favour_the_home_task() -> None:
    profiles = torch.eye(4)[:, None, :].expand(4, 2, 4).clone()  # (K=4, L=2, E=4), one-hot homes
    task = torch.tensor([0, 1, 2, 3] * 50)
    rng = np.random.default_rng(0)
    c = sample_merge_coeffs(task, profiles, min_home=0.4, alpha=0.3, rng=rng)
    assert c.shape == (200, 2, 4)
    torch.testing.assert_close(c.sum(-1), torch.ones(200, 2))
    home = c[torch.arange(200), :, task]  # (200, 2)
    assert float(home.min()) >= 0.4 - 1e-6  # p_home >= w >= min_home with one-hot profiles
    assert float(home.max()) <= 1.0 + 1e-6


def test_task_gate_means_average_probabilities_over_real_tokens() -> None:
    logits = torch.zeros(2 * 3, 2)  # (B*T, E)
    logits[0:3, 0] = 10.0  # example 0 (task 1): all tokens to expert 0
    logits[3, 1] = 10.0  # example 1 (task 0): its one real token to expert 1
    logits[4:6, 0] = 10.0  # example 1's padding: must not count
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    sums, counts = task_gate_means([logits], mask, torch.tensor([1, 0]), 2)
    profile = sums / counts[:, None, None]  # (K, L, E)
    torch.testing.assert_close(profile[1, 0], torch.tensor([1.0, 0.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(profile[0, 0], torch.tensor([0.0, 1.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(counts, torch.tensor([1.0, 3.0]))


def test_merge_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="merge_weight must be >= 0"):
        BuildSpec(merge_weight=-1.0)
    with pytest.raises(ValueError, match="merge_min_home must be in"):
        BuildSpec(merge_min_home=1.5)
    with pytest.raises(ValueError, match="merge_alpha must be > 0"):
        BuildSpec(merge_alpha=0.0)


def test_task_routed_pass_trains_only_the_home_experts(tiny_path: Path) -> None:
    dm = DefaultModel.load(tiny_path)
    model = dm.model
    for p in model.parameters():
        p.requires_grad_(True)
    texts = ["a short review of a film", "another review, a long and dull one", "a third"]
    states = dm.lower_states(texts, cache=False).batch([0, 1, 2])
    layers = model.moe_layers()
    home = torch.tensor([2, 2, 4])
    coeffs = home_coeffs(home, len(layers), model.config.num_experts)
    assert coeffs.shape == (3, len(layers), model.config.num_experts)
    torch.testing.assert_close(coeffs.sum(-1), torch.ones(3, len(layers)))
    logits = forward_upper_home(model, states, home)  # what training runs
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    for layer in layers:
        grad = layer.mlp.experts.up_proj.grad  # (E, I, H)
        assert grad is not None
        moved = grad.abs().flatten(1).sum(1)  # (E,)
        assert float(moved[2]) > 0.0 and float(moved[4]) > 0.0
        assert float(moved[[0, 1, 3, 5]].sum()) == 0.0  # experts of absent tasks untouched
        assert (
            layer.mlp.gate.weight.grad is None
            or float(layer.mlp.gate.weight.grad.abs().sum()) == 0.0
        )


def test_grouped_home_pass_is_the_onehot_merge(tiny_path: Path) -> None:
    """The grouped pass training runs equals the differentiable merge with one-hot
    coefficients, in values and in the experts' gradients, whatever the order of the homes."""
    texts = ["a short review of a film", "Herr Präsident, meine Damen", "hi there", "a tweet"]
    home = torch.tensor([4, 1, 4, 0])
    grads = []
    outs = []
    for grouped in (True, False):
        dm = DefaultModel.load(tiny_path)
        model = dm.model
        model.train(False)
        for p in model.parameters():
            p.requires_grad_(True)
        states = dm.lower_states(texts, cache=False).batch([0, 1, 2, 3])
        if grouped:
            logits = forward_upper_home(model, states, home)
        else:
            coeffs = home_coeffs(home, len(model.moe_layers()), model.config.num_experts)
            logits = forward_upper_merged(model, states, coeffs)
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
        outs.append(logits.detach())
        grads.append(
            torch.stack([layer.mlp.experts.down_proj.grad for layer in model.moe_layers()])
        )
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="home must be"):
        forward_upper_home(model, states, home[:2])
    with pytest.raises(ValueError, match="home experts must be in"):
        forward_upper_home(model, states, torch.tensor([0, 1, 2, 99]))


def test_task_routed_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="home_weight must be >= 0"):
        BuildSpec(home_weight=-0.5)
    with pytest.raises(ValueError, match="cannot both be 0"):
        BuildSpec(full_weight=0.0)
    assert BuildSpec(full_weight=0.0, home_weight=1.0).home_weight == 1.0
    with pytest.raises(ValueError, match="alternate needs home_weight > 0"):
        BuildSpec(alternate=True)


def _shared_direction(model: torch.nn.Module) -> float:
    """Mean cosine between the experts' moves away from MiniLM's feed-forward network
    (up projections, over expert pairs and MoE layers): how much of their training they share."""
    from transformers import BertModel

    from tanbr.model.default.build import encoder_path

    bert = BertModel.from_pretrained(encoder_path()).state_dict()
    cosines = []
    for i, layer in enumerate(model.moe_layers()):  # type: ignore[operator]
        start = bert[f"encoder.layer.{model.n_lower + i}.intermediate.dense.weight"].flatten()
        moves = layer.mlp.experts.up_proj.detach().flatten(1) - start  # (E, I*H)
        unit = moves / moves.norm(dim=1, keepdim=True)
        cos = unit @ unit.T  # (E, E)
        cosines.append(float(cos[~torch.eye(len(cos), dtype=torch.bool)].mean()))
    return float(np.mean(cosines))


def test_task_routed_steps_train_the_experts_apart(tiny_path: Path) -> None:
    """The default recipe (tiny: gate- and task-routed steps in turn) moves the experts in
    directions they share less than gate-routed training alone does."""
    from tanbr.model.default.build import VARIANTS, build_from_spec

    spec = dataclasses.replace(VARIANTS["tiny"], home_weight=0.0, alternate=False)
    plain = DefaultModel.load(build_from_spec(spec, variant="tiny-gate-routed"))
    alternating = DefaultModel.load(tiny_path)
    assert alternating.info["spec"]["alternate"] and alternating.info["spec"]["home_weight"] == 1.0
    assert alternating.info["build"]["final_home"] > 0.0
    assert plain.info["spec"]["home_weight"] == 0.0
    # gate-routed training moves every expert partly the same way (measured: cosine 0.20);
    # with every other step routed by task the shared part halves (0.10), and with task-routed
    # steps alone the moves are near orthogonal (0.01)
    shared_plain = _shared_direction(plain.model)
    assert shared_plain > 0.1
    assert _shared_direction(alternating.model) < 0.6 * shared_plain


def test_one_spec_trains_the_same_weights_twice_on_two_threads(require_data: None) -> None:
    """Two threads may sum a backward in either order; the build must not depend on it."""
    from tanbr.model.default.build import VARIANTS, suite_texts, train, upcycle
    from tanbr.model.default.data import load_tasks
    from tanbr.model.default.modeling import cached_lower_states, lower_fingerprint

    spec = VARIANTS["tiny"]
    suite = load_tasks(
        spec.tasks, per_task=spec.per_task, min_per_label=spec.min_per_label, seed=spec.seed
    )
    texts, where = suite_texts(suite)
    targets = np.concatenate([suite.targets(s) for s in ("train", "calib", "test")])
    task_ids = np.concatenate([suite.task_ids(s) for s in ("train", "calib", "test")])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        states = []
        for _ in range(2):
            model, tokenizer = upcycle(spec, suite, generator=torch.Generator().manual_seed(0))
            bank = cached_lower_states(
                model, tokenizer, texts, max_length=spec.max_length,
                fingerprint=lower_fingerprint(model),
            )  # fmt: skip
            train(model, bank, where["train"], targets, task_ids, spec)
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    finally:
        torch.set_num_threads(threads)
    assert states[0].keys() == states[1].keys()
    for name, value in states[0].items():
        assert torch.equal(value, states[1][name]), name
