"""Measure the estimator meeting a new task on the default model (six real tasks).

For each task in turn: the task is held out of calibration (types by k-means on the full MoE's
``gates+head`` of the other five tasks' calibration requests, read out from ``input0``), the
demo's drift stream runs over the six tasks with the held-out one absent before slot 100 and
at 25% of every slot from then on, and the read-out estimator runs with and without novelty
detection (head 64 of slots of 128, as in the demo). Also runs every seed with no new task
(no task held out) to count false new types and compare the TV with detection off.

    TANBR_CACHE=... HF_HUB_OFFLINE=1 python scripts/new_task.py --seeds 0 1 2

Prints one JSON object (per-run figures and means). Profiles are not learned here (that needs
the loop's gate passes; tests/experiment/test_new_task.py covers them).
"""

from __future__ import annotations

import argparse
import json
import logging

import numpy as np

from tanbr.backend.default import default_backend
from tanbr.backend.requests import Requests
from tanbr.experiment.estimator import ClusterEstimator, ReadoutEstimator, match_clusters
from tanbr.experiment.novelty import NoveltyDetector
from tanbr.experiment.values import SlotEvaluator
from tanbr.experiment.workload import drift, introduce_task

AT, N_SLOTS, SLOT, HEAD, SHARE = 100, 200, 128, 64, 0.25


def run(data: dict[str, np.ndarray], held: int | None, seed: int, novelty: bool) -> dict:
    xc, xt, rich, tc, tt = (data[k] for k in ("xc", "xt", "rich", "tc", "tt"))
    keep = tc != held if held is not None else np.ones(len(tc), bool)
    rng = np.random.default_rng(0)
    typer = ClusterEstimator(rng=rng, n_types=None).fit(rich[keep])
    types = typer.assign(rich[keep])
    est = ReadoutEstimator(novelty=NoveltyDetector() if novelty else None).fit(xc[keep], types)
    kept = np.unique(tc[keep])
    renum = np.searchsorted(kept, tc[keep])
    mapping = kept[match_clusters(types, renum, est.n_types, len(kept))]
    evaluator = SlotEvaluator(mapping, 6)
    srng = np.random.default_rng([seed, 1])
    mixes = drift(n_slots=N_SLOTS, n_tasks=6, rng=srng)
    if held is not None:
        mixes = introduce_task(mixes, held, at=AT, share=SHARE)
    pools = [np.flatnonzero(tt == k) for k in range(6)]
    tv, sizes = [], []
    for t in range(N_SLOTS):
        counts = srng.multinomial(SLOT, mixes[t])
        idx = np.concatenate(
            [srng.choice(pools[k], c, replace=False) for k, c in enumerate(counts)]
        )
        srng.shuffle(idx)
        true = np.bincount(tt[idx], minlength=6) / SLOT
        mix = est.estimate(xt[idx[:HEAD]])
        tv.append(0.5 * float(np.abs(evaluator.tasks_mix(mix) - true).sum()))
        sizes.append(len(mix))
        est.observe(xt[idx])
        if est.n_new:
            evaluator.count_new(est.assign(xt[idx]), tt[idx].tolist(), est.n_types)
    opened = [t for t in range(1, N_SLOTS) if sizes[t] > sizes[t - 1]]
    return {
        "held": None if held is None else int(held),
        "seed": seed,
        "novelty": novelty,
        "K": est.n_types,
        "opened_at": opened,
        "tv": tv,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    backend, calib, test = default_backend(variant="default", signature="input0", memo=True)
    data = {
        "xc": backend.features(Requests(calib.texts, calib.rows), "input0"),
        "xt": backend.features(Requests(test.texts, test.rows), "input0"),
        "rich": backend.features(Requests(calib.texts, calib.rows), "gates+head"),
        "tc": calib.tasks, "tt": test.tasks,
    }  # fmt: skip
    rows = []
    for seed in args.seeds:
        for held in [*range(6), None]:
            for novelty in (False, True):
                r = run(data, held, seed, novelty)
                tv = np.asarray(r.pop("tv"))
                first = r["opened_at"][0] if r["opened_at"] else None
                r["tv_before"] = float(tv[AT - 50 : AT].mean())
                r["tv_after_5"] = float(tv[AT : AT + 5].mean())
                settle = (first if first is not None and first >= AT else AT) + 5
                r["tv_settled"] = float(tv[settle:].mean())
                r["tv_all"] = float(tv.mean())
                r["slots_to_detect"] = None if first is None else first - AT
                rows.append(r)
                print(json.dumps(r), flush=True)

    def mean(key: str, **match: object) -> float:
        vals = [r[key] for r in rows if all(r[k] == v for k, v in match.items())]
        return float(np.mean(vals))

    new = [r for r in rows if r["held"] is not None and r["novelty"]]
    summary = {
        "tv_before": mean("tv_before", novelty=True),
        "tv_after_5_plain": float(
            np.mean([r["tv_after_5"] for r in rows if r["held"] is not None and not r["novelty"]])
        ),
        "tv_after_5_detecting": float(np.mean([r["tv_after_5"] for r in new])),
        "tv_settled_plain": float(
            np.mean([r["tv_settled"] for r in rows if r["held"] is not None and not r["novelty"]])
        ),
        "tv_settled_detecting": float(np.mean([r["tv_settled"] for r in new])),
        "slots_to_detect": [r["slots_to_detect"] for r in new],
        "types_opened_with_new_task": [len(r["opened_at"]) for r in new],
        "opened_before_new_task": sum(1 for r in new for t in r["opened_at"] if t < AT),
        "false_types_no_new_task": sum(
            len(r["opened_at"]) for r in rows if r["held"] is None and r["novelty"]
        ),
        "tv_no_new_task_off": mean("tv_all", held=None, novelty=False),
        "tv_no_new_task_on": mean("tv_all", held=None, novelty=True),
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
