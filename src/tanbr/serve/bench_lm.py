"""``tanbr bench serve`` on a language model: streamed generation, merged vs full MoE.

Two ``tanbr serve`` subprocesses on loopback serve the same causal LM, one with the policy
(``tanbr``: each slot generates with its merged model) and one with the full MoE (real top-k
dispatch). Each concurrency level (1, 8, 32 clients, each with one request in flight) sends
both servers the same prompts: held-out prompts of the model's task file, drawn with a
drifting domain mix, streamed through ``POST /v1/completions`` with a fixed ``max_tokens``,
temperature and seed per request. A level is sent in two halves, merged-full then full-merged
(ABBA), so that background load on a shared machine weighs on both alike. No client feedback is
sent: the merged service learns from its label-free likelihood reward only.

Figures, client side: ``tokens_per_s`` (completion tokens of the level / its wall time),
``ttft_p50_ms`` / ``ttft_p99_ms`` (request sent to first text chunk), ``tpot_p50_ms`` (time per
output token after the first: (last chunk - first chunk) / (tokens - 1), per request), and per
server ``rss_bytes`` (resident set of the server process read from ``/proc`` after the load,
once no slot boundary is due or running: the resting service, not a merge half built;
``rss_peak_bytes`` its high-water mark), ``model_rss_bytes`` (``rss_bytes`` minus
``runtime_rss_bytes``, the resident set of a process that makes the server's imports and loads
no model: on a small model the runtime hides the model's footprint), ``errors``, ``merges``.

``--shape`` serves, instead of the model's own weights, a Mixtral of a bench preset's shape
with random weights and the model's tokenizer and prompts
(:func:`~tanbr.model.presets.write_shaped_lm`): the costs of a model whose experts dominate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tanbr.serve.bench import ServerProcess

logger = logging.getLogger(__name__)

LEVELS = (1, 8, 32)
LEVEL_FIGURES = ("requests", "errors", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms")
TARGETS = {"tpot_ratio": 0.6, "rss_ratio": 0.75}  # merged / full MoE, from the issue


@dataclass(frozen=True)
class LevelResult:
    """One server's figures at one concurrency level (client side)."""

    requests: int
    errors: int
    tokens: int
    wall_s: float
    tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float


def is_language_model(model: str) -> bool:
    """Whether ``model`` (a variant name or a folder) is a causal language model."""
    from tanbr.model.lm import VARIANTS

    if model in VARIANTS:
        return True
    config = Path(model) / "config.json"
    if not config.is_file():
        return False
    architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    return any(str(a).endswith("ForCausalLM") for a in architectures)


def model_folder(model: str) -> Path:
    """The checkpoint folder of a language-model variant (built and cached) or folder."""
    from tanbr.model.lm import VARIANTS, build_lm

    return build_lm(model) if model in VARIANTS else Path(model).resolve()


def prompts_for(folder: Path, *, n: int, slot_size: int, period: int, seed: int) -> list[str]:
    """``n`` held-out prompts of the model's task file in arrival order, the domain mix
    drifting every ``period`` slots of ``slot_size`` requests."""
    from tanbr.experiment.workload import drift
    from tanbr.tasks import read_task_file

    rows = read_task_file(folder / "tasks.jsonl").examples
    domains = sorted({r.task for r in rows})
    by_domain = {d: [r.text for r in rows if r.task == d] for d in domains}
    rng = np.random.default_rng([seed, 7])
    n_slots = -(-n // slot_size)
    mixes = drift(n_slots=n_slots, n_tasks=len(domains), rng=rng, period=period, ramp=1)
    prompts: list[str] = []
    for mix in mixes:
        for k in rng.choice(len(domains), size=slot_size, p=mix / mix.sum()):
            pool = by_domain[domains[int(k)]]
            prompts.append(pool[int(rng.integers(len(pool)))])
    return prompts[:n]


# --- the load -------------------------------------------------------------------------------


async def _stream_load(
    url: str,
    model_id: str,
    prompts: Sequence[str],
    *,
    concurrency: int,
    max_tokens: int,
    seed: int,
) -> dict[str, Any]:
    """Stream every prompt once, ``concurrency`` requests in flight; per request the time to
    its first text chunk, its time per output token after that, and its token count."""
    import httpx

    ttft: list[float] = []
    tpot: list[float] = []
    tokens = 0
    errors: list[str] = []
    next_index = 0

    async def one(http: httpx.AsyncClient, i: int) -> None:
        nonlocal tokens
        body = {
            "model": model_id,
            "prompt": prompts[i],
            "max_tokens": max_tokens,
            "temperature": 0.8,
            "seed": seed * 100_003 + i,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        t0 = time.perf_counter()
        first = last = None
        count = None
        done = False
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                errors.append(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    errors.append(f"stream error: {chunk['error'].get('message')}")
                    return
                if chunk.get("usage"):
                    count = int(chunk["usage"]["completion_tokens"])
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    first = now if first is None else first
                    last = now
        if not done or count is None:
            errors.append("stream ended without its usage chunk and [DONE]")
            return
        tokens += count
        if first is not None:
            ttft.append((first - t0) * 1e3)
            if last is not None and count > 1 and last > first:
                tpot.append((last - first) * 1e3 / (count - 1))

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < len(prompts):
            i = next_index
            next_index += 1
            try:
                await one(http, i)
            except httpx.HTTPError as err:
                errors.append(f"{type(err).__name__}: {err}")

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=600.0) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    wall = time.perf_counter() - start
    if errors:
        logger.warning("%d errors; first: %s", len(errors), errors[0])
    return {
        "requests": len(prompts),
        "errors": len(errors),
        "tokens": tokens,
        "wall_s": wall,
        "ttft": ttft,
        "tpot": tpot,
    }


def _combine(parts: Sequence[dict[str, Any]]) -> LevelResult:
    ttft = np.concatenate([np.asarray(p["ttft"], dtype=np.float64) for p in parts])
    tpot = np.concatenate([np.asarray(p["tpot"], dtype=np.float64) for p in parts])
    wall = sum(p["wall_s"] for p in parts)
    tokens = sum(p["tokens"] for p in parts)

    def q(x: np.ndarray, p: float) -> float:
        return float(np.quantile(x, p)) if x.size else float("nan")

    return LevelResult(
        requests=sum(p["requests"] for p in parts),
        errors=sum(p["errors"] for p in parts),
        tokens=tokens,
        wall_s=wall,
        tokens_per_s=tokens / wall if wall > 0 else 0.0,
        ttft_p50_ms=q(ttft, 0.5),
        ttft_p99_ms=q(ttft, 0.99),
        tpot_p50_ms=q(tpot, 0.5),
    )


# what a server imports before it loads a model (tanbr.serve.cli_serve and what it runs)
_SERVER_IMPORTS = (
    "uvicorn",
    "fastapi",
    "tanbr.serve.app",
    "tanbr.serve.replicas",
    "tanbr.serve.openai_api",
    "tanbr.serve.generation",
    "tanbr.backend.hf_lm",
    "tanbr.backend.registry",
    "tanbr.experiment.setup",
    "tanbr.experiment.runner",
)

_RUNTIME_PROBE = """
import importlib, json, sys
from transformers import AutoConfig, MODEL_FOR_CAUSAL_LM_MAPPING
for name in json.loads(sys.argv[1]):
    importlib.import_module(name)
MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(sys.argv[2]))]  # its modeling code
from tanbr.model.lean import return_freed_memory
return_freed_memory()
print(open("/proc/self/status").read())
"""


def runtime_rss(folder: Path) -> int:
    """Resident bytes of a fresh process with a server's imports and ``folder``'s modeling
    code but no model: the runtime's share of a server's resident set."""
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", _RUNTIME_PROBE, json.dumps(_SERVER_IMPORTS), str(folder)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the runtime probe failed: {done.stderr.strip()[-500:]}")
    for line in done.stdout.splitlines():
        key, _, value = line.partition(":")
        if key == "VmRSS":
            return int(value.split()[0]) * 1024  # kB
    raise RuntimeError("the runtime probe printed no VmRSS")


def _settled(url: str, *, timeout: float = 300.0) -> dict[str, Any]:
    """The server's status once no slot boundary is due or running (the last requests of a
    load may have just closed a slot): a resident set read then is the resting service's."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        status: dict[str, Any] = httpx.get(f"{url}/v1/status", timeout=60.0).json()
        if not status.get("boundary_busy", False):
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"the server at {url} was in a slot boundary for {timeout} s")
        time.sleep(0.2)


def _rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in bytes, from ``/proc/<pid>/status``."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024  # kB
    return fields["VmRSS"], fields["VmHWM"]


# --- the command ----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """The generation benchmark (``tanbr bench serve`` when ``--model`` is a causal LM)."""
    import httpx

    levels = tuple(int(c) for c in str(args.levels).split(","))
    if not levels or any(not 1 <= c <= 256 for c in levels):
        raise ValueError(f"--levels must be concurrencies in 1..256, got {args.levels!r}")
    if not 1 <= args.max_tokens <= 512:
        raise ValueError(f"--max-tokens must be in 1..512, got {args.max_tokens}")
    slot_size = args.slot_size if args.slot_size is not None else 16
    if slot_size < 1:
        raise ValueError(f"--slot-size must be >= 1, got {slot_size}")
    folder = model_folder(args.model)
    tmp_root = tempfile.TemporaryDirectory(prefix="tanbr-bench-serve-lm-")
    if args.shape is not None:
        from tanbr.model.presets import get_preset, write_shaped_lm

        print(f"tanbr bench serve: a {args.shape}-shaped model", file=sys.stderr, flush=True)
        folder = write_shaped_lm(
            folder, get_preset(args.shape), Path(tmp_root.name) / "model", seed=args.seed
        )
    per_level = {c: args.requests or max(16, 2 * c) for c in levels}
    prompts = prompts_for(
        folder,
        n=sum(per_level.values()),
        slot_size=slot_size,
        period=args.period,
        seed=args.seed,
    )
    runs = {"merged": args.policy, "full_moe": args.baseline}
    results: dict[str, dict[int, LevelResult]] = {name: {} for name in runs}
    server_figures: dict[str, dict[str, Any]] = {}
    with tmp_root as tmp:
        servers: dict[str, ServerProcess] = {}
        try:
            for name, policy in runs.items():
                (Path(tmp) / name).mkdir()
                print(f"tanbr bench serve: starting a {policy} server", file=sys.stderr, flush=True)
                servers[name] = _server(Path(tmp) / name, folder, policy, slot_size, args)
                servers[name].start(timeout=args.timeout)
            model_id = httpx.get(f"{servers['merged'].url}/v1/models").json()["data"][0]["id"]
            runtime = runtime_rss(folder)
            offset = 0
            for level in levels:
                batch = prompts[offset : offset + per_level[level]]
                offset += per_level[level]
                halves = np.array_split(np.arange(len(batch)), 2)
                parts: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
                for h, idx in enumerate(halves):
                    order = list(runs) if h == 0 else list(runs)[::-1]
                    for name in order:
                        print(
                            f"tanbr bench serve: {runs[name]}, concurrency {level}, part {h + 1}/2",
                            file=sys.stderr,
                            flush=True,
                        )
                        parts[name].append(
                            asyncio.run(
                                _stream_load(
                                    servers[name].url,
                                    model_id,
                                    [batch[i] for i in idx],
                                    concurrency=level,
                                    max_tokens=args.max_tokens,
                                    seed=args.seed,
                                )
                            )
                        )
                for name in runs:
                    results[name][level] = _combine(parts[name])
            for name, server in servers.items():
                status = _settled(server.url, timeout=args.timeout)
                assert server.proc is not None
                rss, peak = _rss(server.proc.pid)
                server_figures[name] = {
                    "policy": runs[name],
                    "rss_bytes": rss,
                    "rss_peak_bytes": peak,
                    "model_rss_bytes": rss - runtime,
                    "merges": int(status["merges"]),
                    "slots": int(status["slot"]) + 1,
                    "policy_updates": int(status["policy_updates"]),
                    "feedback": int(status["feedback"]),
                }
        except BaseException:
            for server in servers.values():
                server.kill()
            raise
        for name, server in servers.items():
            code = server.stop()
            if code not in (0, -signal.SIGTERM):
                logger.warning("the %s server exited with code %d", runs[name], code)
    out = _report(
        results,
        server_figures,
        args=args,
        model_id=model_id,
        slot_size=slot_size,
        runtime_rss=runtime,
    )
    if args.json:
        print(json.dumps(out))
    else:
        _print_table(out, levels)
    return 0 if all(out[name]["errors"] == 0 for name in runs) else 1


def _server(
    folder: Path, model: Path, policy: str, slot_size: int, args: argparse.Namespace
) -> ServerProcess:
    return ServerProcess(
        [
            "--model",
            str(model),
            "--served-model-name",
            args.model if not Path(args.model).is_dir() else model.name,
            "--policy",
            policy,
            "--seed",
            str(args.seed),
            "--slot-size",
            str(slot_size),
            "--threads",
            str(args.threads),
        ],
        state_dir=folder / "state",
        log_path=folder / "server.log",
    )


def _report(
    results: dict[str, dict[int, LevelResult]],
    servers: dict[str, dict[str, Any]],
    *,
    args: argparse.Namespace,
    model_id: str,
    slot_size: int,
    runtime_rss: int,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": model_id,
        "shape": args.shape,
        "runtime_rss_bytes": runtime_rss,
        "max_tokens": args.max_tokens,
        "slot_size": slot_size,
        "threads": args.threads,
    }
    for name, levels in results.items():
        out[name] = {
            **servers[name],
            "errors": sum(r.errors for r in levels.values()),
            "concurrency": {
                str(c): {k: _round(v) for k, v in vars(r).items()} for c, r in levels.items()
            },
        }
    merged, full = results["merged"], results["full_moe"]
    ratios: dict[str, float | None] = {}
    for c in merged:
        a, b = merged[c].tpot_p50_ms, full[c].tpot_p50_ms
        ratios[f"tpot_c{c}"] = round(a / b, 3) if b > 0 else None
        ta, tb = merged[c].tokens_per_s, full[c].tokens_per_s
        ratios[f"tokens_per_s_c{c}"] = round(ta / tb, 3) if tb > 0 else None
    rss_ratio = round(servers["merged"]["rss_bytes"] / servers["full_moe"]["rss_bytes"], 3)
    ratios["rss"] = rss_ratio
    full_model = servers["full_moe"]["model_rss_bytes"]
    ratios["model_rss"] = (
        round(servers["merged"]["model_rss_bytes"] / full_model, 3) if full_model > 0 else None
    )
    out["ratios"] = ratios
    met: dict[str, bool] = {"errors": out["merged"]["errors"] == 0 == out["full_moe"]["errors"]}
    for c in (1, 8):
        value = ratios.get(f"tpot_c{c}")
        if value is not None:
            met[f"tpot_c{c}"] = value <= TARGETS["tpot_ratio"]
    met["rss"] = rss_ratio <= TARGETS["rss_ratio"]
    out["targets"] = {**TARGETS, "met": met}
    return out


def _round(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


def _print_table(out: dict[str, Any], levels: Sequence[int]) -> None:
    header = ["run", "concurrency", *LEVEL_FIGURES]
    rows = []
    for name in ("merged", "full_moe"):
        for c in levels:
            figures = out[name]["concurrency"][str(c)]
            rows.append([name, str(c), *(str(figures[f]) for f in LEVEL_FIGURES)])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    print()
    for name in ("merged", "full_moe"):
        s = out[name]
        print(
            f"{name}: policy {s['policy']}, rss {s['rss_bytes'] / 2**20:.1f} MiB (peak"
            f" {s['rss_peak_bytes'] / 2**20:.1f}; the model's share"
            f" {s['model_rss_bytes'] / 2**20:.1f}), errors {s['errors']}, merges {s['merges']},"
            f" policy updates {s['policy_updates']}"
        )
    runtime = out["runtime_rss_bytes"] / 2**20
    print(f"runtime alone (the server's imports, no model): {runtime:.1f} MiB")
    print(f"merged / full MoE: {out['ratios']}; targets met: {out['targets']['met']}")
