from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tanbr.model import accumulate as acc_module
from tanbr.model.accumulate import GRAIN, accumulate, stacked_view


@pytest.fixture(params=[1, 2], ids=["serial", "two-threads"])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run a test with torch on 1 thread (products allowed) and on 2 (chain only)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield int(request.param)
    torch.set_num_threads(previous)


def _fused(e: int = 5, rows: int = 37, cols: int = 2000, dtype: Any = torch.float32) -> Any:
    g = torch.Generator().manual_seed(0)
    return torch.randn(e, rows, cols, generator=g).to(dtype)  # (E, out, in): 74000 per expert


def _reference(terms: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    return sum((c * s.double() for c, s in terms), torch.zeros_like(terms[0][1], dtype=float))


def test_stacked_view_of_equally_spaced_experts() -> None:
    w = _fused()
    view = stacked_view([(0.5, w[1]), (0.5, w[3])])
    assert view is not None and view.shape == (2, w[0].numel())
    assert torch.equal(view[1], w[3].reshape(-1))
    assert stacked_view([(1.0, w[0]), (1.0, w[1]), (1.0, w[3])]) is None  # not a progression
    assert stacked_view([(1.0, w[0]), (1.0, w[1].clone())]) is None  # two storages
    assert stacked_view([(1.0, w[0, :10]), (1.0, w[1, :10])]) is not None  # row pieces
    assert stacked_view([(1.0, w[0, :, :10]), (1.0, w[1, :, :10])]) is None  # not contiguous


@pytest.mark.parametrize("layout", ["fused", "separate", "gaps"])
def test_weighted_sum_equals_float64_reference(threads: int, layout: str, close: Any) -> None:
    w = _fused()
    experts = {"fused": [0, 1, 2, 3, 4], "separate": [0, 1, 2, 3, 4], "gaps": [0, 1, 4]}[layout]
    sources = [w[e] if layout != "separate" else w[e].clone() for e in experts]
    coeffs = torch.rand(len(experts), generator=torch.Generator().manual_seed(1)).tolist()
    terms = list(zip(coeffs, sources, strict=True))
    dst = torch.empty_like(w[0])
    accumulate(dst, terms)
    close(dst.double(), _reference(terms))


def test_each_way_runs_where_it_should(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    products, chain = acc_module._by_products, acc_module._by_chain
    monkeypatch.setattr(acc_module, "_by_products", lambda *a: calls.append("p") or products(*a))
    monkeypatch.setattr(acc_module, "_by_chain", lambda *a: calls.append("c") or chain(*a))
    w = _fused()
    dst = torch.empty_like(w[0])
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        accumulate(dst, [(0.5, w[0]), (0.5, w[1])])  # fused and serial: one product per chunk
        accumulate(dst, [(0.5, w[0]), (0.5, w[1].clone())])  # two storages: the chain
        torch.set_num_threads(2)
        accumulate(dst, [(0.5, w[0]), (0.5, w[1])])  # BLAS could wake its pool: the chain
    finally:
        torch.set_num_threads(previous)
    assert calls == ["p", "c", "c"]


@pytest.mark.parametrize("layout", ["fused", "separate"])
def test_half_precision_is_summed_in_float32_and_rounded_once(threads: int, layout: str) -> None:
    g = torch.Generator().manual_seed(2)
    w = (torch.randint(-128, 128, (4, 300, 500), generator=g) / 128).bfloat16()  # exact
    sources = [w[e] if layout == "fused" else w[e].clone() for e in range(4)]
    coeffs = [0.5, 0.25, 0.125, 0.125]  # dyadic: every float32 partial sum is exact
    terms = list(zip(coeffs, sources, strict=True))
    dst = torch.empty_like(w[0])
    accumulate(dst, terms)
    assert torch.equal(dst, _reference(terms).bfloat16())
    one = torch.empty_like(w[0])
    accumulate(one, [(1.0, sources[2])])
    assert torch.equal(one, w[2])  # a one-hot merge is an exact copy


def test_float32_sources_into_a_bfloat16_target(threads: int) -> None:
    w = _fused()  # a lean model served in bfloat16 from a float32 checkpoint
    terms = [(0.3, w[0]), (0.7, w[2])]
    dst = torch.empty(w[0].shape, dtype=torch.bfloat16)
    accumulate(dst, terms)
    # summed in float32 (error ~ eps * |terms|, which dominates where the terms cancel), then
    # rounded once: within one bfloat16 step (2^-7 relative) of the exact sum
    torch.testing.assert_close(dst.double(), _reference(terms), rtol=2**-7, atol=1e-6)


def test_chunks_of_the_chain_stay_within_the_grain(monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    real_add = torch.Tensor.add_

    def add_(self: torch.Tensor, other: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        sizes.append(self.numel())
        return real_add(self, other, **kwargs)

    w = _fused()
    dst = torch.empty_like(w[0])
    previous = torch.get_num_threads()
    monkeypatch.setattr(torch.Tensor, "add_", add_)
    try:
        torch.set_num_threads(2)
        accumulate(dst, [(0.5, w[0]), (0.5, w[1])])
    finally:
        torch.set_num_threads(previous)
    assert sizes and max(sizes) <= GRAIN  # each kernel runs in the calling thread


def test_bad_terms_are_named() -> None:
    with pytest.raises(ValueError, match="at least one"):
        accumulate(torch.empty(3), [])
    with pytest.raises(ValueError, match="a source has 4 elements, the target 3"):
        accumulate(torch.empty(3), [(1.0, torch.ones(4))])
