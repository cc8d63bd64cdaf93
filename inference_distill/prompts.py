"""Prompts for the teacher: the first tokens of pretraining documents, decoded as text.

The Megatron Cookbook prompted its teachers with the decode of the first 128 tokens of each pretraining document.
``PromptSource`` does that over an indexed dataset (``PREFIX.bin``/``.idx``, decoded with the data's tokenizer) or
over jsonl (a file or a folder of ``.jsonl`` files, tokenized with ``tokenizer.tokenize`` as preprocess would).

What a prompt is, exactly:

- A **document** is what Megatron-LM's preprocess wrote for one input line: for an indexed dataset, the sequences
  between two ``document_indices`` entries, concatenated (one sequence per document unless preprocess split
  sentences; then the prompt runs across sentence boundaries as the text did). ``doc_id`` is the document's index.
  For jsonl, one line (a list of strings under the key is one document of those strings' tokens, as preprocess
  makes of it); ``doc_id`` is the line's ``id`` field when it is a string or an integer, else ``"FILE:LINE"``.
- Its **content tokens** are its ids without the tokenizer's special ids (BOS, EOD/EOS and whatever ``tokenize``
  adds around the text), so an appended EOD is never part of a prompt.
- The **prefix** is its first ``prefix_tokens`` content tokens, or ``max(1, floor(prefix_fraction * length))`` of
  them; the prompt's text is ``tokenizer.decode`` of those ids.
- A document is **eligible** when it has something left to continue: more content tokens than its prefix. With
  ``min_doc_tokens`` given, the rule is instead: at least ``min_doc_tokens`` content tokens and at least the prefix.
- **Order**: ``numpy.random.default_rng(seed).permutation(number of documents)``, ineligible documents dropped,
  cut to ``num_prompts``. Prompt ``i`` is the ``i``-th document of that order; it depends on nothing else (not on
  which prompts were asked for before), which is what lets a run resume shard by shard. Because the permutation
  covers all documents, a stricter ``min_doc_tokens`` keeps the same order minus the documents it drops.

Cost and memory. Indexed data: the lengths come from the ``.idx`` alone (the ``.bin`` is read only for the prompts
asked for), minus the special ids every document carries, which are measured once on the first documents (so a
document with special ids inside its text may give a prompt a few tokens short); memory is about 32 bytes per
document while the order is built and 8 bytes per prompt after. Jsonl: the first ``count()`` or ``prompts()``
tokenizes every document once to know its length and keeps each line's file, byte offset, line number and length
(about 28 bytes per document); a prompt re-reads its line. Compressed jsonl cannot be read at random: decompress
it, or preprocess it into an indexed dataset, which is the better input for large corpora anyway.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cookbook.data.indexed import IndexedDataset, bin_path, idx_path
from cookbook.data.jsonl import parse_lines, read_lines
from cookbook.data.sources import expand_inputs
from cookbook.data.tokenizer import Tokenizer
from cookbook.errors import CookbookError

SAMPLE_DOCUMENTS = 16  # documents looked at to learn which special ids an indexed dataset's documents carry


@dataclass(frozen=True)
class Prompt:
    index: int  # position in the run's prompt order, 0..count()-1
    doc_id: int | str  # document index (indexed data), or the line's "id", or "FILE:LINE" (jsonl)
    text: str  # the prefix decoded as text
    tokens: int  # prefix length in tokens


def special_ids(tokenizer: Tokenizer) -> np.ndarray:
    """The ids a prompt never holds: BOS, EOD and what ``tokenize`` adds around the text."""
    ids = {tokenizer.bos, tokenizer.eod, *tokenizer.prefix, *tokenizer.suffix} - {None}
    return np.array(sorted(ids), dtype=np.int64)


def prefix_lengths(lengths: np.ndarray, prefix_tokens: int | None, prefix_fraction: float | None) -> np.ndarray:
    """The prefix length of documents with ``lengths`` content tokens."""
    if prefix_tokens is not None:
        return np.full(len(lengths), prefix_tokens, dtype=np.int64)
    return np.maximum(1, np.floor(prefix_fraction * lengths.astype(np.float64))).astype(np.int64)


# --------------------------------------------------------------------------- corpora


class _IndexedCorpus:
    """Documents of a Megatron indexed dataset. Tokens are read with ``pread`` (a few hundred bytes per prompt),
    not through the memory map, whose page faults read ahead far more than a prompt needs."""

    def __init__(self, prefix: str, tokenizer: Tokenizer):
        self.ds = IndexedDataset(prefix)
        self.tokenizer = tokenizer
        self.special = special_ids(tokenizer)
        self._bin = open(bin_path(prefix), "rb")

    def _stored(self, d: int) -> int:
        lo, hi = int(self.ds.document_indices[d]), int(self.ds.document_indices[d + 1])
        return int(self.ds.sequence_lengths[lo:hi].sum(dtype=np.int64))

    def _read(self, d: int, start: int, count: int) -> np.ndarray:
        """Stored tokens ``start .. start+count-1`` of document ``d`` (its sequences lie back to back in the .bin)."""
        ds = self.ds
        lo = int(ds.document_indices[d])
        count = min(count, self._stored(d) - start)
        if count <= 0:
            return np.zeros(0, np.int64)
        size = ds.dtype.itemsize
        raw = os.pread(self._bin.fileno(), count * size, int(ds.sequence_pointers[lo]) + start * size)
        return np.frombuffer(raw, ds.dtype).astype(np.int64)

    def lengths(self) -> np.ndarray:
        """Content tokens per document, from the ``.idx``: stored tokens minus the specials documents carry."""
        ds = self.ds
        ends = np.zeros(len(ds) + 1, dtype=np.int64)
        np.cumsum(ds.sequence_lengths, out=ends[1:])
        stored = ends[ds.document_indices[1:]] - ends[ds.document_indices[:-1]]
        del ends
        lead, trail = self._edges(stored)
        return np.maximum(stored - lead - trail, 0)

    def _edges(self, stored: np.ndarray, look: int = 64) -> tuple[int, int]:
        """(special ids every document starts with, special ids every document ends with), from the first
        non-empty documents (preprocess writes every document the same way: BOS, text, EOD with --append-eod)."""
        lead = trail = None
        for d in np.flatnonzero(stored)[:SAMPLE_DOCUMENTS]:
            n = int(stored[d])
            head = np.flatnonzero(~np.isin(self._read(int(d), 0, look), self.special))
            tail = np.flatnonzero(~np.isin(self._read(int(d), max(0, n - look), look), self.special))
            if len(head) == 0 or len(tail) == 0:  # special ids only, as far as we look: says nothing
                continue
            lead = int(head[0]) if lead is None else min(lead, int(head[0]))
            last = min(look, n) - 1 - int(tail[-1])
            trail = last if trail is None else min(trail, last)
        return lead or 0, trail or 0

    def fetch(self, d: int, need: int) -> tuple[int, np.ndarray]:
        """(doc_id, the first ``need`` content ids of document ``d``)."""
        take, stored = need + 4, self._stored(d)
        while True:
            ids = self._read(d, 0, take)
            content = ids[~np.isin(ids, self.special)]
            if len(content) >= need or take >= stored:
                break
            take *= 2
        content = content[:need]
        if len(content) and int(content.max()) >= self.tokenizer.vocab_size:
            raise CookbookError(
                f"{self.ds.prefix} holds token id {int(content.max())} but the tokenizer has {self.tokenizer.vocab_size} ids; "
                "pass the tokenizer the dataset was made with"
            )
        return d, content


class _JsonlCorpus:
    """Documents of jsonl files: one per non-blank line."""

    def __init__(self, path: Path, tokenizer: Tokenizer, text_key: str):
        self.files = expand_inputs([path])
        for f in self.files:
            if f.name.endswith(".gz"):
                raise CookbookError(
                    f"{f} is compressed and prompts need random access to its lines; decompress it (gunzip) or preprocess it into an indexed dataset"
                )
        self.tokenizer = tokenizer
        self.special = special_ids(tokenizer)
        self.key = text_key

    def _content(self, texts: list) -> np.ndarray:
        """Content tokens of each document (a string, or a list of strings tokenized one by one)."""
        pieces = [t for v in texts for t in (v if isinstance(v, list) else [v])]
        owner = np.repeat(np.arange(len(texts)), [len(v) if isinstance(v, list) else 1 for v in texts])
        flat, lens = self.tokenizer.encode_batch(pieces)
        per_piece = np.zeros(len(pieces), dtype=np.int64)
        keep = ~np.isin(flat, self.special)
        if len(flat):
            piece_of = np.repeat(np.arange(len(pieces)), lens)
            per_piece = np.bincount(piece_of[keep], minlength=len(pieces)).astype(np.int64)
        return np.bincount(owner, weights=per_piece, minlength=len(texts)).astype(np.int64)

    def lengths(self) -> np.ndarray:
        """Tokenize every document once; remember where each line is."""
        files, offsets, lines, lengths = [], [], [], []
        for fi, path in enumerate(self.files):
            pos = 0
            for first, block, _ in read_lines(path):
                sizes = np.fromiter((len(b) + 1 for b in block), dtype=np.int64, count=len(block))
                starts = pos + np.cumsum(sizes) - sizes
                pos += int(sizes.sum())
                nonblank = np.fromiter((bool(b.strip()) for b in block), dtype=bool, count=len(block))
                texts, bad = parse_lines(path, first, block, [self.key], skip_bad=True)
                if bad:
                    raise CookbookError(
                        f"bad input line {bad[0]}; every line needs a string under {self.key!r} (is the text under another key?)"
                    )
                texts = texts[self.key]
                rows = np.flatnonzero(nonblank)
                assert len(rows) == len(texts)  # parse_lines skips exactly the blank lines
                files.append(np.full(len(rows), fi, dtype=np.int32))
                offsets.append(starts[rows])
                lines.append(first + rows)
                lengths.append(self._content(texts))
        cat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)  # noqa: E731
        self.file_of, self.offset, self.line = cat(files, np.int32), cat(offsets, np.int64), cat(lines, np.int64)
        return cat(lengths, np.int64)

    def fetch(self, d: int, need: int) -> tuple[int | str, np.ndarray]:
        path = self.files[int(self.file_of[d])]
        with open(path, "rb") as f:
            f.seek(int(self.offset[d]))
            raw = f.readline()
        where = f"{path.name}:{int(self.line[d])}"
        try:
            obj = json.loads(raw)
            value = obj[self.key]
        except (ValueError, KeyError, TypeError):
            raise CookbookError(
                f"{path}:{int(self.line[d])} changed since it was read; do not edit the input while generating"
            ) from None
        ids = [i for v in (value if isinstance(value, list) else [value]) for i in self.tokenizer.tokenize(v)]
        ids = np.asarray(ids, dtype=np.int64)
        content = ids[~np.isin(ids, self.special)][:need]
        doc_id = obj.get("id")
        if isinstance(doc_id, bool) or not isinstance(doc_id, (int, str)):
            doc_id = where
        return doc_id, content


# --------------------------------------------------------------------------- the source


class PromptSource:
    """The run's prompts, in a fixed seeded order, by index: ``prompts(start, stop)`` is prompts
    ``start .. stop-1`` (``stop`` past the end is cut), the same whatever was asked before.

    ``path``: an indexed dataset prefix (``PREFIX`` of ``PREFIX.bin``/``PREFIX.idx``), a ``.jsonl`` file or a folder of
    them. ``tokenizer``: the data's tokenizer (it decodes the prompts). Exactly one of ``prefix_tokens`` and
    ``prefix_fraction``. See the module docstring for what is eligible and in which order.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        tokenizer: Tokenizer,
        prefix_tokens: int | None = None,
        prefix_fraction: float | None = None,
        min_doc_tokens: int | None = None,
        num_prompts: int | None = None,
        seed: int = 0,
        text_key: str = "text",
    ):
        if (prefix_tokens is None) == (prefix_fraction is None):
            raise CookbookError(
                "give exactly one of --prefix-tokens (tokens per prompt) and --prefix-fraction (a share of each document)"
            )
        if prefix_tokens is not None and prefix_tokens < 1:
            raise CookbookError(f"--prefix-tokens {prefix_tokens} must be at least 1")
        if prefix_fraction is not None and not 0 < prefix_fraction <= 1:
            raise CookbookError(f"--prefix-fraction {prefix_fraction} is not in (0, 1]")
        if min_doc_tokens is not None and min_doc_tokens < 0:
            raise CookbookError(f"--min-doc-tokens {min_doc_tokens} is negative")
        if num_prompts is not None and num_prompts < 1:
            raise CookbookError(
                f"--num-prompts {num_prompts} must be at least 1 (or left out for every eligible document)"
            )
        self.path = str(path)
        self.prefix_tokens, self.prefix_fraction = prefix_tokens, prefix_fraction
        self.min_doc_tokens, self.num_prompts, self.seed = min_doc_tokens, num_prompts, seed
        self.text_key = text_key
        self.tokenizer = tokenizer
        p = Path(path)
        if p.suffix in (".bin", ".idx") and bin_path(p.with_suffix("")).exists():
            p = p.with_suffix("")  # tolerate data/x.bin for data/x
        if idx_path(p).exists() or bin_path(p).exists():
            self.kind = "indexed"
            self._corpus = _IndexedCorpus(str(p), tokenizer)
        elif p.exists():
            self.kind = "jsonl"
            self._corpus = _JsonlCorpus(p, tokenizer, text_key)
        else:
            raise CookbookError(
                f"{path} does not exist; give an indexed dataset prefix (without .bin/.idx), a .jsonl file or a folder of .jsonl files"
            )
        self._order: np.ndarray | None = None  # document of each prompt
        self._plen: np.ndarray | None = None  # its prefix length
        self._documents = 0

    def _build(self) -> None:
        if self._order is not None:
            return
        lengths = self._corpus.lengths()
        self._documents = len(lengths)
        plen = prefix_lengths(lengths, self.prefix_tokens, self.prefix_fraction)
        if self.min_doc_tokens is None:
            eligible = lengths > plen
        else:
            eligible = (lengths >= self.min_doc_tokens) & (lengths >= plen)
        perm = np.random.default_rng(self.seed).permutation(len(lengths))
        order = perm[eligible[perm]]
        del perm, eligible
        if self.num_prompts is not None:
            order = order[: self.num_prompts]
        if len(order) == 0:
            rule = (
                "more tokens than its prefix"
                if self.min_doc_tokens is None
                else f"at least {self.min_doc_tokens} tokens and its prefix"
            )
            raise CookbookError(
                f"no document in {self.path} is long enough for a prompt (one needs {rule}; the longest of its "
                f"{len(lengths)} documents has {int(lengths.max(initial=0))} tokens); lower --prefix-tokens or --min-doc-tokens"
            )
        small = np.int32 if len(lengths) < 2**31 else np.int64
        self._order = order.astype(small)
        self._plen = plen[order].astype(np.int32 if int(plen.max(initial=0)) < 2**31 else np.int64)

    def count(self) -> int:
        """How many prompts the run has."""
        self._build()
        return len(self._order)

    @property
    def documents(self) -> int:
        """Documents in the data (eligible or not)."""
        self._build()
        return self._documents

    def prompts(self, start: int, stop: int) -> list[Prompt]:
        """Prompts ``start .. stop-1`` (as a slice: ``stop`` past the end is cut)."""
        self._build()
        if start < 0 or stop < start:
            raise ValueError(f"bad prompt range [{start}, {stop})")
        out = []
        for i in range(start, min(stop, len(self._order))):
            doc_id, ids = self._corpus.fetch(int(self._order[i]), int(self._plen[i]))
            out.append(Prompt(index=i, doc_id=doc_id, text=self.tokenizer.decode(ids.tolist()), tokens=len(ids)))
        return out

    def identity(self) -> dict:
        """What decides which prompt comes where, JSON-ready, for a run's manifest: the options, the number of
        documents and prompts, and a digest of the order (it changes when the data or numpy's shuffle does)."""
        self._build()
        digest = hashlib.blake2b(digest_size=16)
        digest.update(np.ascontiguousarray(self._order, dtype=np.int64).tobytes())
        digest.update(np.ascontiguousarray(self._plen, dtype=np.int64).tobytes())
        return {
            "prompt_data": self.kind,
            "prefix_tokens": self.prefix_tokens,
            "prefix_fraction": self.prefix_fraction,
            "min_doc_tokens": self.min_doc_tokens,
            "num_prompts": self.num_prompts,
            "seed": self.seed,
            "text_key": self.text_key if self.kind == "jsonl" else None,
            "documents": self._documents,
            "prompts": len(self._order),
            "prompt_order": digest.hexdigest(),
        }
