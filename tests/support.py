"""Helpers shared by test folders."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
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
