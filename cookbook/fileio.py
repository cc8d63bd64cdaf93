"""Writing outputs so that a failure never leaves a half-written file at the final path."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cookbook.errors import CookbookError


def temporary_path(path: str | os.PathLike) -> Path:
    """The name a file is written under until it is complete."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """Yield temporary paths for ``paths``; rename them all into place only if the block succeeds.

    On any exception (Ctrl-C included) the temporary files are removed and the final paths are
    left as they were.
    """
    finals = [Path(p) for p in paths]
    temps = [temporary_path(p) for p in finals]
    try:
        yield temps
        for t, f in zip(temps, finals):
            os.replace(t, f)
    except BaseException:
        for t in temps:
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                t.unlink()
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a whole text file under its temporary name, then rename it into place."""
    with atomic_paths(path) as (tmp,):
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def check_writable(path: str | os.PathLike, flag: str, folder: bool = False) -> None:
    """Before any work: ``path`` (a file, or with ``folder`` a folder) can be written. A folder where a file goes, a
    file where a folder goes, or a place the system refuses (read-only, no permission) is one line naming ``flag``."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise CookbookError(
            f"{flag} {path} is a {'file' if folder else 'folder'}; name a {'folder' if folder else 'file'}"
        )
    where = path if path.is_dir() else path.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise CookbookError(f"{flag} {path} lies under {where}, which is a file, not a folder")
    try:  # the only reliable test: write something there (os.access says yes to root on read-only places)
        with tempfile.TemporaryFile(dir=where, prefix=".cookbook-probe-"):
            pass
    except OSError as e:
        raise CookbookError(f"{flag} {path}: cannot write in {where} ({e.strerror or e})") from None
