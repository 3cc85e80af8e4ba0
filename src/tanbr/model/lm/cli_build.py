"""``tanbr build-model --variant lm`` (or ``lm-tiny``): build or reuse the MoE language model
and print what its build measured (``build.json`` and ``evaluation.json`` of the folder)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any


def figures(path: Any, variant: str, seconds: float) -> dict[str, Any]:
    """The build's figures: timings, sizes, per-domain losses, merges and specialisation (the
    per-block usage vectors stay in ``evaluation.json``)."""
    from tanbr.model.lm.build import BUILD_FILE, EVALUATION_FILE

    info = json.loads((path / BUILD_FILE).read_text())
    evaluation = json.loads((path / EVALUATION_FILE).read_text())
    return {
        "path": str(path),
        "variant": variant,
        "seconds": round(seconds, 2),
        "family": info["family"],
        "parameters": info["parameters"],
        "active_parameters": info["active_parameters"],
        "domains": info["domains"],
        "build": info["build"],
        "loss": evaluation["loss"],
        "perplexity": evaluation["perplexity"],
        "gap": evaluation["gap"],
        "cross": evaluation["cross"],
        "specialisation": {
            "tv": evaluation["specialisation"]["tv"],
            "summary": evaluation["specialisation"]["summary"],
        },
        "max_own_gap": evaluation["max_own_gap"],
        "needs_adaptation": evaluation["needs_adaptation"],
    }


def run(args: argparse.Namespace) -> int:
    from tanbr.model.lm.build import VARIANTS, build_lm

    if args.variant not in VARIANTS:
        raise ValueError(f"--variant must be one of {sorted(VARIANTS)}, got {args.variant!r}")
    if getattr(args, "tasks", None):
        raise ValueError(
            f"--tasks does not apply to --variant {args.variant}: the language model is trained "
            "on its packaged domains and writes its own task file (tasks.jsonl)"
        )
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    path = build_lm(args.variant, progress=True)
    out = figures(path, args.variant, time.perf_counter() - started)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    build = out["build"]
    print(path)
    print(
        f"variant {args.variant}: a {out['parameters'] / 1e6:.2f}M-parameter {out['family']} "
        f"on {len(out['domains'])} domains; built in {build['total_s']:.1f} s (training "
        f"{build['train_s']:.1f} s, {build['threads']} threads); this call took "
        f"{out['seconds']:.1f} s"
    )
    print(f"{'domain':<22}{'full':>8}{'uniform':>9}{'own':>8}{'best':>8}  best merge")
    loss = out["loss"]
    for domain in out["domains"]:
        print(
            f"{domain:<22}{loss['full'][domain]:>8.3f}{loss['uniform'][domain]:>9.3f}"
            f"{loss['own'][domain]:>8.3f}{loss['best'][domain]['loss']:>8.3f}  "
            f"{loss['best'][domain]['merge']}"
        )
    print(
        f"largest loss increase of a domain's own merge: {100 * out['max_own_gap']:.1f}% "
        f"({'above' if out['needs_adaptation'] else 'within'} the 15% threshold)"
    )
    print("expert usage:", out["specialisation"]["summary"])
    return 0
