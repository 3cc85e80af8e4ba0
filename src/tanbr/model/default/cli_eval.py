"""``tanbr eval-model``: accuracy of the default model and of its merges, and the latency gain."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--variant",
        default="default",
        help="which default-model build to evaluate (built if missing)",
    )
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="a model folder instead: one written by build-model, or a Hugging Face MoE"
        " checkpoint of your own (then with --tasks)",
    )
    parser.add_argument("--tasks", metavar="FILE", help="your task file, for --model PATH")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument(
        "--candidates",
        type=int,
        default=24,
        help="Dirichlet samples searched for best_static, besides uniform/frequency/task merges",
    )
    parser.add_argument("--repeats", type=int, default=15, help="timed repeats per latency median")
    parser.add_argument("--seed", type=int, default=0, help="seed of the search and latency batch")
    parser.add_argument(
        "--routing",
        action="store_true",
        help="also report how often the gates recognise each request's task (explains the "
        "gap between the full MoE and the task-tag oracle)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "auto"),  # model.precision.DTYPES, without importing torch
        help="serving precision of the latency runs (auto: bfloat16 where the CPU has fast "
        "kernels, as the demo serves); accuracies are always measured in float32",
    )


def _routing_table(routing: dict[str, Any]) -> list[str]:
    rows = [["gate of block", "routes home (test)"]]
    rows += [[name, f"{acc:.3f}"] for name, acc in routing["task_id_accuracy"].items()]

    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    return [
        "routing: how often the tag-free gate picks the home expert of the request's task",
        _table(rows),
        f"full MoE accuracy on requests the last gate routes home: "
        f"{fmt(routing['full_moe_routed_home'])} "
        f"({routing['share_routed_home']:.1%} of the requests), "
        f"elsewhere: {fmt(routing['full_moe_routed_away'])}",
        f"task told from the text alone (linear probe on the frozen encoder): "
        f"{routing['text_task_id_probe']:.3f}",
        "",
    ]


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_report(report: dict[str, Any]) -> str:
    """The report as plain-text tables."""
    from tanbr.model.default.evaluate import METHODS

    rows = [["task", *METHODS]]
    for task, row in report["tasks"].items():
        rows.append([task, *(f"{row[m]:.3f}" for m in METHODS)])
    rows.append(["mean", *(f"{report['mean'][m]:.3f}" for m in METHODS)])
    out = ["accuracy on the test splits", _table(rows), ""]
    tasks = list(report["cross_merge"])
    cross = [["merge of \\ on", *tasks]]
    for a in tasks:
        cross.append([a, *(f"{report['cross_merge'][a][b]:.3f}" for b in tasks)])
    out += ["cross-merge accuracy (row: whose merge; column: evaluated task)", _table(cross), ""]
    dtype = report["latency"].get("dtype", "float32")
    lat = [
        [
            f"latency, batch 32, {dtype} (median ms)",
            "full MoE",
            "merged",
            "ratio",
            "paired ratio",
        ]
    ]
    for key in ("end_to_end", "moe_layers"):
        row = report["latency"][key]
        full, merged = row["full_ms"], row["merged_ms"]
        ratios = [f"{merged / full:.2f}", f"{row['paired_ratio']:.2f}"]
        lat.append([key, f"{full:.1f}", f"{merged:.1f}", *ratios])
    out += [_table(lat)]
    if "routing" in report:
        out += ["", *_routing_table(report["routing"])]
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    from tanbr.model.default.build import VARIANTS, build_default_model
    from tanbr.model.default.evaluate import EvalSettings, evaluate_model

    if args.variant not in VARIANTS:
        raise ValueError(f"--variant must be one of {sorted(VARIANTS)}, got {args.variant!r}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    settings = EvalSettings(
        n_candidates=args.candidates,
        latency_repeats=args.repeats,
        seed=args.seed,
        latency_dtype=args.dtype,
        routing=args.routing,
    )
    if args.model:
        from pathlib import Path

        from tanbr.backend.registry import BackendSpec, DefaultLoader, choose_loader

        folder = Path(args.model).expanduser().resolve()
        if not isinstance(choose_loader(folder), DefaultLoader):
            return _run_backend(args, BackendSpec(path=str(folder), tasks=args.tasks or "",
                                                  dtype=args.dtype, lean=True))  # fmt: skip
        path = folder
    else:
        path = build_default_model(args.variant, progress=True)
    report = evaluate_model(path, settings, progress=True, task_file=args.tasks or "")
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _run_backend(args: argparse.Namespace, spec: Any) -> int:
    """A checkpoint of the user's own, through the backend seam."""
    from tanbr.experiment.evaluate import BackendEval, evaluate_backend

    if not spec.tasks:
        raise ValueError(f"{spec.path} is not a build-model folder: give your task file (--tasks)")
    report = evaluate_backend(spec, BackendEval(repeats=args.repeats))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    methods = ("full_moe", "uniform", "frequency", "own_merge")
    rows = [["task", *methods]]
    rows += [[t, *(f"{r[m]:.3f}" for m in methods)] for t, r in report["tasks"].items()]
    rows.append(["mean", *(f"{report['mean'][m]:.3f}" for m in methods)])
    lat = report["latency"]
    print(f"{report['metric']} on the test split of the task file")
    print(_table(rows))
    print(
        f"\nlatency, batch {int(lat['batch_size'])} end to end: full {lat['full_ms']:.1f} ms,"
        f" merged {lat['merged_ms']:.1f} ms (paired ratio {lat['paired_ratio']:.2f})"
    )
    return 0
