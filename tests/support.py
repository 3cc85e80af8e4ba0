"""Helpers shared by test folders."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any


def wait_until(
    fetch: Callable[[], dict[str, Any]],
    ok: Callable[[dict[str, Any]], bool],
    *,
    timeout_s: float = 120.0,
    every_s: float = 0.1,
) -> Any:
    """Poll ``fetch`` until ``ok`` holds for its value (a service's slot boundary runs on a
    thread of its own); fails with the last value after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fetch()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not reached; last value {value}")
        time.sleep(every_s)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def resident_while_running(merger: Any) -> Iterator[list[int]]:
    """Within the block: each time an original MoE block of ``merger`` runs, how many blocks
    have their original experts in memory (a streamed full MoE: one at a time)."""
    counts: list[int] = []

    def count(module: Any, args: Any) -> None:
        counts.append(sum(merger._resident(b) for b in merger.blocks))

    hooks = [merger._originals[b.name].register_forward_pre_hook(count) for b in merger.blocks]
    try:
        yield counts
    finally:
        for hook in hooks:
            hook.remove()
