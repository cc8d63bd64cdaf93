"""A sample corpus made from text every Python install has: the standard library's sources.

Each ``.py`` file of the standard library (source code and docstrings) becomes one jsonl
document ``{"text": ..., "path": ...}``, in sorted path order, so the corpus is the same on
every machine with the same Python version. Nothing is downloaded. About 30 MB on CPython 3.11.
"""

from __future__ import annotations

import os
import random
import sysconfig
from collections.abc import Iterable, Iterator
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


def scaled_texts(texts: list[str], factor: int, big_every: int = 0, big_factor: int = 60) -> Iterator[str]:
    """``factor`` distinct variants of every text (copy k has its lines in an order seeded by (k, i), so no
    document repeats and a tokenizer's cache sees no whole repeated document); with ``big_every``, every
    ``big_every``-th document is instead ``big_factor`` consecutive ones joined: a document ``big_factor`` times
    the average size, as some real corpora hold."""
    n = len(texts)
    i = 0
    for k in range(factor):
        for j in range(n):
            rng = random.Random(k * n + j)
            if big_every and i % big_every == big_every - 1:
                parts = [texts[(j + m) % n] for m in range(big_factor)]
                text = "\n".join(_shuffled(t, rng) for t in parts)
            else:
                text = texts[j] if k == 0 else _shuffled(texts[j], rng)
            i += 1
            yield text


def _shuffled(text: str, rng: random.Random) -> str:
    lines = text.split("\n")
    rng.shuffle(lines)
    return "\n".join(lines)


CORPUS_FORMATS = ("jsonl", "jsonl.zst", "parquet", "arrow")


def write_corpus(path: str | os.PathLike, texts: Iterable[str], fmt: str, rows_per_group: int = 1000) -> int:
    """Stream ``texts`` to ``path`` as jsonl, jsonl.zst, parquet (row groups of ``rows_per_group``) or an Arrow
    stream (what ``datasets.save_to_disk`` writes, batches of ``rows_per_group``); return the bytes written."""
    path = Path(path)
    if fmt in ("jsonl", "jsonl.zst"):
        with open(path, "wb") as raw:
            if fmt == "jsonl.zst":
                import zstandard

                f = zstandard.ZstdCompressor(write_checksum=True).stream_writer(raw, closefd=False)
            else:
                f = raw
            for t in texts:
                f.write(dumps({"text": t}) + b"\n")
            if f is not raw:
                f.close()
        return path.stat().st_size
    if fmt not in ("parquet", "arrow"):
        raise CookbookError(f"unknown corpus format {fmt}; choose one of {', '.join(CORPUS_FORMATS)}")
    import pyarrow as pa

    schema = pa.schema([("text", pa.string())])
    if fmt == "parquet":
        import pyarrow.parquet as pq

        writer = pq.ParquetWriter(str(path), schema)
    else:
        writer = pa.ipc.new_stream(str(path), schema)
    rows: list[str] = []
    for t in texts:
        rows.append(t)
        if len(rows) == rows_per_group:
            writer.write_table(pa.table({"text": rows}, schema=schema)) if fmt == "parquet" else writer.write_batch(
                pa.record_batch([rows], schema=schema)
            )
            rows = []
    if rows:
        writer.write_table(pa.table({"text": rows}, schema=schema)) if fmt == "parquet" else writer.write_batch(
            pa.record_batch([rows], schema=schema)
        )
    writer.close()
    return path.stat().st_size
