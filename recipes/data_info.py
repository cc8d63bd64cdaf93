"""``cookbook data info``: what an indexed dataset holds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cookbook.data.indexed import IndexedDataset


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
    return DataInfo(prefix, ds.num_documents, len(ds), tokens, ds.dtype.name, lo, hi, lengths, int((lengths == 0).sum()))


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
