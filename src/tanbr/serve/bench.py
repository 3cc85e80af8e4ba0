"""``tanbr bench serve``: load-test the HTTP service over loopback, merged vs full MoE.

The command starts two ``tanbr serve`` subprocesses on 127.0.0.1 (free ports): one serving the
policy (``tanbr``), one serving the full MoE (no merging, real top-k dispatch). It sends both
the same bounded load (``--concurrency`` clients, each with one call in flight) of real texts
drawn from the default model's test split with a drifting task mix, and answers a fraction of
the predictions with their true label, so the policy learns while it serves. The stream is sent
in ``--rounds`` parts, each part to one server and then the other (ABBA order): background load
on a shared machine then weighs on both runs alike.

Throughput counts predictions per second of wall time (feedback calls are part of the load but
not counted); latencies are client-side, per predict call, over loopback.

A causal language model is benchmarked on streamed generation instead
(:mod:`tanbr.serve.bench_lm`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

logger = logging.getLogger(__name__)

FIGURES = (
    "requests",
    "errors",
    "throughput_rps",
    "latency_p50_ms",
    "latency_p99_ms",
    "merges",
    "propagation_p50_ms",
    "propagation_p99_ms",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--requests",
        type=int,
        help="predict calls per run (10000); a language model: requests per concurrency level"
        " (default max(16, 2 x concurrency))",
    )
    parser.add_argument("--concurrency", type=int, default=32, help="clients in parallel")
    parser.add_argument(
        "--slot-size", type=int, help="texts per slot (256); a language model: requests (16)"
    )
    parser.add_argument(
        "--levels",
        default="1,8,32",
        help="a language model: the concurrency levels, comma-separated (1,8,32)",
    )
    parser.add_argument(
        "--max-tokens", type=int, default=32, help="a language model: tokens per completion (32)"
    )
    parser.add_argument(
        "--feedback", type=float, default=0.5, help="fraction of predictions labelled back"
    )
    parser.add_argument(
        "--period", type=int, default=6, help="slots between changes of the dominant tasks"
    )
    parser.add_argument("--policy", default="tanbr", help="policy of the merged run (tanbr)")
    parser.add_argument(
        "--baseline", default="full-moe", help="policy of the comparison run (full-moe)"
    )
    parser.add_argument(
        "--model",
        default="default",
        help="default-model variant or folder; a causal LM (lm, lm-tiny or a folder) is"
        " benchmarked on streamed generation (tanbr.serve.bench_lm)",
    )
    parser.add_argument(
        "--shape",
        choices=("small", "medium", "large"),
        help="a language model: serve a Mixtral of this bench preset's shape with random"
        " weights and the model's tokenizer and prompts (costs of a model whose experts"
        " dominate; its text is noise)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the workload")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of each server (1: the load generator needs a core too)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="parts the stream is sent in, alternating between the two servers (4)",
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for a server to start"
    )
    parser.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="local: merged vs full MoE, one process each; ray: the policy on --replicas Ray"
        " Serve replicas beside the same policy on one replica (needs tanbr[ray])",
    )
    parser.add_argument(
        "--replicas", type=int, default=2, help="replicas of the Ray run with --executor ray (2)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document")


@dataclass(frozen=True)
class Run:
    """One server of the benchmark: its policy, and where it serves."""

    policy: str
    executor: str = "local"
    replicas: int = 1


@dataclass(frozen=True)
class LoadResult:
    """One run's figures (client side), plus what the server reported at the end."""

    requests: int
    errors: int
    throughput_rps: float
    latency_p50_ms: float
    latency_p99_ms: float
    merges: int
    feedback: int
    accuracy: float
    slots: int
    wall_s: float
    replicas: int
    propagation_p50_ms: float | None
    propagation_p99_ms: float | None


# --- the server as a subprocess -------------------------------------------------------------


class ServerProcess:
    """``tanbr serve`` in a subprocess on loopback: start, wait until ready, kill or stop.

    Used by the benchmark and by the tests, which kill it with SIGKILL and restart it on the
    same state folder.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        state_dir: Path,
        log_path: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = list(args)
        self.state_dir = Path(state_dir)
        self.log_path = Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.env.setdefault("HF_HUB_OFFLINE", "1")
        self.env.setdefault("TRANSFORMERS_OFFLINE", "1")
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 300.0) -> str:
        """Spawn the server and return its URL once it accepts requests."""
        ready = self.state_dir.with_name(self.state_dir.name + ".ready")
        ready.unlink(missing_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in wait/kill)
        cmd = [
            sys.executable,
            "-m",
            "tanbr.cli",
            "serve",
            *self.args,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--state-dir",
            str(self.state_dir),
            "--ready-file",
            str(ready),
        ]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=self._log, env=self.env)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"tanbr serve exited with code {self.proc.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"tanbr serve not ready after {timeout} s:\n{self.log_tail()}")
            time.sleep(0.1)
        self.url = ready.read_text(encoding="utf-8").strip()
        return self.url

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (what a crash looks like)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self._close_log()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait for a clean exit; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_log()
        return int(self.proc.returncode)

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


# --- the load -------------------------------------------------------------------------------


def run_load(
    url: str,
    texts: Sequence[str],
    labels: Sequence[str],
    *,
    concurrency: int,
    feedback: float,
    seed: int,
    token: str | None = None,
    desc: str = "load",
) -> dict[str, Any]:
    """Send every text once (``concurrency`` calls in flight) and feedback for a fraction.

    Returns client-side figures: latencies of predict calls, errors, accuracy, wall time.
    """
    return asyncio.run(
        _load(
            url,
            texts,
            labels,
            concurrency=concurrency,
            feedback=feedback,
            seed=seed,
            token=token,
            desc=desc,
        )
    )


async def _load(
    url: str,
    texts: Sequence[str],
    labels: Sequence[str],
    *,
    concurrency: int,
    feedback: float,
    seed: int,
    token: str | None,
    desc: str,
) -> dict[str, Any]:
    import httpx
    import numpy as np
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    bar = tqdm(total=len(texts), desc=desc, unit="req", file=sys.stderr, leave=False)
    give = rng.random(len(texts)) < feedback  # (n,) which predictions get their label back
    latencies: list[float] = []
    errors: list[str] = []
    hits = answered = 0
    sent_feedback = 0
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    next_index = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal next_index, hits, answered, sent_feedback
        while next_index < len(texts):
            i = next_index
            next_index += 1
            t0 = time.perf_counter()
            try:
                r = await http.post("/v1/predict", json={"text": texts[i]})
            except httpx.HTTPError as err:
                errors.append(f"predict: {type(err).__name__}: {err}")
                continue
            latencies.append((time.perf_counter() - t0) * 1e3)
            bar.update(1)
            if r.status_code != 200:
                errors.append(f"predict: HTTP {r.status_code}: {r.text[:200]}")
                continue
            answer = r.json()["predictions"][0]
            answered += 1
            hits += answer["label"] == labels[i]
            if give[i]:
                body = {"request_id": answer["request_id"], "label": labels[i]}
                try:
                    f = await http.post("/v1/feedback", json=body, headers=headers)
                except httpx.HTTPError as err:
                    errors.append(f"feedback: {type(err).__name__}: {err}")
                    continue
                if f.status_code != 200:
                    errors.append(f"feedback: HTTP {f.status_code}: {f.text[:200]}")
                else:
                    sent_feedback += 1

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120.0) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    bar.close()
    lat = np.asarray(latencies, dtype=np.float64)
    if errors:
        logger.warning("%d errors; first: %s", len(errors), errors[0])
    return {
        "requests": len(texts),
        "errors": len(errors),
        "wall_s": wall,
        "throughput_rps": len(latencies) / wall if wall > 0 else 0.0,
        "latency_p50_ms": float(np.quantile(lat, 0.5)) if lat.size else float("nan"),
        "latency_p99_ms": float(np.quantile(lat, 0.99)) if lat.size else float("nan"),
        "latencies_ms": latencies,
        "answered": answered,
        "hits": hits,
        "accuracy": hits / max(1, answered),
        "feedback": sent_feedback,
    }


# --- the command ----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from tanbr.serve import bench_lm

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per call otherwise
    if args.requests is not None and args.requests < 1:
        raise ValueError(f"--requests must be >= 1, got {args.requests}")
    if bench_lm.is_language_model(args.model):
        return bench_lm.run(args)
    if args.shape is not None:
        raise ValueError(f"--shape applies to a causal language model, not to {args.model!r}")
    args.requests = 10000 if args.requests is None else args.requests
    args.slot_size = 256 if args.slot_size is None else args.slot_size
    if args.requests < 1:
        raise ValueError(f"--requests must be >= 1, got {args.requests}")
    if not 1 <= args.concurrency <= 1024:
        raise ValueError(f"--concurrency must be in 1..1024, got {args.concurrency}")
    if not 0.0 <= args.feedback <= 1.0:
        raise ValueError(f"--feedback must be in [0, 1], got {args.feedback}")
    if args.slot_size < 1:
        raise ValueError(f"--slot-size must be >= 1, got {args.slot_size}")
    if args.period < 1:
        raise ValueError(f"--period must be >= 1, got {args.period}")
    if not 1 <= args.rounds <= args.requests:
        raise ValueError(f"--rounds must be in 1..--requests, got {args.rounds}")
    if args.requests < 10 * args.slot_size:
        logger.warning("fewer than 10 slots: --requests / --slot-size < 10")
    texts, labels = _workload(
        args.model, n=args.requests, slot_size=args.slot_size, period=args.period, seed=args.seed
    )
    if args.executor == "ray":
        return _run_ray(args, texts, labels)
    runs = {"merged": Run(args.policy), "full_moe": Run(args.baseline)}
    with tempfile.TemporaryDirectory(prefix="tanbr-bench-serve-") as tmp:
        results = _interleaved(Path(tmp), runs, texts, labels, args=args)
    out: dict[str, Any] = {k: _round(v) for k, v in asdict(results["merged"]).items()}
    out["policy"] = args.policy
    out["full_moe"] = {k: _round(v) for k, v in asdict(results["full_moe"]).items()}
    out["full_moe"]["policy"] = args.baseline
    out["throughput_ratio"] = _ratio(results["merged"], results["full_moe"])
    out["concurrency"] = args.concurrency
    out["slot_size"] = args.slot_size
    out["rounds"] = args.rounds
    if args.json:
        print(json.dumps(out))
    else:
        _print_table(results, args)
    return 0 if all(r.errors == 0 for r in results.values()) else 1


def _run_ray(args: argparse.Namespace, texts: Sequence[str], labels: Sequence[str]) -> int:
    """The policy on ``--replicas`` Ray Serve replicas beside the same policy on one (each
    server starts a Ray of its own on this machine): what more replicas buy, side by side."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ValueError("--executor ray needs Ray: pip install 'tanbr[ray]'")
    if args.replicas < 1:
        raise ValueError(f"--replicas must be >= 1, got {args.replicas}")
    runs = {f"replicas_{args.replicas}": Run(args.policy, "ray", args.replicas)}
    if args.replicas != 1:
        runs["replicas_1"] = Run(args.policy, "ray", 1)
    with tempfile.TemporaryDirectory(prefix="tanbr-bench-serve-ray-") as tmp:
        results = _interleaved(Path(tmp), runs, texts, labels, args=args)
    out: dict[str, Any] = {
        "executor": "ray",
        "policy": args.policy,
        "runs": {name: {k: _round(v) for k, v in asdict(r).items()} for name, r in results.items()},
        "concurrency": args.concurrency,
        "slot_size": args.slot_size,
        "rounds": args.rounds,
        "threads_per_replica": args.threads,
    }
    if args.replicas != 1:
        many, one = results[f"replicas_{args.replicas}"], results["replicas_1"]
        out["throughput_ratio"] = _ratio(many, one)
    if args.json:
        print(json.dumps(out))
    else:
        _print_table(results, args)
    return 0 if all(r.errors == 0 for r in results.values()) else 1


def _ratio(a: LoadResult, b: LoadResult) -> float | None:
    return round(a.throughput_rps / b.throughput_rps, 3) if b.throughput_rps else None


def _interleaved(
    folder: Path,
    runs: dict[str, Run],
    texts: Sequence[str],
    labels: Sequence[str],
    *,
    args: argparse.Namespace,
) -> dict[str, LoadResult]:
    """Both servers up at once; the stream is sent in ``args.rounds`` parts, each part to one
    server and then the other (in ABBA order), so that a change of the machine's background
    load during the command weighs on both runs alike. An idle server costs no CPU."""
    import httpx
    import numpy as np

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    servers: dict[str, ServerProcess] = {}
    # SIGTERM unwinds like Ctrl-C, so the servers are stopped (a server on Ray stops its Ray)
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        for name, spec in runs.items():
            (folder / name).mkdir(parents=True)
            where = f" on {spec.replicas} Ray Serve replicas" if spec.executor == "ray" else ""
            print(
                f"tanbr bench serve: starting a {spec.policy} server{where}",
                file=sys.stderr,
                flush=True,
            )
            servers[name] = _server(folder / name, spec, args)
            servers[name].start(timeout=args.timeout)
        parts: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
        names = list(runs)
        for r, idx in enumerate(np.array_split(np.arange(len(texts)), args.rounds)):
            for name in names if r % 2 == 0 else names[::-1]:
                parts[name].append(
                    run_load(
                        servers[name].url,
                        [texts[i] for i in idx],
                        [labels[i] for i in idx],
                        concurrency=args.concurrency,
                        feedback=args.feedback,
                        seed=args.seed + r,
                        desc=f"{name} {r + 1}/{args.rounds}",
                    )
                )
        status = {
            name: httpx.get(f"{server.url}/v1/status", timeout=60.0).json()
            for name, server in servers.items()
        }
    except BaseException:
        for server in servers.values():
            server.stop(timeout=30)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    for name, server in servers.items():
        code = server.stop()
        if code not in (0, -signal.SIGTERM):  # uvicorn re-raises SIGTERM after a clean stop
            logger.warning("the %s server exited with code %d", name, code)
    return {name: _combine(parts[name], status[name]) for name in runs}


def _server(folder: Path, spec: Run, args: argparse.Namespace) -> ServerProcess:
    where = []
    if spec.executor == "ray":
        where = ["--executor", "ray", "--replicas", str(spec.replicas)]
    return ServerProcess(
        [
            *where,
            "--model",
            args.model,
            "--policy",
            spec.policy,
            "--seed",
            str(args.seed),
            "--slot-size",
            str(args.slot_size),
            "--threads",
            str(args.threads),
        ],
        state_dir=folder / "state",
        log_path=folder / "server.log",
    )


def _combine(parts: Sequence[dict[str, Any]], status: dict[str, Any]) -> LoadResult:
    """One run's figures over its rounds: latencies pooled, throughput = calls / wall time."""
    import numpy as np

    lat = np.concatenate([np.asarray(p["latencies_ms"], dtype=np.float64) for p in parts])
    wall = sum(p["wall_s"] for p in parts)
    answered = sum(p["answered"] for p in parts)
    return LoadResult(
        requests=sum(p["requests"] for p in parts),
        errors=sum(p["errors"] for p in parts),
        throughput_rps=len(lat) / wall if wall > 0 else 0.0,
        latency_p50_ms=float(np.quantile(lat, 0.5)) if lat.size else float("nan"),
        latency_p99_ms=float(np.quantile(lat, 0.99)) if lat.size else float("nan"),
        merges=int(status["merges"]),
        feedback=sum(p["feedback"] for p in parts),
        accuracy=sum(p["hits"] for p in parts) / max(1, answered),
        slots=int(status["slot"]) + 1,
        wall_s=wall,
        replicas=int(status.get("replicas", 1)),
        propagation_p50_ms=status["latency"].get("propagation_p50_ms"),
        propagation_p99_ms=status["latency"].get("propagation_p99_ms"),
    )


def _workload(
    model: str, *, n: int, slot_size: int, period: int, seed: int
) -> tuple[list[str], list[str]]:
    """``n`` test-split texts in arrival order, and their true labels.

    The stream is the demo's drift workload (a few tasks dominate, the dominant ones change
    every ``period`` slots) cut into slots of ``slot_size``, so the server's slots see the mix
    move as the policy learns.
    """
    from pathlib import Path

    import numpy as np

    from tanbr.backend.registry import BackendSpec
    from tanbr.experiment.workload import draw_slots, drift

    path = model if Path(model).is_dir() else ""
    spec = BackendSpec(variant=model if not path else "default", path=path, lean=True)
    backend, _, test = spec.load()
    rng = np.random.default_rng([seed, 5])
    n_slots = -(-n // slot_size)
    mixes = drift(n_slots=n_slots, n_tasks=len(test.task_names), rng=rng, period=period, ramp=1)
    texts: list[str] = []
    labels: list[str] = []
    for slot in draw_slots(test, mixes, slot_size=slot_size, rng=rng):
        assert slot.truth is not None
        texts += slot.requests.texts
        labels += [backend.labels[int(k)] for k in slot.truth.labels]
    return texts[:n], labels[:n]


def _round(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


def _print_table(results: dict[str, LoadResult], args: argparse.Namespace) -> None:
    header = ["run", *FIGURES, "accuracy", "feedback", "slots"]
    rows = [
        [name, *(str(_round(getattr(r, f))) for f in header[1:])] for name, r in results.items()
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
