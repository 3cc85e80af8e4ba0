"""``tanbr report RUN_DIR...``: the comparison table of run folders (and optionally redraw
their plots)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders")
    parser.add_argument("--json", action="store_true", help="print the summaries as JSON")
    parser.add_argument("--plots", action="store_true", help="redraw the PNG plots")
    parser.add_argument("--out", help="also write a Markdown report to this file")


def run(args: argparse.Namespace) -> int:
    from tanbr.experiment.report import format_table, format_targets, load_summary, write_report
    from tanbr.experiment.summary import public_summary

    summaries = {str(Path(d)): load_summary(d) for d in args.run_dirs}
    if args.plots:
        from tanbr.experiment.plots import plot_run

        for folder in summaries:
            plot_run(Path(folder))
    if args.out:
        write_report(list(summaries), Path(args.out))
    if args.json:
        out = {folder: public_summary(s) for folder, s in summaries.items()}
        print(json.dumps(next(iter(out.values())) if len(out) == 1 else out, indent=2))
        return 0
    for i, (folder, summary) in enumerate(summaries.items()):
        if i:
            print()
        print(f"== {folder}")
        print(format_table(summary))
        targets = format_targets(summary)
        if targets:
            print("\ntargets (tanbr):\n" + targets)
    return 0
