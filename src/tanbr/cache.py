"""A content-keyed cache folder outside the repository.

Expensive artifacts (embeddings, the trained default model) live under
``$TANBR_CACHE`` (default ``~/.cache/tanbr``) in folders named by a hash of everything that
went into them, so a change of input never reuses a stale result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """The cache folder; created on first use."""
    root = Path(os.environ.get("TANBR_CACHE", Path.home() / ".cache" / "tanbr")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def content_key(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (configs, versions, file digests)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_dir(kind: str, *parts: Any) -> Path:
    """``cache_root()/kind/<key>``: the place for one artifact built from ``parts``.

    The folder is not created: callers build into a temporary sibling and rename it into place
    so that an interrupted build never looks complete.
    """
    return cache_root() / kind / content_key(*parts)


def build_once(folder: Path, marker: str, build: Callable[[Path], object]) -> bool:
    """Build a cache folder unless ``folder/marker`` already exists; returns whether it built.

    ``build`` writes into a temporary sibling that is renamed into place, so an interrupted
    build never looks complete; when two processes race, the first rename wins and the other
    uses its folder.
    """
    if (folder / marker).is_file():
        return False
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build(tmp)
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / marker).is_file():
                raise
            log.info("another build finished first; using %s", folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def file_digest(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, for keys that depend on data files."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
