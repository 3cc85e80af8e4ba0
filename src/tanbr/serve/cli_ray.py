"""``tanbr serve --executor ray``: the service's replicas on Ray Serve (see
:mod:`tanbr.serve.ray_serve`); runs until interrupted, then stops the replicas and the
controller, which releases the state folder."""

from __future__ import annotations

import argparse
import importlib.util
import os
import signal
import socket
import sys
import threading
from typing import Any


def run_on_ray(args: argparse.Namespace, config: Any) -> int:
    if importlib.util.find_spec("ray") is None:
        raise ValueError("--executor ray needs Ray: pip install 'tanbr[ray]'")
    from tanbr.serve.ray_serve import start_service

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    service = start_service(
        config,
        replicas=args.replicas,
        host=args.host,
        port=args.port or _free_port(args.host),
        address=args.ray_address,
        replica_cpus=float(max(1, args.threads)),
    )
    try:
        print(
            f"tanbr: serving on {service.url} ({args.replicas} Ray Serve replicas; docs:"
            f" {service.url}/docs)",
            file=sys.stderr,
            flush=True,
        )
        if args.ready_file is not None:
            tmp = args.ready_file.with_name(args.ready_file.name + ".tmp")
            tmp.write_text(service.url + "\n", encoding="utf-8")
            os.replace(tmp, args.ready_file)
        stop.wait()
    finally:
        service.shutdown()
    return 0


def _free_port(host: str) -> int:
    """A port free on ``host`` now (Ray Serve's proxy takes a fixed port, not 0)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
