"""Megatron-LM's indexed dataset: ``PREFIX.bin`` (token ids) + ``PREFIX.idx`` (the ``MMIDIDX`` index).

``.idx``, little-endian: magic ``MMIDIDX\\x00\\x00`` (9 bytes), version ``<Q`` = 1, dtype code ``<B``,
sequence count ``<Q``, document count ``<Q``; then sequence lengths int32[sequences], sequence
pointers int64[sequences] (byte offsets into ``.bin``), document indices int64[documents].
``.bin`` is the token arrays concatenated, no header. Document indices start at 0 and each document
appends the running sequence count, so a document that tokenized to nothing repeats an entry.

Everything written here is byte for byte what megatron-core's ``IndexedDatasetBuilder`` writes.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import numpy as np

from cookbook.errors import CookbookError
from cookbook.fileio import atomic_paths

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count

DTYPE_CODES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def optimal_dtype(vocab_size: int) -> type:
    """Megatron-LM's choice: uint16 when the vocabulary has fewer than 65,500 ids, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def dataset_prefix(path: str | os.PathLike) -> str:
    """A dataset's prefix from what a user may give: ``PREFIX``, ``PREFIX.bin`` or ``PREFIX.idx``."""
    path = str(path)
    return path[:-4] if path.endswith((".bin", ".idx")) else path


def output_prefix(prefix: str, key: str) -> str:
    """Megatron-LM's naming of preprocess's outputs: ``{prefix}_{key}_document``."""
    return f"{prefix}_{key}_document"


def part_name(index: int, count: int) -> str:
    """The name of partition ``index`` of ``count`` (preprocess --partitions)."""
    return f"{index:05d}-of-{count:05d}"


def bin_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | os.PathLike) -> Path:
    return Path(f"{prefix}.idx")


def write_index(path, dtype, sequence_lengths: np.ndarray, document_indices: np.ndarray, chunk: int = 1 << 22) -> None:
    """Write an ``.idx`` file for sequences of the given lengths and document boundaries.

    The arrays may be memory maps of any size: they are read and the pointers computed ``chunk`` entries at a time.
    """
    dtype = np.dtype(dtype)
    n_seq, n_doc = len(sequence_lengths), len(document_indices)
    with open(path, "wb") as f:
        f.write(HEADER.pack(MAGIC, VERSION, CODE_OF[dtype], n_seq, n_doc))
        for lo in range(0, n_seq, chunk):
            f.write(np.ascontiguousarray(sequence_lengths[lo : lo + chunk], dtype=np.int32).data)
        start = 0
        for lo in range(0, n_seq, chunk):
            sizes = np.asarray(sequence_lengths[lo : lo + chunk], dtype=np.int64) * dtype.itemsize
            ends = np.cumsum(sizes) + start
            f.write((ends - sizes).data)  # each sequence's byte offset: the running sum before it
            start = int(ends[-1])
        for lo in range(0, n_doc, chunk):
            f.write(np.ascontiguousarray(document_indices[lo : lo + chunk], dtype=np.int64).data)


class _Spill:
    """An append-only array in a file: the index of a dataset of billions of documents is not held in memory."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype, self.count = path, np.dtype(dtype), 0
        self.file = open(path, "wb", buffering=1 << 20)

    def append(self, values: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(values, dtype=self.dtype).data)
        self.count += len(values)

    def array(self) -> np.ndarray:
        self.file.close()
        return np.memmap(self.path, dtype=self.dtype, mode="r") if self.count else np.zeros(0, self.dtype)

    def remove(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


class IndexedDatasetWriter:
    """Append documents to a ``.bin`` and write the ``.idx`` at the end, at a temporary path that is
    renamed into place only on success (use as a context manager).

    Memory stays flat however many documents are written: tokens go straight to the ``.bin`` (through a 1 MiB
    buffer), and sequence lengths and document indices to temporary files beside it until the ``.idx`` is written.
    """

    def __init__(self, prefix: str | os.PathLike, dtype):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self._sequences = 0
        self._ctx = None
        self.tokens = 0
        self.documents = 0

    def __enter__(self):
        self._ctx = atomic_paths(bin_path(self.prefix), idx_path(self.prefix))
        self._bin_tmp, self._idx_tmp = self._ctx.__enter__()
        self._file = open(self._bin_tmp, "wb", buffering=1 << 20)
        self._lengths = _Spill(Path(f"{self._idx_tmp}.lengths"), np.int32)
        self._docs = _Spill(Path(f"{self._idx_tmp}.docs"), np.int64)
        self._docs.append(np.zeros(1, np.int64))
        return self

    def __exit__(self, exc_type, exc, tb):
        failure = None
        try:
            if exc_type is None:
                try:
                    self._file.close()
                    write_index(self._idx_tmp, self.dtype, self._lengths.array(), self._docs.array())
                except BaseException as e:  # finishing failed: clean up as for any other failure
                    failure = e
                    exc_type, exc, tb = type(e), e, e.__traceback__
        finally:
            self._file.close()
            self._lengths.remove()
            self._docs.remove()
        self._ctx.__exit__(exc_type, exc, tb)  # renames on success, removes the temporary files on failure
        if failure is not None:
            raise failure
        return False

    @property
    def sequences(self) -> int:
        return self._sequences

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray, sequences_per_document: np.ndarray | None = None):
        """Append documents given as a flat token array and their sequence lengths.

        Without ``sequences_per_document`` each length is one document; a length of 0 is a document
        that tokenized to nothing: it adds no sequence but still appends a document index, as
        Megatron-LM does.
        """
        lengths = np.asarray(lengths, dtype=np.int64)
        if sequences_per_document is None:
            nonempty = lengths > 0
            seq_lengths = lengths[nonempty]
            per_doc = nonempty.astype(np.int64)
        else:
            seq_lengths = lengths
            per_doc = np.asarray(sequences_per_document, dtype=np.int64)
        self._file.write(np.ascontiguousarray(tokens, dtype=self.dtype).data)
        self._lengths.append(seq_lengths)
        self._docs.append(self._sequences + np.cumsum(per_doc))
        self._sequences += int(len(seq_lengths))
        self.tokens += int(len(tokens))
        self.documents += int(len(per_doc))

    def add_dataset(self, prefix: str | os.PathLike, chunk: int = 1 << 22) -> None:
        """Append a whole indexed dataset: its .bin byte for byte, its index shifted (Megatron's add_index)."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise CookbookError(
                f"{prefix} holds {other.dtype.name} tokens but the merge is writing {self.dtype.name}; "
                "datasets made with tokenizers of different vocabulary sizes cannot be merged"
            )
        self._file.flush()
        with open(bin_path(prefix), "rb") as f:
            shutil.copyfileobj(f, self._file, 1 << 24)
        for lo in range(0, len(other.sequence_lengths), chunk):
            self._lengths.append(other.sequence_lengths[lo : lo + chunk])
        docs = other.document_indices
        for lo in range(1, len(docs), chunk):
            self._docs.append(self._sequences + docs[lo : lo + chunk])
        self._sequences += len(other.sequence_lengths)
        self.tokens += int(other.sequence_lengths.sum(dtype=np.int64))
        self.documents += len(docs) - 1


class IndexedDataset:
    """Read-only view of an indexed dataset (memory-mapped)."""

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = str(prefix)
        idx, binf = idx_path(prefix), bin_path(prefix)
        for f in (idx, binf):
            if not f.exists():
                raise CookbookError(f"{f} does not exist; give the dataset prefix without .bin/.idx")
        with open(idx, "rb") as f:
            head = f.read(HEADER.size)
        if len(head) < HEADER.size or head[:9] != MAGIC:
            raise CookbookError(f"{idx} is not a Megatron indexed dataset index (bad magic)")
        _, version, code, n_seq, n_doc = HEADER.unpack(head)
        if version != VERSION:
            raise CookbookError(f"{idx} has index version {version}; only version {VERSION} is supported")
        if code not in DTYPE_CODES:
            raise CookbookError(f"{idx} has an unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = HEADER.size + n_seq * 4 + n_seq * 8 + n_doc * 8
        if idx.stat().st_size < expected:
            raise CookbookError(f"{idx} is truncated: {idx.stat().st_size} bytes, expected {expected}")
        buf = np.memmap(idx, mode="r", dtype=np.uint8)
        off = HEADER.size
        self.sequence_lengths = np.frombuffer(buf, np.int32, n_seq, off)
        off += n_seq * 4
        self.sequence_pointers = np.frombuffer(buf, np.int64, n_seq, off)
        off += n_seq * 8
        self.document_indices = np.frombuffer(buf, np.int64, n_doc, off)
        n_tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        if binf.stat().st_size != n_tokens * self.dtype.itemsize:
            raise CookbookError(
                f"{binf} has {binf.stat().st_size} bytes but its index describes {n_tokens} tokens "
                f"({n_tokens * self.dtype.itemsize} bytes); the pair does not belong together"
            )
        self.bin = np.memmap(binf, mode="r", dtype=self.dtype) if n_tokens else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        """Number of sequences."""
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.sequence_pointers[i]) // self.dtype.itemsize
        return self.bin[start : start + int(self.sequence_lengths[i])]

    def document(self, d: int) -> np.ndarray:
        """All tokens of document ``d`` (its sequences concatenated)."""
        lo, hi = int(self.document_indices[d]), int(self.document_indices[d + 1])
        if lo == hi:
            return np.zeros(0, self.dtype)
        start = int(self.sequence_pointers[lo]) // self.dtype.itemsize
        return self.bin[start : start + int(self.sequence_lengths[lo:hi].sum(dtype=np.int64))]


def dataset_prefixes(folder: str | os.PathLike) -> list[str]:
    """Every ``.bin``/``.idx`` pair in ``folder``, in ``sorted()`` order, as Megatron-LM's merge takes them."""
    folder = Path(folder)
    names = {p.name[:-4] for p in folder.iterdir() if p.is_file() and p.suffix in (".bin", ".idx")}
    for name in sorted(names):
        for ext in (".bin", ".idx"):
            if not (folder / (name + ext)).exists():
                raise CookbookError(f"{folder / name} has no {ext} file; every dataset needs both .bin and .idx")
    return [str(folder / name) for name in sorted(names)]
