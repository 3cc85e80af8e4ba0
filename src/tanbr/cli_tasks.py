"""``tanbr tasks check FILE`` and ``tanbr tasks example OUT``: a user's task file, by hand.

One module serves both sub-subcommands; :func:`add_arguments` tells them apart by the parser's
name (``tanbr tasks check`` / ``tanbr tasks example``), as ``tanbr.cli`` builds one parser per
entry of its ``COMMANDS`` table. Only the standard library is imported here at top level.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tanbr.tasks import TaskFile

ACTIONS: tuple[str, ...] = ("check", "example")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``tasks check`` or ``tasks example``, whichever ``parser`` is."""
    action = parser.prog.rsplit(" ", 1)[-1]
    if action not in ACTIONS:
        raise ValueError(f"tanbr.cli_tasks serves {ACTIONS}, not {parser.prog!r}")
    parser.set_defaults(tasks_action=action)
    if action == "check":
        parser.add_argument("file", help="task file: JSONL, CSV or a JSON array of objects")
        parser.add_argument(
            "--min-per-task", type=int, default=12, help="examples a task needs (default 12)"
        )
        parser.add_argument(
            "--min-per-label", type=int, default=2, help="examples a label needs (default 2)"
        )
    else:
        parser.add_argument("out", help="file to write (.jsonl, .csv or .json picks the format)")
        parser.add_argument(
            "--per-task", type=int, default=300, help="examples per task (default 300)"
        )
        parser.add_argument("--seed", type=int, default=0, help="which examples (default 0)")


def summary(tf: TaskFile) -> str:
    """A few lines about a checked task file: kind, tasks, examples and labels per task."""
    counts = tf.counts()
    repeated = f", {tf.dropped_duplicates} repeated texts dropped" if tf.dropped_duplicates else ""
    lines = [f"{tf.path}: {tf.kind}, {len(tf.tasks)} tasks, {len(tf.examples)} examples{repeated}"]
    width = max(len(t) for t in tf.tasks)
    for task in tf.tasks:
        n = sum(counts[task].values())
        if tf.kind == "classification":
            labels = ", ".join(f"{label} {k}" for label, k in counts[task].items())
            detail = f"{len(counts[task])} labels: {labels}"
        else:
            targets = sum(1 for e in tf.examples if e.task == task and e.target is not None)
            detail = f"{targets} with a target"
        lines.append(f"  {task:<{width}}  {n:>6} examples  {detail}")
    lines.append(f"digest {tf.digest()[:16]}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Check or write a task file; a bad file is one line on stderr and exit code 2."""
    from tanbr.tasks import example_task_file, read_task_file

    try:
        if args.tasks_action == "check":
            tf = read_task_file(
                args.file, min_per_task=args.min_per_task, min_per_label=args.min_per_label
            )
        else:
            tf = example_task_file(args.out, per_task=args.per_task, seed=args.seed)
    except (ValueError, FileNotFoundError) as err:
        print(f"tanbr: error: {err}", file=sys.stderr)
        return 2
    print(summary(tf))
    if args.tasks_action == "example":
        print(f"wrote {tf.path}")
    return 0
