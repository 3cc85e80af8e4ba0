"""How the (policy, seed) runs are handed to the worker processes."""

from __future__ import annotations

from tanbr.experiment.parallel import submission_order


def test_runs_that_merge_every_slot_are_submitted_first() -> None:
    jobs = [(seed, name) for seed in (0, 1) for name in ("tanbr", "uniform", "plug-in", "smear")]
    order = submission_order(jobs)
    assert sorted(order) == sorted(jobs)  # every run once
    assert order == [
        (0, "tanbr"), (0, "plug-in"), (1, "tanbr"), (1, "plug-in"),
        (0, "uniform"), (0, "smear"), (1, "uniform"), (1, "smear"),
    ]  # fmt: skip
