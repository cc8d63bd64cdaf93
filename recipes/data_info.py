"""``cookbook data info``: what an indexed dataset holds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from rich.table import Table

from cookbook.data.indexed import IndexedDataset
from cookbook.progress import out


@dataclass
class DataInfo:
    prefix: str
    documents: int
    sequences: int
    tokens: int
    dtype: str
    min_id: int | None
    max_id: int | None
    document_lengths: np.ndarray
    empty_documents: int


def document_lengths(ds: IndexedDataset) -> np.ndarray:
    """Tokens per document (a document's sequences summed)."""
    cum = np.concatenate([[0], np.cumsum(ds.sequence_lengths, dtype=np.int64)])
    return cum[ds.document_indices[1:]] - cum[ds.document_indices[:-1]]


def info(prefix: str) -> DataInfo:
    ds = IndexedDataset(prefix)
    tokens = ds.num_tokens
    lo = hi = None
    if tokens:
        step = 1 << 26
        lo = min(int(ds.bin[i : i + step].min()) for i in range(0, tokens, step))
        hi = max(int(ds.bin[i : i + step].max()) for i in range(0, tokens, step))
    lengths = document_lengths(ds)
    return DataInfo(
        prefix, ds.num_documents, len(ds), tokens, ds.dtype.name, lo, hi, lengths, int((lengths == 0).sum())
    )


def histogram(lengths: np.ndarray, bins: int = 12) -> list[tuple[int, int, int]]:
    """(low, high, count) buckets of document lengths on a log2 scale."""
    nonzero = lengths[lengths > 0]
    if not len(nonzero):
        return []
    edges = np.unique(np.geomspace(max(1, nonzero.min()), nonzero.max() + 1, bins + 1).astype(np.int64))
    if len(edges) < 2:
        edges = np.array([nonzero.min(), nonzero.max() + 1])
    counts, _ = np.histogram(nonzero, bins=edges)
    return [(int(edges[i]), int(edges[i + 1]) - 1, int(c)) for i, c in enumerate(counts)]


def decode_documents(prefix: str, tokenizer, n: int) -> list[str]:
    ds = IndexedDataset(prefix)
    return [tokenizer.decode(ds.document(d).tolist()) for d in range(min(n, ds.num_documents))]


def render(d: DataInfo) -> list[Table]:
    """What ``cookbook data info`` prints: the counts, then a histogram of document lengths."""
    table = Table(title=d.prefix, show_header=False, title_justify="left")
    longest = int(d.document_lengths.max()) if d.documents else 0
    for name, value in [
        ("documents", f"{d.documents:,}"),
        ("sequences", f"{d.sequences:,}"),
        ("tokens", f"{d.tokens:,}"),
        ("dtype", d.dtype),
        ("token ids", "none" if d.min_id is None else f"{d.min_id} .. {d.max_id}"),
        ("empty documents", f"{d.empty_documents:,}"),
        ("tokens / document", f"mean {d.tokens / max(d.documents, 1):,.1f}, max {longest:,}"),
    ]:
        table.add_row(name, value)
    buckets = histogram(d.document_lengths)
    if not buckets:
        return [table]
    hist = Table(title="document length (tokens)", title_justify="left")
    hist.add_column("tokens", justify="right")
    hist.add_column("documents", justify="right")
    hist.add_column("")
    peak = max(c for _, _, c in buckets) or 1
    for lo, hi, c in buckets:
        hist.add_row(f"{lo:,} - {hi:,}", f"{c:,}", "[cyan]" + "█" * max(0, round(40 * c / peak)))
    return [table, hist]


def print_documents(prefix: str, tokenizer_model: str, tokenizer_type: str | None, n: int) -> None:
    """The first ``n`` documents as text, each under a rule, verbatim (no wrapping: they are what the data hold)."""
    from cookbook.data.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_model, tokenizer_type)
    for i, text in enumerate(decode_documents(prefix, tok, n)):
        out.rule(f"document {i}")
        out.file.write(text if text.endswith("\n") else text + "\n")
        out.file.flush()
