"""How the (policy, seed) runs are handed to the worker processes."""

from __future__ import annotations

from tanbr.experiment.parallel import submission_order


def test_runs_that_merge_every_slot_are_submitted_first() -> None:
    names = ("tanbr", "uniform", "slot-oracle", "smear")
    jobs = [(seed, name) for seed in (0, 1) for name in names]
    order = submission_order(jobs)
    assert sorted(order) == sorted(jobs)  # every run once
    assert order == [
        (0, "tanbr"), (0, "slot-oracle"), (1, "tanbr"), (1, "slot-oracle"),  # a merge per slot
        (0, "smear"), (1, "smear"),  # a merge per request, memoised
        (0, "uniform"), (1, "uniform"),  # one merge
    ]  # fmt: skip
