"""``tanbr bench policy``: regret of every policy on the synthetic surfaces, and Tanbr's speed.

For each surface family and each dimension K of ``--dims`` (contexts from ``--schedule``), every
policy runs
``--seeds`` seeded runs of ``--slots`` slots. Reported per (surface, policy): the mean and
standard deviation over seeds of the cumulative regret after ``--at`` slots, and the log-log
slope of the mean cumulative regret between slot 200 and the last slot (0.5 for ``sqrt(T)``
growth, 1 for linear). Surfaces are keyed ``FAMILY-K`` (``bump-8``). A policy named
``tanbr@absolute`` is Tanbr forced onto the absolute chart (a transparency row; the baselines
always act on the absolute simplex). Timing runs Tanbr alone for ``--timing-slots`` slots on the
bump surface in ``--timing-dim`` dimensions and reports select/update wall times over the last
10% of the slots, where the tree and the history are largest.

Prints one JSON document with ``--json``, otherwise a table. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import Any

DEFAULT_POLICIES = (
    "tanbr",
    "neural-grid",
    "hoo",
    "linucb-grid",
    "egreedy-grid",
    "plug-in",
    "fixed",
    "random",
)
DEFAULT_FAMILIES = ("bump", "multimodal", "ridge")
SLOPE_START = 200


def _csv(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--dims", "--dim", dest="dims", type=int, nargs="+", default=[4],
        help="K, the number of task types; several values run every one (e.g. 2 4 6 8)",
    )  # fmt: skip
    parser.add_argument("--slots", type=int, default=2000, help="slots per run")
    parser.add_argument("--at", type=int, default=1000, help="report cumulative regret here")
    parser.add_argument("--seeds", type=int, default=5, help="seeded runs per cell")
    parser.add_argument("--families", type=_csv, default=list(DEFAULT_FAMILIES))
    parser.add_argument("--policies", type=_csv, default=list(DEFAULT_POLICIES))
    parser.add_argument("--schedule", default="stationary", help="task-mix schedule")
    parser.add_argument("--timing-slots", type=int, default=5000, help="0 skips timing")
    parser.add_argument("--timing-dim", type=int, default=4, help="K of the timing run")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")


def _policy_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"tanbr@absolute"`` -> ``("tanbr", {"chart": "absolute"})``; plain names unchanged."""
    name, _, chart = spec.partition("@")
    if not chart:
        return name, {}
    if name != "tanbr" or chart not in ("relative", "absolute"):
        raise ValueError(
            f"unknown policy variant {spec!r}: only tanbr@relative and tanbr@absolute exist"
        )
    return name, {"chart": chart}


def _one_run(job: tuple[str, str, int, int, int, str]) -> list[float]:
    """Cumulative regret of one seeded run (a worker: picklable arguments and result)."""
    from tanbr.bandit.simulate import run_policy
    from tanbr.bandit.surfaces import Surface

    family, spec, dim, slots, seed, schedule = job
    name, params = _policy_spec(spec)
    trace = run_policy(name, Surface(family=family, dim=dim), n_slots=slots, seed=seed,
                       schedule=schedule, policy_params=params)  # fmt: skip
    return [float(v) for v in trace.cumulative]


def _timing(dim: int, slots: int, on_slot: Any) -> dict[str, Any]:
    import numpy as np

    from tanbr.bandit import Simplex, Tanbr
    from tanbr.bandit.simulate import simulate
    from tanbr.bandit.surfaces import Surface, make_mixes

    rng = np.random.default_rng(0)
    policy = Tanbr(space=Simplex(dim), context_dim=dim, rng=np.random.default_rng(1))
    mixes = make_mixes("stationary", dim=dim, n_slots=slots, rng=rng)
    trace = simulate(policy, Surface(family="bump", dim=dim), mixes, rng=rng, on_slot=on_slot)
    tail = slice(slots - max(1, slots // 10), slots)
    return {
        "slots": slots,
        "select_ms_p50": round(float(np.median(trace.select_ms[tail])), 3),
        "select_ms_p99": round(float(np.percentile(trace.select_ms[tail], 99)), 3),
        "update_ms_p50": round(float(np.median(trace.update_ms[tail])), 3),
        "leaves": policy.n_leaves,
    }


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from tanbr.bandit import POLICIES
    from tanbr.bandit.simulate import loglog_slope
    from tanbr.bandit.surfaces import FAMILIES, SCHEDULES, Surface

    for spec in args.policies:
        name, _ = _policy_spec(spec)
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; choose from {sorted(POLICIES)}")
    for family in args.families:
        if family not in FAMILIES:
            raise ValueError(f"unknown surface family {family!r}; choose from {FAMILIES}")
    if args.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {args.schedule!r}; choose from {sorted(SCHEDULES)}")
    for dim in [*args.dims, args.timing_dim]:
        if not 2 <= dim <= 16:
            raise ValueError(f"--dims and --timing-dim must be in [2, 16], got {dim}")
    dims = list(dict.fromkeys(args.dims))  # in order, without repeats
    if args.slots <= SLOPE_START:
        raise ValueError(f"--slots must be > {SLOPE_START} to measure a slope, got {args.slots}")
    if not 1 <= args.at <= args.slots:
        raise ValueError(f"--at must be in [1, --slots], got {args.at}")
    if args.seeds < 1 or args.jobs < 1 or args.timing_slots < 0:
        raise ValueError("--seeds and --jobs must be >= 1 and --timing-slots >= 0")

    jobs = [
        (family, policy, dim, args.slots, seed, args.schedule)
        for dim in dims
        for family in args.families
        for policy in args.policies
        for seed in range(args.seeds)
    ]
    with tqdm(total=len(jobs), desc="policy runs", file=sys.stderr, unit="run") as bar:
        if args.jobs == 1:
            curves = []
            for job in jobs:
                curves.append(_one_run(job))
                bar.update()
        else:
            with ProcessPoolExecutor(max_workers=args.jobs) as pool:
                curves = []
                for curve in pool.map(_one_run, jobs):
                    curves.append(curve)
                    bar.update()

    surfaces: dict[str, dict[str, dict[str, float]]] = {}
    for i in range(0, len(jobs), args.seeds):
        family, policy, dim = jobs[i][:3]
        cum = np.asarray(curves[i : i + args.seeds])  # (seeds, slots)
        mean = cum.mean(axis=0)
        key = Surface(family=family, dim=dim).name
        surfaces.setdefault(key, {})[policy] = {
            "regret_mean": round(float(mean[args.at - 1]), 2),
            "regret_std": round(float(cum[:, args.at - 1].std()), 2),
            "slope": round(loglog_slope(mean, start=SLOPE_START), 3),
        }

    timing: dict[str, Any] = {}
    if args.timing_slots:
        with tqdm(total=args.timing_slots, desc="timing", file=sys.stderr, unit="slot") as bar:
            timing = _timing(args.timing_dim, args.timing_slots, lambda _t: bar.update())

    result = {
        "surfaces": surfaces,
        "timing": timing,
        "settings": {
            "dims": dims,
            "timing_dim": args.timing_dim,
            "slots": args.slots,
            "at": args.at,
            "seeds": args.seeds,
            "schedule": args.schedule,
            "slope_between": [SLOPE_START, args.slots],
        },
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(_table(result))
    return 0


def _table(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"cumulative regret at T={s['at']} (mean ± std over {s['seeds']} seeds), "
        f"log-log slope T={s['slope_between'][0]}..{s['slope_between'][1]}, "
        f"schedule {s['schedule']}",
    ]
    for surface, rows in result["surfaces"].items():
        lines.append("")
        lines.append(f"{surface:<16}{'regret':>18}{'slope':>8}")
        best = min(r["regret_mean"] for r in rows.values())
        for policy, r in sorted(rows.items(), key=lambda kv: kv[1]["regret_mean"]):
            mark = " *" if r["regret_mean"] == best else ""
            regret = f"{r['regret_mean']:.1f} ± {r['regret_std']:.1f}"
            lines.append(f"  {policy:<14}{regret:>18}{r['slope']:>8.3f}{mark}")
    t = result["timing"]
    if t:
        lines.append("")
        lines.append(
            f"tanbr timing at {t['slots']} slots (K={s['timing_dim']}): select p50 "
            f"{t['select_ms_p50']:.2f} ms, p99 {t['select_ms_p99']:.2f} ms; update p50 "
            f"{t['update_ms_p50']:.2f} ms; {t['leaves']} leaves"
        )
    return "\n".join(lines)
