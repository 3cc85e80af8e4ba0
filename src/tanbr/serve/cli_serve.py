"""``tanbr serve``: the HTTP service on the default model or a local checkpoint.

A causal language model is served through the OpenAI-compatible API (``/v1/completions``,
``/v1/chat/completions``, ``/v1/models``); a slot then counts requests, not texts.

Binds 127.0.0.1 by default. The bearer token that protects feedback and admin endpoints comes
from ``--token-file`` or the ``TANBR_SERVE_TOKEN`` environment variable (never from the
command line, where other users of the machine could read it).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

TOKEN_ENV = "TANBR_SERVE_TOKEN"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config",
        nargs="?",
        help="experiment config (TOML) for the model, estimator, parameterization and reward",
    )
    parser.add_argument("--preset", help="a named config instead of CONFIG (e.g. demo)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted config override, e.g. estimator.n_types=7 (repeatable)",
    )
    parser.add_argument(
        "--model",
        help="default-model variant (default, task-routed, gate-routed, tiny), language-model"
        " variant (lm, lm-tiny: built and cached on first use) or a local checkpoint folder"
        " (default: the config's model)",
    )
    parser.add_argument(
        "--tasks",
        metavar="FILE",
        help="your task file, for a model folder of your own (its calibration requests fit the"
        " estimator; see 'tanbr tasks check FILE')",
    )
    parser.add_argument("--policy", default="tanbr", help="policy serving the slots (tanbr)")
    parser.add_argument(
        "--shadow",
        type=int,
        default=None,
        help="requests of each closing slot scored against the full MoE off the request path,"
        " so the policy learns with no client feedback (default: the config's reward.probe"
        " for a label-free reward or a language model, else 0)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the policy and estimator")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path("serve-state"),
        help="folder of the durable state; a restart resumes from it (serve-state)",
    )
    parser.add_argument("--slot-size", type=int, default=256, help="texts per slot (256)")
    parser.add_argument(
        "--slot-seconds",
        type=float,
        default=None,
        help="also close a slot this long after its first text",
    )
    parser.add_argument("--max-batch", type=int, default=64, help="texts per model forward")
    parser.add_argument(
        "--batch-wait-ms", type=float, default=0.0, help="wait to fill a micro-batch (0)"
    )
    parser.add_argument(
        "--observe-max",
        type=int,
        default=64,
        help="texts of a closing slot the estimator observes, sampled (0: all; 64)",
    )
    parser.add_argument("--max-texts", type=int, default=64, help="texts per predict call")
    parser.add_argument(
        "--served-model-name",
        help="a language model's id in the OpenAI-compatible API (default: its folder's name)",
    )
    parser.add_argument(
        "--max-tokens-cap",
        type=int,
        default=512,
        help="largest max_tokens a generation request may ask for (512)",
    )
    parser.add_argument(
        "--max-running",
        type=int,
        default=64,
        help="generations in flight at once; more wait in a queue (64)",
    )
    parser.add_argument("--max-chars", type=int, default=2000, help="characters per text")
    parser.add_argument(
        "--token-file",
        type=Path,
        help=f"file holding the bearer token (else ${TOKEN_ENV}; unset: no token)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    parser.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: one process (two in-process model copies); ray: --replicas Ray Serve"
        " replicas behind one HTTP entry point and one controller (needs tanbr[ray])",
    )
    parser.add_argument(
        "--replicas", type=int, default=1, help="model replicas with --executor ray (1)"
    )
    parser.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="a running Ray cluster to join (default: start a local Ray with this machine's cores)",
    )
    parser.add_argument(
        "--ready-file",
        type=Path,
        help="write the service's URL to this file once it accepts requests",
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from tanbr.serve.app import create_app
    from tanbr.serve.generation import GenerationConfig
    from tanbr.serve.replicas import ServeConfig, build_replicas
    from tanbr.serve.slots import SlotConfig
    from tanbr.serve.state import StateLock

    if args.port < 0 or args.port > 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    from tanbr.model.lean import map_large_allocations

    map_large_allocations()  # merged experts come and go for as long as the service runs
    config = ServeConfig(
        experiment=args.config,
        preset=args.preset,
        overrides=tuple(args.overrides),
        model=args.model,
        tasks=args.tasks,
        policy=args.policy,
        seed=args.seed,
        state_dir=args.state_dir,
        slots=SlotConfig(
            slot_size=args.slot_size,
            slot_seconds=args.slot_seconds,
            max_batch=args.max_batch,
            batch_wait_ms=args.batch_wait_ms,
            observe_max=args.observe_max,
            shadow=args.shadow,
        ),
        max_texts=args.max_texts,
        max_chars=args.max_chars,
        token=_read_token(args.token_file),
        model_name=args.served_model_name,
        generation=GenerationConfig(
            max_tokens_cap=args.max_tokens_cap, max_running=args.max_running
        ),
    )
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("binding %s: the service is reachable from other machines", args.host)
        if config.token is None:
            logger.warning("no token is set: anyone who reaches it may send feedback")
    if args.executor == "ray":
        from tanbr.serve.cli_ray import run_on_ray

        return run_on_ray(args, config)
    if args.replicas != 1 or args.ray_address:
        raise ValueError("--replicas and --ray-address need --executor ray")
    lock = StateLock(config.state_dir).acquire()  # a second server on the folder stops here
    try:
        sock = _bind(args.host, args.port)  # a taken port fails before the model loads
    except BaseException:
        lock.release()
        raise
    try:
        replicas = build_replicas(config)  # model, policy and state errors surface here
    except BaseException:
        sock.close()
        lock.release()
        raise
    app = create_app(config, build=lambda _: replicas)
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    )
    watcher = threading.Thread(
        target=_announce, args=(server, url, args.ready_file), name="ready", daemon=True
    )
    watcher.start()
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        lock.release()
    error = getattr(app.state, "startup_error", None)
    if error is not None:
        raise error
    if not server.started:
        print("tanbr: error: the service did not start (see the log above)", file=sys.stderr)
        return 1
    return 0


def _read_token(path: Path | None) -> str | None:
    if path is not None:
        token = path.read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"--token-file {path} is empty")
        return token
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ValueError(f"cannot bind {host}:{port}: {err.strerror}") from None
    sock.set_inheritable(True)
    return sock


def _announce(server: object, url: str, ready_file: Path | None) -> None:
    """Once uvicorn serves: log the URL and write it to ``ready_file`` (atomically)."""
    while not getattr(server, "started", False):
        if getattr(server, "should_exit", False):
            return
        time.sleep(0.05)
    print(f"tanbr: serving on {url} (docs: {url}/docs)", file=sys.stderr, flush=True)
    if ready_file is not None:
        tmp = ready_file.with_name(ready_file.name + ".tmp")
        tmp.write_text(url + "\n", encoding="utf-8")
        os.replace(tmp, ready_file)
