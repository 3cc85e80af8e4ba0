"""What ``tanbr run`` and ``tanbr compare`` share: arguments, building the setup, printing.

Imports only the standard library at top level (the command line stays instant).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_experiment_arguments(parser: argparse.ArgumentParser, *, config_required: bool) -> None:
    parser.add_argument(
        "config",
        nargs=None if config_required else "?",
        help="experiment config (TOML)" + ("" if config_required else "; or use --preset"),
    )
    if not config_required:
        parser.add_argument("--preset", help="a config from configs/ by name, e.g. demo")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set policy.tanbr.rho=0.7 (repeatable)",
    )
    parser.add_argument(
        "--model",
        metavar="PATH",
        help="a model folder (a Hugging Face MoE checkpoint, or one written by build-model), or"
        " a default-model variant name; the same as --set model.path=PATH",
    )
    parser.add_argument(
        "--tasks",
        metavar="FILE",
        help="your task file (JSONL, CSV or JSON array: text, task, and label or target); the"
        " same as --set model.tasks=FILE",
    )
    parser.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="where the (policy, seed) runs go: local processes (evaluation.workers) or a Ray"
        " cluster, one model copy per actor (needs tanbr[ray])",
    )
    parser.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="a running Ray cluster to join (e.g. ray://head:10001); default: start a local Ray"
        " with this machine's cores",
    )
    parser.add_argument("--out", default="runs", help="folder for run folders (default: runs/)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def _progress(enabled: bool) -> Any:
    from tqdm.auto import tqdm

    def make(desc: str, total: int, unit: str = "slot") -> Any:
        return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled)

    return make


def model_overrides(args: argparse.Namespace) -> list[str]:
    """``--model`` and ``--tasks`` as config overrides (a folder, or a variant name)."""
    out = []
    model = getattr(args, "model", None)
    if model:
        path = Path(model).expanduser()
        if path.is_dir():
            out.append(f"model.path={json.dumps(str(path.resolve()))}")
        elif "/" in model or model.startswith("."):
            raise FileNotFoundError(f"model folder not found: {model}")
        else:
            out += [f"model.variant={json.dumps(model)}", 'model.path=""']
    tasks = getattr(args, "tasks", None)
    if tasks:
        path = Path(tasks).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"task file not found: {tasks}")
        out.append(f"model.tasks={json.dumps(str(path.resolve()))}")
    return out


def execute_from_args(args: argparse.Namespace, overrides: list[str]) -> Any:
    """Load the config, build the backend and setup, run everything; returns the RunResult."""
    import logging
    import time

    import torch

    started = time.perf_counter()
    from tanbr.backend.registry import BackendSpec
    from tanbr.experiment.config import load_config
    from tanbr.experiment.runner import execute
    from tanbr.experiment.setup import prepare

    on_ray = getattr(args, "executor", "local") == "ray"
    if getattr(args, "ray_address", None) and not on_ray:
        raise ValueError("--ray-address needs --executor ray")
    if on_ray:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ValueError("--executor ray needs Ray: pip install 'tanbr[ray]'")
    overrides = [*model_overrides(args), *overrides]
    config = load_config(args.config, preset=getattr(args, "preset", None), overrides=overrides)
    quiet = logging.getLogger().getEffectiveLevel() > logging.INFO
    torch.set_num_threads(config.model.threads)
    factory = BackendSpec.from_config(config).resolved(progress=not quiet)  # builds lm variants
    backend, calib, test = factory.load(progress=not quiet)
    progress = _progress(not quiet)
    setup = prepare(config, backend, calib, test, progress=progress)
    # worker processes merge from experts held in memory: the same arithmetic as a lean
    # merge (bit-identical weights), faster; the probes time lean merges in this process
    worker_factory = factory.replace(lean=False)
    executor = None
    if on_ray:
        from tanbr.experiment.ray_executor import RayExecutor

        executor = RayExecutor(
            backend_factory=worker_factory,
            address=args.ray_address,
            actors=config.evaluation.workers if config.evaluation.workers > 1 else 0,
        )
    return execute(
        setup,
        out=Path(args.out),
        progress=progress,
        plots=not args.no_plots,
        workers=config.evaluation.workers,
        backend_factory=worker_factory,
        executor=executor,
        started=started,
    )


def print_result(result: Any, *, as_json: bool) -> None:
    """The comparison table and the run folder, or exactly the public JSON on stdout."""
    from tanbr.experiment.report import format_table, format_targets
    from tanbr.experiment.summary import public_summary

    if as_json:
        print(json.dumps(public_summary(result.summary), indent=2))
        print(f"run folder: {result.folder}", file=sys.stderr)
        return
    print(format_table(result.summary))
    targets = format_targets(result.summary)
    if targets:
        print("\ntargets (tanbr):\n" + targets)
    print(f"\nreport: {result.folder / 'report.md'}")
    print(f"run folder: {result.folder}")
