"""``tanbr adapt --model PATH --tasks FILE``: tune a checkpoint's normalisation layers (only)
under random merges from the policies' action space, so that its merges lose less
(:mod:`tanbr.model.adapt`); writes a checkpoint folder that ``--model`` loads, and
``adapt.json`` with the per-task losses before and after."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, metavar="PATH", help="a checkpoint folder, or lm / lm-tiny"
    )
    parser.add_argument(
        "--tasks",
        metavar="FILE",
        help="an lm task file (text, task, target); default: the folder's tasks.jsonl",
    )
    parser.add_argument("--steps", type=int, default=200, help="gradient steps (default 200)")
    parser.add_argument("--batch-size", type=int, default=16, help="training rows per step")
    parser.add_argument("--lr", type=float, default=5e-3, help="learning rate (AdamW)")
    parser.add_argument("--resample", type=int, default=2, help="steps per drawn merge plan")
    parser.add_argument(
        "--full-share", type=float, default=0.0, help="share of plans that are the full MoE"
    )
    parser.add_argument("--eval-rows", type=int, default=60, help="served rows per task scored")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--out", metavar="FOLDER", help="output folder (default: <model>-adapted beside it)"
    )
    parser.add_argument("--json", action="store_true", help="print adapt.json's figures")


def _model_folder(model: str) -> Path:
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    from tanbr.model.lm.build import VARIANTS, build_lm

    if model in VARIANTS:
        return build_lm(model, progress=True)
    raise FileNotFoundError(f"model folder not found: {model}")


def _table(data: dict[str, object]) -> str:
    before, after = data["before"], data["after"]
    assert isinstance(before, dict) and isinstance(after, dict)
    kinds = ("full", "own", "sampled", "usage_all", "uniform")
    head = "task".ljust(22) + "".join(f"{k:>20}" for k in kinds)
    lines = [head, "(loss before -> after, nats per token)"]
    for task in before["full"]:
        cells = [f"{before[k][task]:8.3f} -> {after[k][task]:6.3f}" for k in kinds]
        lines.append(task.ljust(22) + "".join(f"{c:>20}" for c in cells))
    lines.append(
        f"training rows, sampled merges: {before['train_sampled']:.3f} -> "
        f"{after['train_sampled']:.3f}"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm.auto import tqdm

    from tanbr.model.adapt import ADAPT_FILE, AdaptSettings, adapt

    torch.set_num_threads(max(1, args.threads))
    folder = _model_folder(args.model)
    tasks = Path(args.tasks) if args.tasks else folder / "tasks.jsonl"
    if not tasks.is_file():
        raise FileNotFoundError(f"task file not found: {tasks} (give --tasks)")
    out = Path(args.out) if args.out else folder.parent / f"{folder.name}-adapted"
    settings = AdaptSettings(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        resample=args.resample,
        full_share=args.full_share,
        eval_rows=args.eval_rows,
        seed=args.seed,
    )
    with tqdm(total=settings.steps, desc="adapt", unit="step", file=sys.stderr) as bar:
        result = adapt(folder, tasks, out, settings=settings, progress=lambda _: bar.update(1))
    data = json.loads((Path(result.folder) / ADAPT_FILE).read_text())
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(_table(data))
        print(f"\nadapted checkpoint: {result.folder} ({result.seconds:.0f} s)")
    return 0
