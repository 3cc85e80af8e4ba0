"""Task loaders: real corpora, balanced seeded splits, and users' JSONL/CSV files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tanbr.model.default.data import (
    SPLITS,
    TASKS,
    Example,
    _quotas,
    load_tasks,
    make_suite,
    suite_from_file,
)


@pytest.fixture(scope="module")
def suite(require_data: None):  # type: ignore[no-untyped-def]
    return load_tasks(per_task=300)


@pytest.mark.data
def test_real_tasks_are_joint_labelled_disjoint_and_capped(suite) -> None:  # type: ignore[no-untyped-def]
    assert suite.tasks == TASKS and len(TASKS) >= 6
    assert all(label.split(":", 1)[0] in TASKS for label in suite.labels)
    assert {lab for lab in suite.labels if lab.startswith("rt_sentiment:")} == {
        "rt_sentiment:fresh",
        "rt_sentiment:rotten",
    }
    assert {lab.split(":")[1] for lab in suite.labels if lab.startswith("parl_language:")} == {
        "de",
        "en",
        "es",
        "nl",
    }
    texts = {s: {e.text for e in suite.split(s)} for s in SPLITS}
    assert not texts["train"] & texts["test"]
    assert not texts["train"] & texts["calib"]
    assert not texts["calib"] & texts["test"]
    for task, counts in suite.counts().items():
        assert sum(counts.values()) <= 300, task
        assert counts["train"] > counts["test"] > counts["calib"] > 0, (task, counts)
    # one joint label per text, across all tasks and splits
    seen: dict[str, str] = {}
    for s in SPLITS:
        for e in suite.split(s):
            assert seen.setdefault(e.text.casefold(), e.target) == e.target


@pytest.mark.data
def test_tasks_are_balanced_over_labels(suite) -> None:  # type: ignore[no-untyped-def]
    for task in ("rt_sentiment", "parl_language", "news_source", "health_tweet_source"):
        per_label = Counter(e.label for s in SPLITS for e in suite.of_task(s, task))
        assert max(per_label.values()) - min(per_label.values()) <= 1, (task, per_label)


@pytest.mark.data
def test_splits_are_seeded_and_independent_of_other_tasks(suite) -> None:  # type: ignore[no-untyped-def]
    again = load_tasks(per_task=300)
    assert again.digest() == suite.digest()
    alone = load_tasks(["parl_language"], per_task=300)
    for s in SPLITS:
        assert alone.split(s) == suite.of_task(s, "parl_language")
    other_seed = load_tasks(["parl_language"], per_task=300, seed=1)
    assert other_seed.digest() != alone.digest()


@pytest.mark.data
def test_unknown_task_is_rejected(require_data: None) -> None:
    with pytest.raises(ValueError, match="tasks must be"):
        load_tasks(["rt_sentiment", "imdb"])


def test_quotas_fill_evenly_up_to_the_cap() -> None:
    assert _quotas({"a": 2, "b": 100, "c": 100}, 50) == {"a": 2, "b": 24, "c": 24}
    assert _quotas({"a": 10, "b": 10}, None) == {"a": 10, "b": 10}
    assert sum(_quotas({"a": 7, "b": 9, "c": 30}, 31).values()) <= 31


def _rows(n_per_label: int = 6) -> list[dict[str, str]]:
    rows = []
    for task, labels in (("mood", ("happy", "sad")), ("lang", ("en", "fr", "de"))):
        for label in labels:
            for i in range(n_per_label):
                rows.append({"text": f"{task} {label} number {i}", "label": label, "task": task})
    return rows


def test_user_tasks_from_jsonl_and_csv_agree(tmp_path: Path) -> None:
    rows = _rows()
    jsonl = tmp_path / "tasks.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    csv_path = tmp_path / "tasks.csv"
    csv_path.write_text(
        "task,text,label\n" + "".join(f'{r["task"]},"{r["text"]}",{r["label"]}\n' for r in rows)
    )
    a, b = suite_from_file(jsonl), suite_from_file(csv_path)
    assert a.digest() == b.digest()
    assert a.tasks == ("mood", "lang")
    assert a.labels == ("mood:happy", "mood:sad", "lang:de", "lang:en", "lang:fr")
    assert sum(len(a.split(s)) for s in SPLITS) == len(rows)
    assert all(len(a.of_task(s, t)) > 0 for s in SPLITS for t in a.tasks)


def test_user_task_files_the_classifier_cannot_use_are_named(tmp_path: Path) -> None:
    """Every problem of the file is tanbr.tasks' one line (tests/test_tasks.py covers them);
    a language-modelling file is refused by the classifier."""
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"text": "fine", "label": "x", "task": "t"})
    bad.write_text(f"{good}\n{good}\n" + '{"text": "hi", "label": "x"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: .*task"):
        suite_from_file(bad)
    lm = tmp_path / "lm.jsonl"
    lm.write_text("".join(json.dumps(r | {"label": None}) + "\n" for r in _rows()))
    with pytest.raises(ValueError, match="needs a 'label' on every row"):
        suite_from_file(lm)


def test_too_small_task_and_bad_fractions_are_rejected() -> None:
    tiny = [Example(f"text {i}", "t", "a") for i in range(2)]
    with pytest.raises(ValueError, match="too few examples"):
        make_suite(tiny)
    with pytest.raises(ValueError, match="fractions must sum to 1"):
        make_suite([Example(f"text {i}", "t", "a") for i in range(20)], fractions=(0.5, 0.2, 0.2))


def test_ambiguous_texts_are_dropped() -> None:
    examples = [Example(f"text {i}", "t", "a" if i % 2 else "b") for i in range(30)]
    examples += [Example("Same Text", "t", "a"), Example("same text", "t", "b")]
    examples += [Example("dup", "t", "a"), Example("dup", "t", "a")]
    suite = make_suite(examples)
    texts = [e.text.casefold() for s in SPLITS for e in suite.split(s)]
    assert "same text" not in texts
    assert texts.count("dup") == 1
