from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tanbr.model import find_moe_blocks, one_hot_plan, uniform_plan, validate_coeffs, validate_plan


@pytest.mark.parametrize(
    ("coeffs", "message"),
    [
        ([0.5, 0.5, 0.5, -0.5], "non-negative"),
        ([0.5, float("nan"), 0.25, 0.25], "NaN or infinity"),
        ([0.5, float("inf"), 0.25, 0.25], "NaN or infinity"),
        ([0.5, 0.5, 0.0], "have 3 weights per row, the block has 4"),
        ([[[0.25, 0.25, 0.25, 0.25]]], r"must be \(E,\) or \(m, E\)"),
        (np.zeros((0, 4)), "no row"),
        (
            [[0.5, 0.5, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0]],
            r"rows \[0, 1\] all give weight to expert 1",
        ),
        ([[1.0, 0.0, 0.0, 0.0], [0.0, 0.2, 0.2, 0.0]], "row 1 must sum to 1"),
        ([0.1, 0.1, 0.1, 0.1], "must sum to 1"),
        (["a", "b", "c", "d"], "not an array of numbers"),
    ],
)
def test_bad_coeffs_are_rejected_with_the_block_name(coeffs: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        validate_coeffs(coeffs, 4, block="model.layers.0.mlp")
    assert "model.layers.0.mlp" in str(err.value)


def test_coeffs_are_renormalised_exactly() -> None:
    c = np.array([0.1, 0.2, 0.3, 0.4], dtype=np.float32)  # float32 sum is not exactly 1
    out = validate_coeffs(c, 4)
    assert out.dtype == np.float64 and out.sum() == pytest.approx(1.0, abs=1e-15)
    assert np.allclose(out, c, atol=1e-7)


@settings(max_examples=50, deadline=None)
@given(st.integers(min_value=1, max_value=16), st.integers(min_value=0, max_value=2**31 - 1))
def test_any_point_of_the_simplex_is_accepted(n: int, seed: int) -> None:
    c = np.random.default_rng(seed).dirichlet(np.ones(n))
    assert np.allclose(validate_coeffs(c, n), c, atol=1e-12)


def test_plans_are_checked_against_the_blocks(make_case: Any) -> None:
    blocks = find_moe_blocks(make_case("mixtral").model)
    plan = uniform_plan(blocks)
    assert set(validate_plan(plan, blocks)) == {b.name for b in blocks}
    with pytest.raises(ValueError, match=r"unknown block.*did you mean 'model.layers.0.mlp'"):
        validate_plan(plan | {"model.layers.0.mpl": np.ones(4) / 4}, blocks)
    with pytest.raises(ValueError, match=r"no coeffs for block\(s\) \['model.layers.1.mlp'\]"):
        validate_plan({"model.layers.0.mlp": np.ones(4) / 4}, blocks)
    with pytest.raises(ValueError, match="maps block names"):
        validate_plan([np.ones(4) / 4], blocks)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp"):
        validate_plan(plan | {"model.layers.1.mlp": [1.0, 0.0, 0.0]}, blocks)
    one_hot = one_hot_plan(blocks, 2)
    assert all(np.array_equal(v, [0, 0, 1, 0]) for v in one_hot.values())
    with pytest.raises(ValueError, match="expert must be in"):
        one_hot_plan(blocks, 4)


def test_merged_weights_pickle() -> None:
    import pickle

    import torch

    from tanbr.model.coeffs import MergedWeights

    weights = MergedWeights({"down_proj": torch.arange(6.0).reshape(2, 3)}, method="regmean")
    back = pickle.loads(pickle.dumps(weights))
    assert back.method == "regmean" and torch.equal(
        back.tensors["down_proj"], weights.tensors["down_proj"]
    )
