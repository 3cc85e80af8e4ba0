"""Fixtures for the backend tests: tiny checkpoints of every family (built once per session,
never written to by a test), the two task files, and one torch thread."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # hf_checkpoints, for every test

from hf_checkpoints import (
    build_checkpoint,
    write_classification_tasks,
    write_lm_tasks,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def task_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Backend kind -> a task file of the kind it serves."""
    folder = tmp_path_factory.mktemp("tasks")
    return {
        "classifier": write_classification_tasks(folder / "classification.jsonl"),
        "lm": write_lm_tasks(folder / "lm.jsonl"),
    }


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """``checkpoint(family, kind)``: the folder of a tiny checkpoint, built on first use."""
    built: dict[tuple[str, str], Path] = {}

    def get(family: str, kind: str) -> Path:
        if (family, kind) not in built:
            folder = tmp_path_factory.mktemp(f"{family}-{kind}")
            built[(family, kind)] = build_checkpoint(family, kind, folder)
        return built[(family, kind)]

    return get


@pytest.fixture
def open_hf(
    checkpoint: Callable[[str, str], Path], task_files: dict[str, Path]
) -> Callable[..., Any]:
    """``open_hf(family, kind, **spec)``: the backend and its pools, memory-lean by default."""
    from tanbr.backend.registry import BackendSpec, open_backend

    def open_(family: str, kind: str, **changes: Any) -> Any:
        spec = BackendSpec(path=str(checkpoint(family, kind)), tasks=str(task_files[kind]))
        return open_backend(spec.replace(**({"lean": True} | changes)))

    return open_


def random_plan(blocks: Any, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.dirichlet(np.ones(e)) for name, e in blocks.items()}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread() -> Iterator[None]:
    """Tiny models run faster on one thread than on a pool shared with other processes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


REORDER_RTOL = 1e-5


def assert_reordered_close(actual: Any, expected: Any) -> None:
    """Equal up to the order of float operations (another batch, another loading path): a
    float32 sum of n terms moves by about n * eps of its scale, far below 1e-5 in these tiny
    models, while a wrong computation moves outputs by 1e-2 or more."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    np.testing.assert_allclose(
        actual, expected, rtol=REORDER_RTOL, atol=REORDER_RTOL * max(1, scale)
    )
