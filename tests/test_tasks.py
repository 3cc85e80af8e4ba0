"""A user's task file: formats, encodings, every error with its file:line, splits, the CLI."""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tanbr import cli, cli_tasks
from tanbr.tasks import (
    TaskExample,
    TaskFile,
    TaskFileError,
    example_task_file,
    read_task_file,
    split_tasks,
    write_task_file,
)

Row = dict[str, object]


def make_rows(
    tasks: tuple[str, ...] = ("alpha", "beta"),
    n: int = 12,
    labels: tuple[object, ...] | None = ("yes", "no"),
) -> list[Row]:
    """``n`` rows per task with distinct texts; labels cycle (None: language modelling)."""
    rows: list[Row] = []
    for task in tasks:
        for i in range(n):
            row: Row = {"text": f"{task} request number {i}", "task": task}
            if labels is not None:
                row["label"] = labels[i % len(labels)]
            rows.append(row)
    return rows


def jsonl(path: Path, rows: list[Row]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def fails(path: Path, **kwargs: int) -> str:
    """The message of the one TaskFileError reading ``path`` raises; it must be one line."""
    with pytest.raises(TaskFileError) as info:
        read_task_file(path, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    assert isinstance(info.value, ValueError)
    return message


# ----------------------------------------------------------------------------------------------
# Formats and encodings


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "json"])
def test_every_format_reads_back_the_same_examples(tmp_path: Path, fmt: str) -> None:
    rows = make_rows(labels=("yes", "no", "maybe"))
    reference = read_task_file(jsonl(tmp_path / "ref.jsonl", rows))
    path = tmp_path / f"tasks.{fmt}"
    write_task_file(path, reference.examples, fmt=fmt)
    tf = read_task_file(path)
    assert tf.kind == "classification"
    assert tf.tasks == ("alpha", "beta")
    assert tf.labels == {"alpha": ("maybe", "no", "yes"), "beta": ("maybe", "no", "yes")}
    assert [(e.text, e.task, e.label) for e in tf.examples] == [
        (e.text, e.task, e.label) for e in reference.examples
    ]
    assert tf.digest() == reference.digest()
    assert tf.dropped_duplicates == 0
    assert tf.examples[0].line == (2 if fmt in ("csv", "json") else 1)


def test_pretty_printed_json_array_gives_each_object_its_first_line(tmp_path: Path) -> None:
    rows = make_rows()
    text = json.dumps(rows, indent=2)
    path = tmp_path / "tasks.json"
    path.write_text(text, encoding="utf-8")
    tf = read_task_file(path)
    starts = [i for i, line in enumerate(text.split("\n"), start=1) if line.strip() == "{"]
    assert [e.line for e in tf.examples] == starts
    assert len(tf.examples) == len(rows)


def test_pretty_printed_json_array_error_names_the_objects_first_line(tmp_path: Path) -> None:
    rows = make_rows()
    del rows[3]["task"]
    text = json.dumps(rows, indent=2)
    path = tmp_path / "tasks.json"
    path.write_text(text, encoding="utf-8")
    line = [i for i, s in enumerate(text.split("\n"), start=1) if s.strip() == "{"][3]
    assert fails(path) == f"{path}:{line}: missing column 'task' (columns: text, label)"


def test_format_comes_from_the_content_not_the_suffix(tmp_path: Path) -> None:
    rows = make_rows()
    array = tmp_path / "array.jsonl"
    array.write_text(json.dumps(rows), encoding="utf-8")  # an array on one line
    lines = jsonl(tmp_path / "lines.json", rows)
    csv_txt = tmp_path / "tasks.txt"
    write_task_file(csv_txt, read_task_file(lines).examples, fmt="csv")
    assert read_task_file(array).digest() == read_task_file(lines).digest()
    assert read_task_file(csv_txt).digest() == read_task_file(lines).digest()


def test_utf8_bom_is_accepted_in_jsonl_and_csv(tmp_path: Path) -> None:
    rows = make_rows()
    a = tmp_path / "bom.jsonl"
    a.write_bytes(b"\xef\xbb\xbf" + jsonl(tmp_path / "plain.jsonl", rows).read_bytes())
    b = tmp_path / "bom.csv"
    write_task_file(b, read_task_file(a).examples, fmt="csv")
    b.write_bytes(b"\xef\xbb\xbf" + b.read_bytes())  # else "\ufefftext" would be a column
    assert read_task_file(a).digest() == read_task_file(b).digest()


def test_not_utf8_names_the_line_and_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "latin1.csv"
    body = "text,task,label\nfirst text,alpha,yes\nun café noir,alpha,no\n"
    path.write_bytes(body.encode("latin-1"))
    assert fails(path) == (
        f"{path}:3: not UTF-8: byte 0xe9 at column 7 cannot be decoded (save the file as UTF-8)"
    )


def test_utf16_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "utf16.jsonl"
    path.write_text(json.dumps(make_rows()[0]), encoding="utf-16")
    assert fails(path) == f"{path}:1: not UTF-8: it starts with a UTF-16 byte-order mark"


def test_integer_labels_are_kept_as_strings(tmp_path: Path) -> None:
    tf = read_task_file(jsonl(tmp_path / "t.jsonl", make_rows(labels=(0, 1, 10))))
    assert tf.labels["alpha"] == ("0", "1", "10")
    assert {e.label for e in tf.examples} == {"0", "1", "10"}
    csv_path = tmp_path / "t.csv"
    write_task_file(csv_path, tf.examples, fmt="csv")
    assert read_task_file(csv_path).digest() == tf.digest()  # "1" in CSV is 1 in JSON


@pytest.mark.parametrize("label", [True, 1.5, ["a"]])
def test_other_label_types_are_errors(tmp_path: Path, label: object) -> None:
    rows = make_rows()
    rows[2]["label"] = label
    path = jsonl(tmp_path / "t.jsonl", rows)
    assert fails(path).startswith(f"{path}:3: 'label' must be a string or an integer, got ")


def test_csv_with_quoted_newlines_keeps_editor_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    lines = ["text,task,label", '"a text\nover two lines",alpha,yes']
    lines += [f"alpha text {i},alpha,{'yes' if i % 2 else 'no'}" for i in range(11)]
    lines += [f"beta text {i},beta,{'yes' if i % 2 else 'no'}" for i in range(12)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tf = read_task_file(path)
    assert tf.examples[0].text == "a text over two lines"  # whitespace collapsed
    assert tf.examples[0].line == 2
    assert tf.examples[1].line == 4  # the quoted newline took line 3
    path.write_text("\n".join([*lines[:4], "x,,yes", *lines[4:]]) + "\n", encoding="utf-8")
    assert fails(path) == f"{path}:6: empty task"


def test_crlf_csv_and_blank_lines(tmp_path: Path) -> None:
    rows = make_rows()
    body = "text,task,label\r\n\r\n" + "".join(
        f"{r['text']},{r['task']},{r['label']}\r\n" for r in rows
    )
    path = tmp_path / "t.csv"
    path.write_bytes(body.encode())
    tf = read_task_file(path)
    assert [e.line for e in tf.examples[:2]] == [3, 4]


def test_extra_columns_are_ignored(tmp_path: Path) -> None:
    rows = make_rows()
    for r in rows:
        r["id"] = 7
    assert len(read_task_file(jsonl(tmp_path / "t.jsonl", rows)).examples) == len(rows)


def test_lm_files_with_and_without_target(tmp_path: Path) -> None:
    rows = make_rows(labels=None)
    tf = read_task_file(jsonl(tmp_path / "plain.jsonl", rows))
    assert (tf.kind, tf.labels) == ("lm", {})
    assert all(e.label is None and e.target is None for e in tf.examples)
    for i, r in enumerate(rows):
        if i % 2:
            r["target"] = f" continuation {i}"
    tf = read_task_file(jsonl(tmp_path / "target.jsonl", rows))
    assert tf.kind == "lm"
    assert tf.examples[1].target == " continuation 1"  # kept as written
    assert sum(e.target is not None for e in tf.examples) == len(rows) // 2
    csv_path = tmp_path / "target.csv"
    write_task_file(csv_path, tf.examples, fmt="csv")
    assert read_task_file(csv_path).digest() == tf.digest()  # an empty cell is no target


def test_repeated_text_within_a_task_is_kept_once(tmp_path: Path) -> None:
    rows = make_rows()
    rows.insert(5, dict(rows[1]))
    rows.insert(9, {**rows[2], "text": "  ALPHA request   number 2 "})  # case and spaces
    tf = read_task_file(jsonl(tmp_path / "t.jsonl", rows))
    assert tf.dropped_duplicates == 2
    assert len(tf.examples) == len(rows) - 2
    assert [e.line for e in tf.examples if e.text == "alpha request number 1"] == [2]


def test_reading_has_no_side_effects(tmp_path: Path) -> None:
    good = jsonl(tmp_path / "good.jsonl", make_rows())
    bad = jsonl(tmp_path / "bad.jsonl", make_rows(n=3))
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    read_task_file(good)
    fails(bad)
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_error_pickles_and_keeps_its_parts(tmp_path: Path) -> None:
    err = TaskFileError(tmp_path / "t.csv", 4, "empty text")
    back = pickle.loads(pickle.dumps(err))
    assert (str(back), back.line, back.problem) == (str(err), 4, "empty text")


# ----------------------------------------------------------------------------------------------
# Every bad file: one error naming the file, the line and the problem


def test_not_found(tmp_path: Path) -> None:
    path = tmp_path / "missing.jsonl"
    assert fails(path) == f"{path}: not found"
    assert fails(tmp_path) == f"{tmp_path}: not a file"


@pytest.mark.parametrize("body", ["", "\n  \n"])
def test_empty_file(tmp_path: Path, body: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(body)
    assert fails(path) == f"{path}:1: empty file"


@pytest.mark.parametrize(("name", "body"), [("t.json", "[]"), ("t.csv", "text,task,label\n")])
def test_no_examples(tmp_path: Path, name: str, body: str) -> None:
    path = tmp_path / name
    path.write_text(body)
    assert fails(path) == f"{path}:1: empty file: no examples"


def test_invalid_json_line(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "t.jsonl", make_rows())
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:-1]  # drop the closing brace
    path.write_text("\n".join(lines))
    assert fails(path).startswith(f"{path}:3: invalid JSON: Expecting ',' delimiter")


def test_pretty_printed_objects_in_jsonl_get_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r, indent=1) for r in make_rows()))
    assert fails(path).endswith("write one per line or use a JSON array")


@pytest.mark.parametrize(
    ("body", "line", "problem"),
    [
        ('[\n {"text": "a", "task": "b"},\n', 3, "the array is never closed by ']'"),
        ('[\n {"text": "a", "task": "b"}\n {"text": "c"}]', 3, "expected ',' or ']'"),
        ('[\n {"text": "a", "task": "b"}\n]\n]', 4, "text after the array's ']'"),
        ('[\n {"text": "a", "task": "b"},\n]', 3, "Expecting value (column 1)"),
    ],
)
def test_invalid_json_array(tmp_path: Path, body: str, line: int, problem: str) -> None:
    path = tmp_path / "t.json"
    path.write_text(body)
    assert fails(path) == f"{path}:{line}: invalid JSON: {problem}"


def test_json_suffix_with_other_content(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    path.write_text("\n\ntext,task\n")
    assert fails(path) == (
        f"{path}:3: invalid JSON: expected '[' (an array of objects) or '{{' "
        "(one object per line), found 't'"
    )


def test_invalid_csv(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text('text,task,label\nok,alpha,yes\n"never closed,alpha,no\nmore,beta,no\n')
    assert fails(path) == f"{path}:3: invalid CSV: a quoted cell is never closed"
    path.write_text("text,task,label\nok,alpha,yes\nok too,alpha,no,extra\n")
    assert fails(path) == f"{path}:3: invalid CSV: 4 cells, the header has 3"
    path.write_text('text,task,label\nok,alpha,yes\n"bad"quote,alpha,no\n')
    assert fails(path) == f"{path}:3: invalid CSV: ',' expected after '\"'"


def test_tab_separated_gets_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "t.tsv"
    path.write_text("text\ttask\tlabel\na\tb\tc\n")
    assert fails(path) == (
        f"{path}:1: missing column 'text' (columns: text\ttask\tlabel) "
        "(the file must be comma-separated)"
    )


def test_not_an_object(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "t.jsonl", make_rows())
    path.write_text(path.read_text() + '["a list", "alpha"]\n')
    assert fails(path) == (
        f"{path}:25: not an object: expected {{'text': ..., 'task': ...}}, "
        'got ["a list", "alpha"]'
    )


def test_missing_column(tmp_path: Path) -> None:
    rows = make_rows()
    del rows[1]["task"]
    path = jsonl(tmp_path / "t.jsonl", rows)
    assert fails(path) == f"{path}:2: missing column 'task' (columns: text, label)"
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("text,label\na,b\n")
    assert fails(csv_path) == f"{csv_path}:1: missing column 'task' (columns: text, label)"
    csv_path.write_text("text,task,task\na,b,c\n")
    assert fails(csv_path) == f"{csv_path}:1: column 'task' appears twice in the header"


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("text", "", "empty text"),
        ("text", "  \t ", "empty text"),
        ("text", None, "empty text"),
        ("task", "", "empty task"),
        ("label", " ", "empty label"),
        ("target", "", "empty target"),
        ("text", 12, "'text' must be a string, got 12"),
        ("task", ["x"], "'task' must be a string, got [\"x\"]"),
    ],
)
def test_bad_values(tmp_path: Path, field: str, value: object, problem: str) -> None:
    rows = make_rows(labels=("yes", "no") if field != "target" else None)
    rows[4][field] = value
    path = jsonl(tmp_path / "t.jsonl", rows)
    assert fails(path) == f"{path}:5: {problem}"


def test_task_with_a_colon(tmp_path: Path) -> None:
    rows = make_rows(tasks=("alpha", "be:ta"))
    path = jsonl(tmp_path / "t.jsonl", rows)
    assert fails(path) == (
        f"{path}:13: task 'be:ta' contains ':' (labels are joined as task:label)"
    )


def test_only_one_task(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "t.jsonl", make_rows(tasks=("alpha",)))
    assert fails(path) == f"{path}:1: only one task ('alpha'): a mix needs at least two"


def test_too_few_examples_for_a_task(tmp_path: Path) -> None:
    rows = make_rows() + make_rows(tasks=("gamma",), n=5)
    path = jsonl(tmp_path / "t.jsonl", rows)
    assert fails(path) == (
        f"{path}:25: task 'gamma' has 5 examples; 12 are needed for its train, calib and test "
        "splits"
    )
    rows.append(dict(rows[-1]))  # a repeated text does not count
    path = jsonl(tmp_path / "t.jsonl", rows)
    assert fails(path, min_per_task=6) == (
        f"{path}:25: task 'gamma' has 5 examples (after dropping 1 repeated text); 6 are "
        "needed for its train, calib and test splits"
    )


def test_too_few_examples_for_a_label(tmp_path: Path) -> None:
    rows = make_rows()
    rows[20]["label"] = "rare"
    path = jsonl(tmp_path / "t.jsonl", rows)
    assert fails(path) == (
        f"{path}:21: label 'rare' of task 'beta' has 1 example(s); 2 are needed per label"
    )
    assert read_task_file(path, min_per_label=1).labels["beta"] == ("no", "rare", "yes")


def test_same_text_in_two_tasks_names_both_lines(tmp_path: Path) -> None:
    rows = make_rows()
    rows[17]["text"] = "Alpha  request number 3"
    path = jsonl(tmp_path / "t.jsonl", rows)
    assert fails(path) == (
        f"{path}:18: the same text is in task 'beta' here and in task 'alpha' at line 4; "
        "an untagged request must belong to one task"
    )


def test_same_text_with_another_label_in_one_task(tmp_path: Path) -> None:
    rows = make_rows()
    rows.insert(6, {**rows[0], "label": "no"})
    path = jsonl(tmp_path / "t.jsonl", rows)
    assert fails(path) == (
        f"{path}:7: the same text is at line 1 with another label in task 'alpha'"
    )


@pytest.mark.parametrize(("first", "line"), [("label", 8), ("none", 8)])
def test_label_and_non_label_rows_do_not_mix(tmp_path: Path, first: str, line: int) -> None:
    rows = make_rows(labels=("yes", "no") if first == "label" else None)
    if first == "label":
        del rows[7]["label"]
        expected = f"line 1 has a label but line {line} has none"
    else:
        rows[7]["label"] = "yes"
        expected = f"line {line} has a label but line 1 has none"
    path = jsonl(tmp_path / "t.jsonl", rows)
    assert fails(path) == (
        f"{path}:{line}: {expected}: a file is classification (every row has a label) or lm "
        "(no row has one)"
    )


def test_label_and_target_in_one_row(tmp_path: Path) -> None:
    rows = make_rows()
    rows[3]["target"] = "more"
    path = jsonl(tmp_path / "t.jsonl", rows)
    assert fails(path) == (
        f"{path}:4: both 'label' and 'target': a row is classification or lm, not both"
    )


def test_bad_arguments_are_plain_value_errors(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "t.jsonl", make_rows())
    with pytest.raises(ValueError, match="min_per_task"):
        read_task_file(path, min_per_task=2)
    with pytest.raises(ValueError, match="min_per_label"):
        read_task_file(path, min_per_label=0)


# ----------------------------------------------------------------------------------------------
# Splits


def imbalanced(tmp_path: Path) -> TaskFile:
    rows = make_rows(tasks=("alpha",), n=40, labels=("a", "a", "a", "b"))
    rows += make_rows(tasks=("beta",), n=24, labels=("x", "y", "z"))
    return read_task_file(jsonl(tmp_path / "t.jsonl", rows))


def test_splits_are_deterministic_and_depend_on_the_seed(tmp_path: Path) -> None:
    tf = imbalanced(tmp_path)
    assert split_tasks(tf, seed=3) == split_tasks(tf, seed=3)
    assert split_tasks(tf, seed=3).test != split_tasks(tf, seed=4).test


def test_splits_cover_every_example_once_and_every_task(tmp_path: Path) -> None:
    tf = imbalanced(tmp_path)
    s = split_tasks(tf)
    everything = s.train + s.calib + s.test
    assert sorted(e.line for e in everything) == sorted(e.line for e in tf.examples)
    for part in (s.train, s.calib, s.test):
        assert {e.task for e in part} == set(tf.tasks)
    sizes = {name: Counter(e.task for e in part) for name, part in vars(s).items()}
    assert sizes["test"] == {"alpha": 10, "beta": 6}
    assert sizes["calib"] == {"alpha": 6, "beta": 4}
    assert sizes["train"] == {"alpha": 24, "beta": 14}


def test_splits_are_stratified_by_label(tmp_path: Path) -> None:
    tf = imbalanced(tmp_path)  # alpha: 30 "a", 10 "b"
    s = split_tasks(tf)
    for part, n in ((s.train, 24), (s.calib, 6), (s.test, 10)):
        labels = Counter(e.label for e in part if e.task == "alpha")
        assert abs(labels["b"] - n / 4) <= 1, labels
        assert {e.label for e in part if e.task == "beta"} == {"x", "y", "z"}


def test_splits_do_not_depend_on_row_order_or_other_tasks(tmp_path: Path) -> None:
    rows = make_rows(n=20)
    a = read_task_file(jsonl(tmp_path / "a.jsonl", rows))
    b = read_task_file(jsonl(tmp_path / "b.jsonl", rows[::-1] + make_rows(("gamma",), n=20)))

    def texts(s: tuple[TaskExample, ...], task: str) -> set[str]:
        return {e.text for e in s if e.task == task}

    sa, sb = split_tasks(a), split_tasks(b)
    for task in ("alpha", "beta"):
        assert texts(sa.test, task) == texts(sb.test, task)
        assert texts(sa.train, task) == texts(sb.train, task)


def test_per_task_caps_and_balances(tmp_path: Path) -> None:
    tf = imbalanced(tmp_path)
    s = split_tasks(tf, per_task=16)
    everything = s.train + s.calib + s.test
    assert Counter(e.task for e in everything) == {"alpha": 16, "beta": 16}
    assert Counter(e.label for e in everything if e.task == "alpha") == {"a": 8, "b": 8}


def test_split_arguments_are_checked(tmp_path: Path) -> None:
    tf = imbalanced(tmp_path)
    with pytest.raises(ValueError, match="sum to 1"):
        split_tasks(tf, fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="three numbers"):
        split_tasks(tf, fractions=(1.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="per_task"):
        split_tasks(tf, per_task=2)
    tiny = read_task_file(
        jsonl(tmp_path / "tiny.jsonl", make_rows(n=3)), min_per_task=3, min_per_label=1
    )
    with pytest.raises(ValueError, match="too few for three splits"):
        split_tasks(tiny, fractions=(0.1, 0.5, 0.4))


def test_lm_files_split_too(tmp_path: Path) -> None:
    tf = read_task_file(jsonl(tmp_path / "t.jsonl", make_rows(labels=None, n=20)))
    s = split_tasks(tf)
    assert (len(s.train), len(s.calib), len(s.test)) == (24, 6, 10)


# ----------------------------------------------------------------------------------------------
# Writing


def test_write_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    examples = read_task_file(jsonl(path, make_rows())).examples
    before = path.read_bytes()

    def broken() -> Iterator[TaskExample]:
        yield from examples[:3]
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_task_file(path, broken())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.jsonl"]
    with pytest.raises(ValueError, match="fmt"):
        write_task_file(path, examples, fmt="xml")
    with pytest.raises(ValueError, match="no examples"):
        write_task_file(path, [])


def test_write_creates_folders_and_writes_utf8(tmp_path: Path) -> None:
    examples = [TaskExample("café ☕", "a", "x"), TaskExample("naïve", "b", target="…")]
    path = tmp_path / "new" / "folder" / "t.csv"
    write_task_file(path, examples, fmt="csv")
    assert path.read_text(encoding="utf-8").splitlines() == [
        "text,task,label,target",
        "café ☕,a,x,",
        "naïve,b,,…",
    ]


# ----------------------------------------------------------------------------------------------
# The command line


def test_cli_module_imports_only_the_standard_library() -> None:
    code = (
        "import sys, tanbr.cli_tasks; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('numpy', 'torch', 'transformers', 'yaml', 'pandas')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_tasks_module_imports_no_model_code() -> None:
    code = (
        "import sys, tanbr.tasks; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') "
        "or m.startswith(('tanbr.model', 'tanbr.experiment', 'tanbr.serve'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


@pytest.fixture
def tasks_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    """The two entries cli.COMMANDS gets for this module."""
    monkeypatch.setitem(cli.COMMANDS, "tasks check", ("tanbr.cli_tasks", "check a task file"))
    monkeypatch.setitem(
        cli.COMMANDS, "tasks example", ("tanbr.cli_tasks", "write an example task file")
    )


@pytest.mark.usefixtures("tasks_commands")
def test_cli_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = make_rows(labels=(1, 2))
    rows.append(dict(rows[0]))
    path = jsonl(tmp_path / "t.jsonl", rows)
    assert cli.main(["-q", "tasks", "check", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path}: classification, 2 tasks, 24 examples, 1 repeated texts dropped"
    assert out[1].split() == ["alpha", "12", "examples", "2", "labels:", "1", "6,", "2", "6"]
    assert out[-1].startswith("digest ")


@pytest.mark.usefixtures("tasks_commands")
def test_cli_check_lm_and_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = make_rows(labels=None, n=4)
    rows[0]["target"] = "next"
    path = jsonl(tmp_path / "t.jsonl", rows)
    assert cli.main(["-q", "tasks", "check", str(path), "--min-per-task", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{path}: lm, 2 tasks, 8 examples"
    assert out[1].split() == ["alpha", "4", "examples", "1", "with", "a", "target"]


@pytest.mark.usefixtures("tasks_commands")
def test_cli_check_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = jsonl(tmp_path / "t.jsonl", make_rows(tasks=("alpha",)))
    assert cli.main(["-q", "tasks", "check", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"tanbr: error: {path}:1: only one task ('alpha'): a mix needs at least two\n"
    )


def test_run_without_the_main_parser(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="tanbr")
    sub = parser.add_subparsers(dest="command").add_parser("tasks").add_subparsers()
    cli_tasks.add_arguments(sub.add_parser("check"))
    args = parser.parse_args(["tasks", "check", str(tmp_path / "missing.csv")])
    assert cli_tasks.run(args) == 2
    assert capsys.readouterr().err == f"tanbr: error: {tmp_path / 'missing.csv'}: not found\n"
    with pytest.raises(ValueError, match="serves"):
        cli_tasks.add_arguments(argparse.ArgumentParser(prog="tanbr tasks other"))


# ----------------------------------------------------------------------------------------------
# The example file (reads the installed data packages)


@pytest.mark.data
@pytest.mark.usefixtures("tasks_commands")
def test_example_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tanbr.model.default.data import TASKS, task_pool

    path = tmp_path / "example.jsonl"
    assert cli.main(["-q", "tasks", "example", str(path), "--per-task", "120"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"wrote {path}"
    tf = read_task_file(path)
    assert tf.kind == "classification"
    assert len(tf.tasks) == 4
    assert not set(tf.tasks) & set(TASKS)
    counts = tf.counts()
    for task in tf.tasks:
        assert len(tf.labels[task]) >= 2
        assert sum(counts[task].values()) == 120
        assert max(counts[task].values()) - min(counts[task].values()) <= 1  # balanced
    assert all(20 <= len(e.text) <= 400 or e.task == "novel_zh" for e in tf.examples)
    assert not any("http" in e.text for e in tf.examples)
    builtin = {text.casefold() for task in TASKS for text, _ in task_pool(task)}
    assert not [e.text for e in tf.examples if e.text.casefold() in builtin]
    assert [p.name for p in tmp_path.iterdir()] == ["example.jsonl"]


@pytest.mark.data
def test_example_file_is_deterministic_and_full_size(tmp_path: Path) -> None:
    a = example_task_file(tmp_path / "a.jsonl")
    b = example_task_file(tmp_path / "b.csv")
    assert a.digest() == b.digest()
    assert a.path == tmp_path / "a.jsonl"
    assert {t: sum(c.values()) for t, c in a.counts().items()} == dict.fromkeys(a.tasks, 300)
    assert example_task_file(tmp_path / "c.jsonl", seed=1).digest() != a.digest()
    with pytest.raises(ValueError, match="per_task"):
        example_task_file(tmp_path / "d.jsonl", per_task=5)
