"""The ``tanbr`` command line.

Every subcommand lives in the world it belongs to, as a module exposing
``add_arguments(parser)`` and ``run(args) -> int``. Those modules import only the standard
library at top level so that ``tanbr --help`` stays instant; heavy imports happen in ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

# name -> (module, help). Nested names ("bench merge") become sub-subcommands.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("tanbr.experiment.cli_run", "run one policy (or several) on a config"),
    "compare": ("tanbr.experiment.cli_compare", "compare Tanbr with the baselines side by side"),
    "report": ("tanbr.experiment.cli_report", "summarise run folders as tables"),
    "build-model": ("tanbr.model.default.cli_build", "build (or reuse) the embedded default model"),
    "eval-model": ("tanbr.model.default.cli_eval", "evaluate the default model and its merges"),
    "adapt": ("tanbr.model.cli_adapt", "tune a checkpoint's norm layers so its merges lose less"),
    "serve": ("tanbr.serve.cli_serve", "serve a model over HTTP, merging per slot"),
    "tasks check": ("tanbr.cli_tasks", "check a task file and summarise it"),
    "tasks example": ("tanbr.cli_tasks", "write an example task file of four real tasks"),
    "bench merge": ("tanbr.model.bench", "latency and memory: full MoE vs merged"),
    "bench policy": ("tanbr.bandit.bench", "regret and timing of the policies"),
    "bench serve": ("tanbr.serve.bench", "load-test the HTTP service"),
}


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; only the module of the command named in ``argv`` is imported."""
    wanted = {a for a in argv if not a.startswith("-")}
    parser = argparse.ArgumentParser(prog="tanbr", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction[argparse.ArgumentParser]] = {}
    for name, (module_name, help_text) in COMMANDS.items():
        head, _, tail = name.partition(" ")
        if tail:
            if head not in groups:
                group = sub.add_parser(head, help=f"{head} commands")
                groups[head] = group.add_subparsers(dest=f"{head}_command", required=True)
            cmd = groups[head].add_parser(tail, help=help_text, description=help_text)
        else:
            cmd = sub.add_parser(name, help=help_text, description=help_text)
        if head in wanted and (not tail or tail in wanted):
            importlib.import_module(module_name).add_arguments(cmd)
        cmd.set_defaults(_module=module_name)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code so tests can call it in process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose > 1 else logging.INFO)
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    module = importlib.import_module(args._module)
    try:
        code: int = module.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as err:  # user errors: one clear line, no traceback
        print(f"tanbr: error: {err}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    raise SystemExit(main())
