"""A checkpoint folder's tokenizer, loaded offline, and the length-sorted batches it feeds.

Every batch is padded on the right: the real tokens of a request then sit at positions
0..L-1 whatever the batch, as they would alone, so a causal model computes the same states
for them (left padding would shift their positions), and the last real token, which a
sequence classifier pools and a language model predicts from, is found from the attention
mask. Batches are cut from the requests sorted by length, which keeps the padding small.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

#: Files any of which makes a folder's tokenizer loadable (JSON, SentencePiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def tokenizer_files(folder: Path) -> list[str]:
    """The tokenizer files present in ``folder`` (empty: the folder brings no tokenizer)."""
    return [name for name in TOKENIZER_FILES if (folder / name).is_file()]


def load_tokenizer(folder: Path, *, vocab_size: int | None = None) -> Any:
    """The folder's own tokenizer, offline, padding on the right.

    A tokenizer without a pad token pads with its end-of-sequence token (padding is masked
    out, so which token fills it does not matter). A tokenizer with more tokens than the
    model's embedding has rows is refused: some ids would index past the embedding.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    if not tokenizer_files(folder):
        raise ValueError(f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{folder}: cannot load the tokenizer ({err})") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"{folder}: the tokenizer has neither a pad token nor an end-of-sequence token "
                "to pad batches with"
            )
        tokenizer.pad_token = tokenizer.eos_token
        log.debug("%s: padding with the end-of-sequence token %r", folder, tokenizer.eos_token)
    tokenizer.padding_side = "right"
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ValueError(
            f"{folder}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary has "
            f"{vocab_size}"
        )
    return tokenizer


@dataclass(frozen=True, eq=False)
class Batch:
    """Right-padded token ids of some requests: ``pos`` (b,) their places in the request list,
    ``input_ids`` / ``attention_mask`` (b, T), ``lengths`` (b,) their real token counts."""

    pos: np.ndarray
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    lengths: torch.Tensor

    @property
    def last(self) -> torch.Tensor:
        """(b,) the position of each request's last real token."""
        return self.lengths - 1


def pad_batches(
    sequences: Sequence[Sequence[int]], batch_size: int, pad_id: int
) -> Iterator[Batch]:
    """Length-sorted, right-padded batches of token id sequences (each at least one token)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    if lengths.size and lengths.min() < 1:
        raise ValueError(f"request {int(lengths.argmin())} has no token")
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        pos = order[start : start + batch_size]
        width = int(lengths[pos].max())
        ids = torch.full((len(pos), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(pos), width), dtype=torch.long)
        for i, p in enumerate(pos.tolist()):
            ids[i, : lengths[p]] = torch.as_tensor(sequences[p], dtype=torch.long)
            mask[i, : lengths[p]] = 1
        yield Batch(pos, ids, mask, torch.as_tensor(lengths[pos]))


def encode(tokenizer: Any, texts: Sequence[str], *, max_length: int) -> list[list[int]]:
    """Token ids of each text with the tokenizer's special tokens, at most ``max_length``."""
    if not texts:
        return []
    enc = tokenizer(list(texts), truncation=True, max_length=max_length)
    return [list(ids) for ids in enc["input_ids"]]
