"""``tanbr compare [CONFIG] [--preset demo]``: Tanbr and the baselines side by side.

Ends with the comparison table and the path of the report folder; ``--json`` prints exactly
``{"policies": {NAME: {"accuracy", "regret", "latency_p50_ms", "latency_p95_ms",
"memory_bytes", "merge_ms"}}, "estimator_tv": ...}``.
"""

from __future__ import annotations

import argparse

from tanbr.experiment.cli_common import add_experiment_arguments, execute_from_args, print_result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_experiment_arguments(parser, config_required=False)


def run(args: argparse.Namespace) -> int:
    if args.config is None and args.preset is None:
        args.preset = "demo"
    result = execute_from_args(args, list(args.overrides))
    print_result(result, as_json=args.json)
    return 0
