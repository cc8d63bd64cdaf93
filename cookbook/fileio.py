"""Writing outputs so that a failure never leaves a half-written file at the final path."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


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
    except BaseException:
        for t in temps:
            with contextlib.suppress(FileNotFoundError):
                t.unlink()
        raise
    for t, f in zip(temps, finals):
        os.replace(t, f)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write a whole text file under its temporary name, then rename it into place."""
    with atomic_paths(path) as (tmp,):
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
