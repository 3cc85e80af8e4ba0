"""``tanbr build-model``: build (or reuse from the cache) the embedded default model."""

from __future__ import annotations

import argparse
import json
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--variant",
        default="default",
        help="which build: 'default' (the real model: gate-routed and task-routed training"
        " steps in turn), 'task-routed' (both passes every step; ~1.8x the training),"
        " 'gate-routed' (the routing loss alone; experts that share more), 'deep' (every"
        " layer an MoE block: experts that dominate the cost, less accurate) or 'tiny'"
        " (seconds, for tests); 'lm' or 'lm-tiny' build the MoE language model instead"
        " (tanbr.model.lm; see docs/lm.md)",
    )
    parser.add_argument(
        "--tasks",
        metavar="FILE",
        help="build on your own classification tasks: a JSONL, CSV or JSON-array file with"
        " text, task and label (see 'tanbr tasks check FILE'); the variant gives the recipe",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")


LM_VARIANTS = ("lm", "lm-tiny")


def run(args: argparse.Namespace) -> int:
    if args.variant in LM_VARIANTS:
        from tanbr.model.lm.cli_build import run as run_lm

        return run_lm(args)
    from tanbr.model.default.build import (
        VARIANTS,
        build_default_model,
        build_from_spec,
        spec_for_task_file,
    )

    if args.variant not in VARIANTS:
        raise ValueError(f"--variant must be one of {sorted(VARIANTS)}, got {args.variant!r}")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    if args.tasks:
        spec = spec_for_task_file(args.variant, args.tasks)
        path = build_from_spec(spec, variant=f"{args.variant}+tasks", progress=True)
    else:
        path = build_default_model(args.variant, progress=True)
    seconds = time.perf_counter() - started
    info = json.loads((path / "tasks.json").read_text())
    if args.json:
        out = {
            "path": str(path),
            "variant": args.variant,
            "seconds": round(seconds, 2),
            "tasks": info["tasks"],
            "n_labels": len(info["labels"]),
            "build": info["build"],
        }
        print(json.dumps(out, indent=2))
    else:
        build = info["build"]
        print(path)
        print(
            f"variant {args.variant}: {len(info['tasks'])} tasks, {len(info['labels'])} labels; "
            f"built in {build['total_s']:.1f} s (lower states {build['lower_states_s']:.1f} s, "
            f"training {build['train_s']:.1f} s), calibration accuracy "
            f"{build['calib_accuracy']:.3f}; this call took {seconds:.1f} s"
        )
    return 0
