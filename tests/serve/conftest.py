"""Fixtures for the service tests: the tiny default model and a real server subprocess."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tanbr.serve.bench import ServerProcess

TOKEN = "test-token-123"


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny default-model variant (built once, then cached)."""
    from tanbr.model.default import build_default_model

    return build_default_model("tiny")


@pytest.fixture
def start_server(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., ServerProcess]]:
    """Start ``tanbr serve`` on the tiny model; every server is killed at teardown."""
    servers: list[ServerProcess] = []

    def start(*extra: str, state_dir: Path | None = None, token: bool = True) -> ServerProcess:
        folder = tmp_path_factory.mktemp("serve")
        state = state_dir if state_dir is not None else folder / "state"
        env = {"TANBR_SERVE_TOKEN": TOKEN} if token else {"TANBR_SERVE_TOKEN": ""}
        server = ServerProcess(
            ["--model", str(tiny_model), "--threads", "1", *extra],
            state_dir=state,
            log_path=folder / "server.log",
            env=env,
        )
        servers.append(server)
        server.start(timeout=240)
        return server

    yield start
    for server in servers:
        server.kill()


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local Ray of 2 CPUs for one test module (stopped at its end)."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'tanbr[ray]')")
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")  # a loaded machine
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20)
    try:
        yield
    finally:
        from ray import serve

        serve.shutdown()  # (Serve's client outlives Ray otherwise: the next module's is stale)
        ray.shutdown()
