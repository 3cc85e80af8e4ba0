"""``tanbr bench policy``: regret of every policy on the synthetic surfaces, and decision time.

For each surface family and each dimension K of ``--dims`` (K experts and K task types;
contexts from ``--schedule``), every policy runs ``--seeds`` seeded runs of ``--slots`` slots,
learning from per-type feedback (``--feedback per-type``, the default) or from the slot reward
alone (``--feedback scalar``). Reported per (surface, policy): the mean and standard deviation
over seeds of the cumulative regret after ``--at`` slots, the log-log slope of the mean
cumulative regret between slot 200 and the last slot (0.5 for ``sqrt(T)`` growth, 1 for
linear), and the median select time over the last 10% of the slots (the median over seeds).
Surfaces are keyed ``FAMILY-K`` (``bump-8``).

Seeds and families: by default the reporting seeds 0, 1, ... and the reporting families (with
the held-out ones); ``--tuning`` switches to the tuning seeds 100, 101, ... and the tuning
families, where defaults are chosen (see :mod:`tanbr.bandit.surfaces`).

``tanbr@absolute`` is Tanbr forced onto the absolute chart, ``tanbr@no-explore`` Tanbr
without forced exploration, ``tanbr@shared-fit`` Tanbr fitting every output to a slot reward
(not their mix-weighted sum), ``tanbr@action`` Tanbr's network fed the action alone (no
square-root features) and ``tanbr@scalar`` Tanbr with its former scalar reward model
(transparency rows, :data:`VARIANTS`). ``nucb@sqrt``, ``nucb-anchored@sqrt`` and
``tanbr-paper@sqrt`` give those baselines Tanbr's network input (fairness rows).

Timing runs each of ``--timing-policies`` alone for ``--timing-slots`` slots with K of
``--timing-dims`` experts and ``min(K, --timing-types)`` task types (the paper: 8 types, 8 to
192 experts), without an oracle, and reports select/update wall times over the last 10% of
the slots, where the trees and histories are largest.

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
    "tanbr-paper",
    "nucb",
    "nucb-anchored",
    "neural-grid",
    "neural-grid-anchored",
    "hoo",
    "linucb-grid",
    "egreedy-grid",
    "plug-in",
    "fixed",
    "random",
)
TIMING_POLICIES = ("tanbr", "tanbr-paper")
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
    parser.add_argument(
        "--tuning", action="store_true",
        help="tuning seeds (100, 101, ...) and tuning families instead of the reporting ones",
    )  # fmt: skip
    parser.add_argument("--families", type=_csv, default=None, help="default: see --tuning")
    parser.add_argument("--policies", type=_csv, default=list(DEFAULT_POLICIES))
    parser.add_argument("--schedule", default="stationary", help="task-mix schedule")
    parser.add_argument("--feedback", default="per-type", help="per-type or scalar")
    parser.add_argument("--timing-slots", type=int, default=3000, help="0 skips timing")
    parser.add_argument("--timing-dims", type=int, nargs="+", default=[8, 64],
                        help="K (experts) of the timing runs")  # fmt: skip
    parser.add_argument("--timing-types", type=int, default=8, help="V of the timing runs")
    parser.add_argument("--timing-policies", type=_csv, default=list(TIMING_POLICIES))
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")


#: Transparency rows: Tanbr with one of its choices undone.
VARIANTS: dict[str, dict[str, Any]] = {
    "relative": {"chart": "relative"},
    "absolute": {"chart": "absolute"},
    # no forced exploration: the width and the cell term alone explore
    "no-explore": {"explore": 0.0},
    # the action alone as the network's input, without its square-root features
    "action": {"encoding": "action"},
    # from a slot reward alone, every output fitted to it (the former rule), not their sum
    "shared-fit": {"slot_fit": "shared"},
    # the former defaults: one scalar from (context, action) with offset inputs and the prior
    # mean -3 |a - x|^2, gamma = 0.1 at lam = 1, nu = 0.25, up to 2048 leaves, 8 visits
    "scalar": dict(
        head="scalar",
        encoding="offset",
        prior=3.0,
        train_steps=8,
        gamma=0.1,
        lam=1.0,
        nu=0.25,
        max_leaves=2048,
        split_visits=8,
        explore=0.0,
    ),
}
#: Fairness rows: the per-type baselines given Tanbr's network input (``nucb-anchored@sqrt``).
BASELINE_VARIANTS: dict[str, dict[str, Any]] = {"sqrt": {"encoding": "sqrt"}}
BASELINES_WITH_VARIANTS = ("nucb", "nucb-anchored", "tanbr-paper")


def _policy_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"tanbr@absolute"`` -> ``("tanbr", {"chart": "absolute"})``; plain names unchanged."""
    name, _, variant = spec.partition("@")
    if not variant:
        return name, {}
    if name == "tanbr" and variant in VARIANTS:
        return name, dict(VARIANTS[variant])
    if name in BASELINES_WITH_VARIANTS and variant in BASELINE_VARIANTS:
        return name, dict(BASELINE_VARIANTS[variant])
    known = [f"tanbr@{v}" for v in VARIANTS]
    known += [f"{b}@{v}" for b in BASELINES_WITH_VARIANTS for v in BASELINE_VARIANTS]
    raise ValueError(f"unknown policy variant {spec!r}: only {', '.join(known)} exist")


Job = tuple[str, str, int, int, int, str, str]


def _one_run(job: Job) -> tuple[list[float], float]:
    """Cumulative regret and select p50 (ms, last 10% of slots) of one seeded run (a worker:
    picklable arguments and result)."""
    import numpy as np

    from tanbr.bandit.simulate import run_policy
    from tanbr.bandit.surfaces import Surface

    family, spec, dim, slots, seed, schedule, feedback = job
    name, params = _policy_spec(spec)
    trace = run_policy(name, Surface(family=family, dim=dim), n_slots=slots, seed=seed,
                       schedule=schedule, policy_params=params, feedback=feedback)  # fmt: skip
    tail = trace.select_ms[slots - max(1, slots // 10) :]
    return [float(v) for v in trace.cumulative], float(np.median(tail))


def _timing(spec: str, dim: int, types: int, slots: int, on_slot: Any) -> dict[str, Any]:
    """Select and update wall times of one policy with ``dim`` experts and ``types`` types."""
    import numpy as np

    from tanbr.bandit import Simplex, make_policy
    from tanbr.bandit.simulate import simulate
    from tanbr.bandit.surfaces import Surface, make_mixes

    rng = np.random.default_rng(0)
    name, params = _policy_spec(spec)
    policy = make_policy(name, space=Simplex(dim), context_dim=types,
                         rng=np.random.default_rng(1), **params)  # fmt: skip
    mixes = make_mixes("stationary", dim=types, n_slots=slots, rng=rng)
    surface = Surface(family="bump", dim=dim, types=types)
    trace = simulate(policy, surface, mixes, rng=rng, oracle=False, on_slot=on_slot)
    tail = slice(slots - max(1, slots // 10), slots)
    return {
        "policy": spec,
        "experts": dim,
        "types": types,
        "slots": slots,
        "select_ms_p50": round(float(np.median(trace.select_ms[tail])), 3),
        "select_ms_p99": round(float(np.percentile(trace.select_ms[tail], 99)), 3),
        "update_ms_p50": round(float(np.median(trace.update_ms[tail])), 3),
        "leaves": int(getattr(policy, "n_leaves", 0)),
    }


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from tanbr.bandit import POLICIES
    from tanbr.bandit.simulate import FEEDBACKS, loglog_slope
    from tanbr.bandit.surfaces import (
        FAMILIES,
        REPORT_FAMILIES,
        REPORT_SEEDS,
        SCHEDULES,
        TUNING_FAMILIES,
        TUNING_SEEDS,
        Surface,
    )

    for spec in [*args.policies, *args.timing_policies]:
        name, _ = _policy_spec(spec)
        if name not in POLICIES:
            raise ValueError(f"unknown policy {name!r}; choose from {sorted(POLICIES)}")
    families = args.families or list(TUNING_FAMILIES if args.tuning else REPORT_FAMILIES)
    for family in families:
        if family not in FAMILIES:
            raise ValueError(f"unknown surface family {family!r}; choose from {FAMILIES}")
    if args.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {args.schedule!r}; choose from {sorted(SCHEDULES)}")
    if args.feedback not in FEEDBACKS:
        raise ValueError(f"--feedback must be one of {FEEDBACKS}, got {args.feedback!r}")
    for dim in args.dims:
        if not 2 <= dim <= 16:
            raise ValueError(f"--dims must be in [2, 16], got {dim}")
    for dim in args.timing_dims:
        if not 2 <= dim <= 512:
            raise ValueError(f"--timing-dims must be in [2, 512], got {dim}")
    if args.timing_types < 2:
        raise ValueError(f"--timing-types must be >= 2, got {args.timing_types}")
    dims = list(dict.fromkeys(args.dims))  # in order, without repeats
    first = (TUNING_SEEDS if args.tuning else REPORT_SEEDS)[0]
    seeds = list(range(first, first + args.seeds))
    if args.slots <= SLOPE_START:
        raise ValueError(f"--slots must be > {SLOPE_START} to measure a slope, got {args.slots}")
    if not 1 <= args.at <= args.slots:
        raise ValueError(f"--at must be in [1, --slots], got {args.at}")
    if args.seeds < 1 or args.jobs < 1 or args.timing_slots < 0:
        raise ValueError("--seeds and --jobs must be >= 1 and --timing-slots >= 0")

    jobs: list[Job] = [
        (family, policy, dim, args.slots, seed, args.schedule, args.feedback)
        for dim in dims
        for family in families
        for policy in args.policies
        for seed in seeds
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
    for i in range(0, len(jobs), len(seeds)):
        family, policy, dim = jobs[i][:3]
        cum = np.asarray([c for c, _ in curves[i : i + len(seeds)]])  # (seeds, slots)
        select = [t for _, t in curves[i : i + len(seeds)]]
        mean = cum.mean(axis=0)
        key = Surface(family=family, dim=dim).name
        surfaces.setdefault(key, {})[policy] = {
            "regret_mean": round(float(mean[args.at - 1]), 2),
            "regret_std": round(float(cum[:, args.at - 1].std()), 2),
            "slope": round(loglog_slope(mean, start=SLOPE_START), 3),
            "select_ms_p50": round(float(np.median(select)), 3),
        }

    timing: list[dict[str, Any]] = []
    if args.timing_slots:
        runs = [(p, d) for d in dict.fromkeys(args.timing_dims) for p in args.timing_policies]
        total = args.timing_slots * len(runs)
        with tqdm(total=total, desc="timing", file=sys.stderr, unit="slot") as bar:
            for spec, dim in runs:
                types = min(dim, args.timing_types)
                timing.append(_timing(spec, dim, types, args.timing_slots, lambda _t: bar.update()))

    result = {
        "surfaces": surfaces,
        "timing": timing,
        "settings": {
            "dims": dims,
            "families": families,
            "seeds": seeds,
            "slots": args.slots,
            "at": args.at,
            "schedule": args.schedule,
            "feedback": args.feedback,
            "slope_between": [SLOPE_START, args.slots],
            "held_out": [f for f in families if f not in TUNING_FAMILIES],
        },
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(_table(result))
    return 0


def _table(result: dict[str, Any]) -> str:
    s = result["settings"]
    seeds = s["seeds"]
    lines = [
        f"cumulative regret at T={s['at']} (mean ± std over seeds {seeds[0]}..{seeds[-1]}), "
        f"log-log slope T={s['slope_between'][0]}..{s['slope_between'][1]}, select p50 (ms), "
        f"schedule {s['schedule']}, {s['feedback']} feedback; held out: "
        f"{', '.join(s['held_out']) or 'none'}",
    ]
    for surface, rows in result["surfaces"].items():
        lines.append("")
        lines.append(f"{surface:<24}{'regret':>18}{'slope':>8}{'select':>9}")
        best = min(r["regret_mean"] for r in rows.values())
        for policy, r in sorted(rows.items(), key=lambda kv: kv[1]["regret_mean"]):
            mark = " *" if r["regret_mean"] == best else ""
            regret = f"{r['regret_mean']:.1f} ± {r['regret_std']:.1f}"
            lines.append(
                f"  {policy:<22}{regret:>18}{r['slope']:>8.3f}{r['select_ms_p50']:>9.3f}{mark}"
            )
    for t in result["timing"]:
        lines.append(
            f"timing {t['policy']} ({t['experts']} experts, {t['types']} types, {t['slots']} "
            f"slots): select p50 {t['select_ms_p50']:.3f} ms, p99 {t['select_ms_p99']:.3f} ms; "
            f"update p50 {t['update_ms_p50']:.2f} ms; {t['leaves']} leaves"
        )
    return "\n".join(lines)
