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
    lat = [["latency, batch 32 (median ms)", "full MoE", "merged", "ratio"]]
    for key in ("end_to_end", "moe_layers"):
        full, merged = report["latency"][key]["full_ms"], report["latency"][key]["merged_ms"]
        lat.append([key, f"{full:.1f}", f"{merged:.1f}", f"{merged / full:.2f}"])
    out += [_table(lat)]
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
        n_candidates=args.candidates, latency_repeats=args.repeats, seed=args.seed
    )
    path = build_default_model(args.variant, progress=True)
    report = evaluate_model(path, settings, progress=True)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0
