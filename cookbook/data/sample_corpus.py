"""A sample corpus made from text every Python install has: the standard library's sources.

Each ``.py`` file of the standard library (source code and docstrings) becomes one jsonl
document ``{"text": ..., "path": ...}``, in sorted path order, so the corpus is the same on
every machine with the same Python version. Nothing is downloaded. About 30 MB on CPython 3.11.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

from cookbook.data.jsonl import dumps
from cookbook.errors import CookbookError
from cookbook.fileio import atomic_paths, check_writable


def stdlib_sources() -> list[Path]:
    """The standard library's ``.py`` files, sorted, without third-party site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def write_sample_corpus(out: str | os.PathLike, max_mb: float | None = None) -> tuple[int, int]:
    """Write the corpus to ``out`` (jsonl); return (documents, bytes of text)."""
    out = Path(out)
    if out.parent and not out.parent.exists():
        raise CookbookError(f"the folder {out.parent} does not exist; create it first")
    check_writable(out, "OUTPUT")
    files = stdlib_sources()
    if not files:
        raise CookbookError("found no standard-library sources to build the sample corpus from")
    root = Path(sysconfig.get_paths()["stdlib"])
    limit = None if max_mb is None else int(max_mb * 1e6)
    docs = total = 0
    with atomic_paths(out) as (tmp,), open(tmp, "wb") as f:
        for path in files:
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if limit is not None and total + len(text) > limit and docs:
                break
            f.write(dumps({"text": text, "path": path.relative_to(root).as_posix()}))
            f.write(b"\n")
            docs += 1
            total += len(text)
    return docs, total
