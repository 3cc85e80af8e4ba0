"""``tanbr bench merge``: latency and memory of the full MoE against the merged model.

For a Mixtral-style preset with random weights (saved once as a checkpoint folder in the cache)
it measures, per batch shape:

* ``latency_full_ms`` / ``latency_merged_ms``: medians of forward passes over the batch of
  prompts as ``generate`` runs them (prefill: logits of the last position only), full and
  merged interleaved in one process; the full model runs real top-k dispatch with the fastest
  experts implementation of this CPU (``eager`` or ``grouped_mm`` timed per shape; never
  ``batched_mm``, which gathers one weight matrix per token).
  ``latency_*_all_logits_ms`` are the same with logits at every position, where the
  vocabulary projection, which merging does not shrink, weighs more;
* ``params_full_bytes`` / ``params_merged_bytes``: tensor bytes resident in the normal model
  and in the memory-lean merged model;
* ``rss_full_bytes`` / ``rss_merged_bytes``: resident set size of a fresh process that loads the
  checkpoint (normally, or lean and merged) and runs that batch (``anon_rss_*``: its private
  part, without file-backed pages such as the mapped checkpoint);
* ``merge_ms``: median in-memory re-merge; ``lean_merge_ms``: median memory-lean re-merge from
  the safetensors; ``memcpy_ms``: median time to copy as many bytes as a merge reads, the
  memory-bandwidth floor of a merge;
* ``grouped``: the same latencies (timed in the same interleaved loop) and the resident tensor
  bytes of the lean model for m = 1 and every m of ``--groups`` merged experts per block
  (contiguous groups of experts, the coefficients of the m = 1 plan split over them, each
  token routed to ``--group-top-k`` of them).

``--dtype`` sets the precision of the checkpoint (written once per dtype) and of every model
loaded from it, so that a memory-lean merge reads the bytes a deployment in that precision
would read; ``auto`` is the serving precision of this CPU (bfloat16 where it is fast).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Any

REQUIRED_KEYS = (
    "batch",
    "latency_full_ms",
    "latency_merged_ms",
    "params_full_bytes",
    "params_merged_bytes",
    "rss_full_bytes",
    "rss_merged_bytes",
    "merge_ms",
    "memcpy_ms",
)
_IMPLEMENTATIONS = ("grouped_mm", "eager")  # batched_mm is never used on CPU


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        default="medium",
        choices=["tiny", "small", "medium", "large"],
        help="model size (default: medium = hidden 512, intermediate 1408, 6 layers, 8 experts)",
    )
    parser.add_argument(
        "--batches",
        default="1x32,8x128",
        help="comma-separated batch shapes BATCHxLENGTH (default: 1x32,8x128)",
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per measure")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "auto"],
        help="precision of the checkpoint and the models (auto: this CPU's serving precision)",
    )
    parser.add_argument(
        "--groups",
        default="2,3",
        help="comma-separated m > 1: also time grouped merges with m merged experts per block",
    )
    parser.add_argument(
        "--group-top-k", type=int, default=1, help="merged experts per token in grouped merges"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, inputs and plans")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--no-rss", action="store_true", help="skip the fresh-process RSS runs")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON list")


def parse_batches(text: str) -> list[tuple[int, int]]:
    """``"1x32,8x128"`` -> [(1, 32), (8, 128)]; ValueError naming a bad entry."""
    shapes = []
    for part in text.split(","):
        try:
            b, t = (int(x) for x in part.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"--batches entries must look like 8x128, got {part!r}") from None
        if b < 1 or t < 1:
            raise ValueError(f"--batches entries must be positive, got {part!r}")
        shapes.append((b, t))
    if not shapes:
        raise ValueError("--batches is empty")
    return shapes


def parse_groups(text: str) -> list[int]:
    """``"2,3"`` -> [2, 3]; ``""`` -> []; ValueError naming a bad entry (m must be > 1)."""
    out = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            m = int(part)
        except ValueError:
            raise ValueError(f"--groups entries must be integers, got {part!r}") from None
        if m < 2:
            raise ValueError(f"--groups entries must be > 1 (m = 1 is always timed), got {m}")
        out.append(m)
    return sorted(set(out))


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.group_top_k < 1:
        raise ValueError(f"--group-top-k must be >= 1, got {args.group_top_k}")
    shapes = parse_batches(args.batches)
    groups = parse_groups(args.groups)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # one bar: ours
    rows = bench_merge(
        args.preset,
        shapes,
        repeats=args.repeats,
        seed=args.seed,
        threads=args.threads,
        rss=not args.no_rss,
        dtype=args.dtype,
        groups=groups,
        group_top_k=args.group_top_k,
    )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        first = rows[0]
        print(
            f"preset {first['preset']}, {first['dtype']}, {first['threads']} torch thread(s), "
            f"medians of {first['repeats']} repeats"
        )
        print(format_table(rows))
        print()
        print(format_grouped_table(rows))
    return 0


def bench_merge(
    preset_name: str,
    shapes: list[tuple[int, int]],
    *,
    repeats: int,
    seed: int,
    threads: int = 0,
    rss: bool = True,
    dtype: str = "float32",
    groups: list[int] | None = None,
    group_top_k: int = 1,
) -> list[dict[str, Any]]:
    """Measure every batch shape; one row (a dict of :data:`REQUIRED_KEYS` and more) each."""
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _bench_merge(
            preset_name,
            shapes,
            repeats=repeats,
            seed=seed,
            threads=threads,
            rss=rss,
            dtype=dtype,
            groups=[] if groups is None else groups,
            group_top_k=group_top_k,
        )
    finally:
        torch.set_num_threads(previous)


def _bench_merge(
    preset_name: str,
    shapes: list[tuple[int, int]],
    *,
    repeats: int,
    seed: int,
    threads: int,
    rss: bool,
    dtype: str,
    groups: list[int],
    group_top_k: int,
) -> list[dict[str, Any]]:
    import numpy as np
    import torch
    from tqdm import tqdm

    from tanbr.model.checkpoint import load_checkpoint
    from tanbr.model.precision import serving_dtype
    from tanbr.model.presets import get_preset

    preset = get_preset(preset_name)
    torch_dtype = serving_dtype(dtype)
    folder = bench_checkpoint(preset_name, seed, torch_dtype)
    n_steps = len(shapes) * (3 if rss else 1) + 2
    bar = tqdm(total=n_steps, desc=f"bench merge {preset_name}", file=sys.stderr)
    loaded = load_checkpoint(folder, dtype=torch_dtype, group_top_k=group_top_k)
    model, merger = loaded.model, loaded.merger
    plans = _plans(merger.blocks, repeats + 1, seed)
    grouped_plans = {m: _grouped(plans[0], merger.blocks, m) for m in groups}
    params_full = merger.resident_bytes()
    variants = {"merged": merger.prepare(plans[0])}
    variants |= {f"m{m}": merger.prepare(p) for m, p in grouped_plans.items()}
    generator = torch.Generator().manual_seed(seed)
    timed: dict[tuple[int, int], dict[str, Any]] = {}
    for b, t in shapes:
        ids = torch.randint(0, preset.vocab_size, (b, t), generator=generator)
        impl = _fastest_implementation(model, merger, ids)
        times: dict[str, list[float]] = {}
        with torch.inference_mode():
            for prepared in variants.values():
                merger.commit(prepared)
                _forward(model, ids)  # warm every merged path
            for _ in range(repeats):  # all variants alternate, so all see the same machine
                for logits in ("last", "all"):
                    merger.restore()
                    times.setdefault(f"full_{logits}", []).append(
                        _timed_forward(model, ids, logits)
                    )
                    for name, prepared in variants.items():
                        merger.commit(prepared)
                        times.setdefault(f"{name}_{logits}", []).append(
                            _timed_forward(model, ids, logits)
                        )
        merger.restore()
        timed[(b, t)] = {k: float(np.median(v)) for k, v in times.items()} | {"impl": impl}
        bar.update()

    # --- merge cost against the memory-copy floor ---
    merger.commit(variants["merged"])
    merge_ms, copy_ms = [], []
    stats = merger.apply(plans[1])
    memcpy = _memcpy_timer(stats.bytes_read)
    for plan in plans[1:]:  # interleaved, so that both see the same machine
        merge_ms.append(merger.apply(plan).merge_ms)
        copy_ms.append(memcpy())
    del memcpy
    merger.restore()
    del variants
    bar.update()

    lean = load_checkpoint(folder, lean=True, dtype=torch_dtype, group_top_k=group_top_k)
    lean.merger.apply(plans[0])
    lean_ms = [lean.merger.apply(plan).merge_ms for plan in plans[1:]]
    params_merged = lean.merger.resident_bytes()
    params_grouped = {1: params_merged}
    for m, plan in grouped_plans.items():
        lean.merger.apply(plan)  # only the m merged experts of each block are resident
        params_grouped[m] = lean.merger.resident_bytes()
    del lean
    bar.update()

    rows = []
    for b, t in shapes:
        rss_full = rss_merged = peak_full = peak_merged = anon_full = anon_merged = None
        if rss:
            impl = timed[(b, t)]["impl"]
            full = _rss_child(folder, "full", b, t, seed, threads, impl, plans[0], dtype)
            bar.update()
            merged = _rss_child(folder, "merged", b, t, seed, threads, impl, plans[0], dtype)
            bar.update()
            rss_full, peak_full = full["rss_bytes"], full["peak_rss_bytes"]
            rss_merged, peak_merged = merged["rss_bytes"], merged["peak_rss_bytes"]
            anon_full, anon_merged = full["anon_rss_bytes"], merged["anon_rss_bytes"]
        shape = timed[(b, t)]
        row = {
            "batch": f"{b}x{t}",
            "latency_full_ms": round(shape["full_last"], 3),
            "latency_merged_ms": round(shape["merged_last"], 3),
            "latency_full_all_logits_ms": round(shape["full_all"], 3),
            "latency_merged_all_logits_ms": round(shape["merged_all"], 3),
            "params_full_bytes": params_full,
            "params_merged_bytes": params_merged,
            "rss_full_bytes": rss_full,
            "rss_merged_bytes": rss_merged,
            "merge_ms": round(float(np.median(merge_ms)), 3),
            "memcpy_ms": round(float(np.median(copy_ms)), 3),
            "lean_merge_ms": round(float(np.median(lean_ms)), 3),
            "peak_rss_full_bytes": peak_full,
            "peak_rss_merged_bytes": peak_merged,
            "anon_rss_full_bytes": anon_full,
            "anon_rss_merged_bytes": anon_merged,
            "experts_implementation": shape["impl"],
            "preset": preset_name,
            "dtype": str(torch_dtype).removeprefix("torch."),
            "repeats": repeats,
            "threads": torch.get_num_threads(),
            "group_top_k": group_top_k,
            "grouped": [
                _grouped_row(m, shape, "merged" if m == 1 else f"m{m}", params_grouped[m])
                | {"params_full_bytes": params_full}
                for m in [1, *groups]
            ],
        }
        for g in row["grouped"]:
            g.update(
                latency_ratio=round(g["latency_ms"] / row["latency_full_ms"], 4),
                latency_all_logits_ratio=round(
                    g["latency_all_logits_ms"] / row["latency_full_all_logits_ms"], 4
                ),
                params_ratio=round(g["params_bytes"] / params_full, 4),
            )
            del g["params_full_bytes"]
        rows.append(row | _ratios(row))
    bar.close()
    return rows


def _grouped_row(m: int, shape: dict[str, Any], name: str, params: int) -> dict[str, Any]:
    return {
        "m": m,
        "latency_ms": round(shape[f"{name}_last"], 3),
        "latency_all_logits_ms": round(shape[f"{name}_all"], 3),
        "params_bytes": params,
    }


def _ratios(row: dict[str, Any]) -> dict[str, float | None]:
    def ratio(a: str, b: str) -> float | None:
        x, y = row[a], row[b]
        return round(x / y, 4) if x is not None and y else None

    return {
        "latency_ratio": ratio("latency_merged_ms", "latency_full_ms"),
        "latency_all_logits_ratio": ratio(
            "latency_merged_all_logits_ms", "latency_full_all_logits_ms"
        ),
        "params_ratio": ratio("params_merged_bytes", "params_full_bytes"),
        "rss_ratio": ratio("rss_merged_bytes", "rss_full_bytes"),
        "anon_rss_ratio": ratio("anon_rss_merged_bytes", "anon_rss_full_bytes"),
        "merge_vs_memcpy": ratio("merge_ms", "memcpy_ms"),
        "lean_merge_vs_memcpy": ratio("lean_merge_ms", "memcpy_ms"),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table (MiB for memory)."""

    def mib(x: int | None) -> str:
        return "-" if x is None else f"{x / 2**20:.1f}"

    def num(x: float | None, fmt: str = ".2f") -> str:
        return "-" if x is None else format(x, fmt)

    head = [
        "batch",
        "full ms",
        "merged ms",
        "x",
        "x all logits",
        "params MiB full/merged",
        "x",
        "RSS MiB full/merged",
        "x",
        "merge ms",
        "memcpy ms",
        "lean ms",
        "experts impl",
    ]
    body = [
        [
            r["batch"],
            num(r["latency_full_ms"], ".1f"),
            num(r["latency_merged_ms"], ".1f"),
            num(r["latency_ratio"]),
            num(r["latency_all_logits_ratio"]),
            f"{mib(r['params_full_bytes'])}/{mib(r['params_merged_bytes'])}",
            num(r["params_ratio"]),
            f"{mib(r['rss_full_bytes'])}/{mib(r['rss_merged_bytes'])}",
            num(r["rss_ratio"]),
            num(r["merge_ms"], ".1f"),
            num(r["memcpy_ms"], ".1f"),
            num(r["lean_merge_ms"], ".1f"),
            r["experts_implementation"],
        ]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    lines = [
        "  ".join(str(x).rjust(w) for x, w in zip(line, widths, strict=True))
        for line in [head, *body]
    ]
    return "\n".join(lines)


def format_grouped_table(rows: list[dict[str, Any]]) -> str:
    """Full MoE beside m = 1, 2, ... merged experts per block: latency and resident params."""
    head = ["batch", "model", "ms", "x full", "x all logits", "params MiB", "x full"]
    body = []
    for r in rows:
        mib = r["params_full_bytes"] / 2**20
        body.append([r["batch"], "full MoE", f"{r['latency_full_ms']:.1f}", "1.00", "1.00"])
        body[-1] += [f"{mib:.1f}", "1.00"]
        for g in r.get("grouped", []):
            name = f"m={g['m']}" + (f", top-{r['group_top_k']}" if g["m"] > 1 else "")
            body.append([r["batch"], name, f"{g['latency_ms']:.1f}", f"{g['latency_ratio']:.2f}"])
            body[-1] += [f"{g['latency_all_logits_ratio']:.2f}"]
            body[-1] += [f"{g['params_bytes'] / 2**20:.1f}", f"{g['params_ratio']:.2f}"]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body, strict=True)]
    return "\n".join(
        "  ".join(str(x).rjust(w) for x, w in zip(line, widths, strict=True))
        for line in [head, *body]
    )


# --- helpers (heavy imports inside) -------------------------------------------------------------


def bench_checkpoint(preset_name: str, seed: int, dtype: Any = None) -> Any:
    """The preset's checkpoint folder in the cache, written by ``save_pretrained`` once per
    dtype (float32 by default)."""
    import shutil
    import tempfile
    from pathlib import Path

    import torch
    import transformers

    from tanbr.cache import cache_dir
    from tanbr.model.presets import build_bench_model, get_preset

    preset = get_preset(preset_name)
    dtype = torch.float32 if dtype is None else dtype
    parts: list[Any] = [preset, seed, torch.__version__, transformers.__version__]
    if dtype != torch.float32:  # float32 folders keep the key they always had
        parts.append(str(dtype))
    folder = cache_dir("bench-model", *parts)
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        build_bench_model(preset, seed=seed).to(dtype).save_pretrained(tmp)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _plans(blocks: Any, n: int, seed: int) -> list[dict[str, Any]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [{b.name: rng.dirichlet(np.ones(b.n_experts)) for b in blocks} for _ in range(n)]


def _grouped(plan: dict[str, Any], blocks: Any, m: int) -> dict[str, Any]:
    """``plan`` split over m groups of consecutive experts in every block."""
    import numpy as np

    from tanbr.model.coeffs import group_coeffs

    if any(m > b.n_experts for b in blocks):
        raise ValueError(f"--groups: m = {m} is more than a block's {blocks[0].n_experts} experts")
    out = {}
    for b in blocks:
        groups = [list(g) for g in np.array_split(np.arange(b.n_experts), m)]
        out[b.name] = group_coeffs(plan[b.name], groups, block=b.name)
    return out


def _forward(model: Any, ids: Any, logits: str = "last") -> None:
    """One forward pass over a batch of prompts.

    ``"last"`` computes the logits of the last position only, as ``generate`` does when it
    reads a prompt (prefill); ``"all"`` computes them at every position.
    """
    model(input_ids=ids, use_cache=False, logits_to_keep=1 if logits == "last" else 0)


def _timed(fn: Any) -> float:
    import time

    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _memcpy_timer(n_bytes: int) -> Any:
    """A function timing one copy of ``n_bytes`` between two buffers already paged in."""
    import torch

    src = torch.ones(max(1, n_bytes // 4), dtype=torch.float32)
    dst = torch.zeros_like(src)
    return lambda: _timed(lambda: dst.copy_(src))


def _timed_forward(model: Any, ids: Any, logits: str = "last") -> float:
    return _timed(lambda: _forward(model, ids, logits))


def _fastest_implementation(model: Any, merger: Any, ids: Any) -> str:
    """Time the full model with each CPU experts implementation; keep the fastest."""
    import numpy as np
    import torch

    if not hasattr(model, "set_experts_implementation"):
        return "module"
    merger.restore()
    best, best_ms = _IMPLEMENTATIONS[0], float("inf")
    with torch.inference_mode():
        for impl in _IMPLEMENTATIONS:
            try:
                model.set_experts_implementation(impl)
                _forward(model, ids)
            except (KeyError, ValueError, RuntimeError, NotImplementedError):
                continue
            ms = float(np.median([_timed_forward(model, ids) for _ in range(3)]))
            if ms < best_ms:
                best, best_ms = impl, ms
    model.set_experts_implementation(best)
    return best


def _rss_child(
    folder: Any,
    mode: str,
    b: int,
    t: int,
    seed: int,
    threads: int,
    impl: str,
    plan: Any,
    dtype: str = "float32",
) -> dict[str, int]:
    """Run one mode in a fresh interpreter and read back its RSS."""
    spec = {
        "dtype": dtype,
        "folder": str(folder),
        "mode": mode,
        "batch": [b, t],
        "seed": seed,
        "threads": threads,
        "impl": impl,
        "plan": {k: [float(x) for x in v] for k, v in plan.items()},
    }
    proc = subprocess.run(
        [sys.executable, "-m", "tanbr.model.bench", "--rss-child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"RSS measurement ({mode}, {b}x{t}) failed:\n{proc.stderr[-2000:]}")
    result: dict[str, int] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _rss_child_main(spec_text: str) -> int:
    """Inside the fresh process: load, (merge,) run the batch twice, report VmRSS and peak."""
    import gc

    import torch

    from tanbr.model.checkpoint import load_checkpoint
    from tanbr.model.precision import serving_dtype

    spec = json.loads(spec_text)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    lean = spec["mode"] == "merged"
    loaded = load_checkpoint(spec["folder"], lean=lean, dtype=serving_dtype(spec["dtype"]))
    if lean:
        loaded.merger.apply(spec["plan"])
    elif hasattr(loaded.model, "set_experts_implementation"):
        getattr(loaded.model, "set_experts_implementation")(spec["impl"])  # noqa: B009
    b, t = spec["batch"]
    vocab = int(loaded.config.vocab_size)
    ids = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(spec["seed"]))
    with torch.inference_mode():
        for _ in range(2):
            _forward(loaded.model, ids)
    gc.collect()
    status = _proc_status()
    # VmHWM, not ru_maxrss: the latter keeps the parent's peak across fork + exec
    report = {"rss_bytes": status["VmRSS"], "peak_rss_bytes": status["VmHWM"]}
    print(json.dumps(report | {"anon_rss_bytes": status.get("RssAnon", 0)}))
    return 0


def _proc_status() -> dict[str, int]:
    """Memory figures of this process from /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon"):
                out[key] = int(value.split()[0]) * 1024
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--rss-child":
        raise SystemExit(_rss_child_main(sys.argv[2]))
    raise SystemExit(
        "usage: python -m tanbr.model.bench --rss-child SPEC (use `tanbr bench merge`)"
    )
