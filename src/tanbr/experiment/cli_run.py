"""``tanbr run CONFIG``: run the config's policies (or the ones named) and write a run folder."""

from __future__ import annotations

import argparse

from tanbr.experiment.cli_common import add_experiment_arguments, execute_from_args, print_result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_experiment_arguments(parser, config_required=True)
    parser.add_argument(
        "--policy",
        action="append",
        default=[],
        help="run only this policy (repeatable); default: the config's policies",
    )
    parser.add_argument(
        "--seed", type=int, action="append", default=[], help="run only this seed (repeatable)"
    )


def run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.policy:
        overrides.append("policies=[" + ", ".join(repr(p) for p in args.policy) + "]")
    if args.seed:
        overrides.append("seeds=[" + ", ".join(str(s) for s in args.seed) + "]")
    result = execute_from_args(args, overrides)
    print_result(result, as_json=args.json)
    return 0
