"""Corpus inputs of every kind, read in bounded blocks: jsonl (plain, gzip, zstd, standard input), parquet, and
Arrow datasets saved by Hugging Face ``datasets.save_to_disk``.

Every input yields the same thing: blocks of documents (one list of values per key, a value being a string or a
list of strings, exactly what ``json.loads`` gives for the jsonl form of the same corpus), the rows it skipped and
how many of its bytes on disk were consumed. Memory is bounded by the block size and the largest document, never
by the size of a file: jsonl is read in blocks (a line longer than a block is gathered in pieces, joined once),
parquet by row group in batches of about a block, Arrow through a memory map in slices of about a block.

Inputs split into contiguous *units* for ``--partitions``: the lines of a plain jsonl file (a line belongs to the
byte range its first byte lies in), a whole compressed file, a parquet row group, an Arrow record batch. Each unit
has an offset in its input's bytes, so a partition (a byte range of all inputs laid end to end) can be read
without reading the others.
"""

from __future__ import annotations

import glob
import json
import mmap
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cookbook.data.jsonl import STDIN, count_lines_before, is_compressed, optional, parse_lines, read_lines, valid_text
from cookbook.errors import CookbookError

JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst", ".jsonl.zstd", ".json.zstd")
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)
CORPUS_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES


@dataclass
class Batch:
    """A block of documents from one input."""

    texts: dict[str, list]  # key -> one value per document
    skipped: list[str]  # "location: why" of rows skipped (--skip-bad-lines)
    nbytes: int  # bytes of the input on disk consumed by this block
    unlisted: int = 0  # rows skipped beyond those in ``skipped`` (a whole file's rows share one entry)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped) + self.unlisted


@dataclass(frozen=True)
class Input:
    """One input file (or Arrow dataset folder, or standard input) and the ``--input`` argument that named it."""

    path: Path
    kind: str  # jsonl | parquet | arrow
    given: str  # the --input argument it came from (per-input counts are reported per argument)
    size: int  # bytes on disk (0 for standard input: unknown)

    @property
    def name(self) -> str:
        return STDIN if self.is_stdin else str(self.path)

    @property
    def is_stdin(self) -> bool:
        return str(self.path) == STDIN

    @property
    def seekable(self) -> bool:
        """Whether a byte range of it can be read on its own (plain jsonl; parquet and Arrow split by unit)."""
        return not self.is_stdin and (self.kind != "jsonl" or not is_compressed(self.path))


def _kind(path: Path) -> str:
    name = path.name
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(ARROW_SUFFIXES) or path.is_dir():
        return "arrow"
    return "jsonl"  # any other file named explicitly is read as jsonl (gzip / zstd by its suffix)


def is_arrow_dataset(folder: Path) -> bool:
    """A folder written by ``datasets.Dataset.save_to_disk``."""
    return (folder / "state.json").is_file() or (
        (folder / "dataset_info.json").is_file() and any(folder.glob("*.arrow"))
    )


def _arrow_files(folder: Path) -> list[Path]:
    """The data files of a saved dataset, in the dataset's order (state.json's list), else sorted."""
    if (folder / "dataset_dict.json").is_file():
        raise CookbookError(f"{folder} is a DatasetDict; give one split's folder, e.g. {folder / 'train'}")
    state = folder / "state.json"
    if state.is_file():
        try:
            meta = json.loads(state.read_text(encoding="utf-8"))
            names = [f["filename"] for f in meta["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise CookbookError(f"{state} is not a datasets state.json ({e})") from e
        if meta.get("_indices_data_files"):
            raise CookbookError(f"{folder} holds an indices mapping; save it with datasets' flatten_indices() first")
        files = [folder / n for n in names]
        for f in files:
            if not f.is_file():
                raise CookbookError(f"{f} is listed in {state} but does not exist")
        return files
    return sorted(folder.glob("*.arrow"))


def _listing(folder: Path) -> list[Path]:
    """A folder's corpus files and saved datasets, sorted by name."""
    if (folder / "dataset_dict.json").is_file():
        raise CookbookError(f"{folder} is a DatasetDict; give one split's folder, e.g. {folder / 'train'}")
    if is_arrow_dataset(folder):
        return [folder]
    return sorted(
        p
        for p in folder.iterdir()
        if (p.is_file() and p.name.endswith(CORPUS_SUFFIXES)) or (p.is_dir() and is_arrow_dataset(p))
    )


def expand(inputs: Sequence[str | os.PathLike]) -> list[Input]:
    """Files, globs, folders and ``-`` -> inputs, in the order given; a glob's and a folder's in sorted order.

    A folder is a saved Arrow dataset itself, or holds corpus files (.jsonl[.gz|.zst|.zstd], .parquet, .arrow)
    and saved datasets side by side, taken in sorted order of their names.
    """
    out: list[Input] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if text == STDIN:
            if any(i.is_stdin for i in out):
                raise CookbookError("standard input (-) can be given only once")
            found = [path]
        elif path.is_dir():
            found = _listing(path)
            if not found:
                raise CookbookError(
                    f"the folder {path} holds no .jsonl[.gz|.zst], .parquet or .arrow files and no saved dataset"
                )
        elif path.is_file():
            found = [path]
        elif glob.has_magic(text):
            found = sorted(
                Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file() or is_arrow_dataset(Path(p))
            )
            if not found:
                raise CookbookError(f"no file matches {text}")
        else:
            raise CookbookError(f"input {text} does not exist")
        for p in found:
            kind = "jsonl" if text == STDIN else _kind(p)
            size = (
                0
                if text == STDIN
                else (sum(f.stat().st_size for f in _arrow_files(p)) if p.is_dir() else p.stat().st_size)
            )
            out.append(Input(p, kind, text, size))
    if not out:
        raise CookbookError("no input given; pass --input FILE, GLOB, FOLDER or -")
    return out


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files, globs and folders -> the jsonl files among them, in the order given (globs and folders sorted)."""
    found = expand(inputs)
    for i in found:
        if i.kind != "jsonl" or i.is_stdin:
            raise CookbookError(f"{i.name} is not a jsonl file; only .jsonl[.gz|.zst] is read here")
    return [i.path for i in found]


def check_inputs(inputs: list[Input], keys: Sequence[str], skip_bad: bool) -> None:
    """Open every parquet and Arrow input and check its columns before any work is done."""
    for inp in inputs:
        if inp.kind == "parquet":
            _ParquetInput(inp, keys, skip_bad).close()
        elif inp.kind == "arrow":
            for f in _arrow_files(inp.path) if inp.path.is_dir() else [inp.path]:
                _open_arrow(f, keys, skip_bad)


# --------------------------------------------------------------------------- jsonl


def _jsonl_batches(inp: Input, keys, skip_bad, block, start, end) -> Iterator[Batch]:
    base: list[int] = []

    def locate(n: int) -> str:  # a range that starts mid-file learns its first line's number only when it reports one
        if start and not base:
            base.append(count_lines_before(inp.path, start))
        return f"{inp.name}:{(base[0] if base else 0) + n}"

    for first, lines, nbytes in read_lines(inp.path, block, start, end):
        texts, skipped = parse_lines(inp.path, first, lines, keys, skip_bad, locate=locate)
        yield Batch(texts, skipped, nbytes)


# --------------------------------------------------------------------------- Arrow columns (parquet and datasets)


def _text_type(pa, t) -> str | None:
    """'str' or 'list' for the column types that hold documents, else None."""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if (
        pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or (hasattr(pa.types, "is_string_view") and pa.types.is_string_view(t))
    ):
        return "str"
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and _text_type(pa, t.value_type) == "str":
        return "list"
    return None


def _check_schema(pa, schema, keys, name: str, skip_bad: bool) -> str | None:
    """None when every key is a text column, else why not (raised unless rows are skipped)."""
    for k in keys:
        if schema.get_field_index(k) < 0:
            problem = f"has no column {k!r} (columns: {', '.join(schema.names)})"
        elif _text_type(pa, schema.field(k).type) is None:
            problem = f"column {k!r} is {schema.field(k).type}, not text (string or list of strings)"
        else:
            continue
        if not skip_bad:
            raise CookbookError(
                f"bad input {name}: {problem}; fix it or pass --skip-bad-lines (which skips every row of it)"
            )
        return problem
    return None


def _byte_lengths(pa, column) -> np.ndarray:
    """Bytes of text per row of a string or list-of-strings column."""
    import pyarrow.compute as pc

    if _text_type(pa, column.type) == "list":
        flat = pc.binary_length(pc.list_flatten(column)).fill_null(0).to_numpy(zero_copy_only=False)
        parents = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
        return np.bincount(parents, weights=flat, minlength=len(column)).astype(np.int64)
    return pc.binary_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


def _slices(lengths: np.ndarray, block: int) -> list[tuple[int, int]]:
    """Cut rows into consecutive slices of about ``block`` bytes (a longer row is a slice of its own)."""
    ends = np.cumsum(lengths)
    cuts, lo, n = [], 0, len(lengths)
    while lo < n:
        base = ends[lo - 1] if lo else 0
        hi = int(np.searchsorted(ends, base + block, side="right"))
        hi = max(hi, lo + 1)
        cuts.append((lo, min(hi, n)))
        lo = hi
    return cuts


def _table_batches(
    pa, table, keys, name: str, first_row: int, skip_bad: bool, block: int, nbytes: int
) -> Iterator[Batch]:
    """Documents of an Arrow table of text columns, in slices of about ``block`` bytes; rows numbered from 1."""
    whole = {}
    for k in keys:
        col = table.column(k).combine_chunks()
        whole[k] = col.dictionary_decode() if pa.types.is_dictionary(col.type) else col
    lengths = sum(_byte_lengths(pa, whole[k]) for k in keys)
    cuts = _slices(lengths, block)
    for j, (lo, hi) in enumerate(cuts):
        columns = {}
        for k in keys:
            col = whole[k].slice(lo, hi - lo)
            try:
                columns[k] = col.to_pylist()
            except UnicodeDecodeError:
                columns[k] = [_decode_row(col, i) for i in range(len(col))]
        texts: dict[str, list] = {k: [] for k in keys}
        skipped: list[str] = []
        for i in range(hi - lo):
            problem = None
            for k in keys:
                why = _row_problem(columns[k][i])
                if why:
                    problem = f"column {k!r} {why}"
                    break
            if problem:
                where = f"{name} row {first_row + lo + i}"
                if not skip_bad:
                    raise CookbookError(f"bad input {where}: {problem}; fix it or pass --skip-bad-lines")
                skipped.append(f"{where}: {problem}")
                continue
            for k in keys:
                texts[k].append(columns[k][i])
        share = nbytes * (j + 1) // len(cuts) - nbytes * j // len(cuts)
        yield Batch(texts, skipped, share)


class _BadUTF8:
    pass


def _decode_row(col, i):
    try:
        return col[i].as_py()
    except UnicodeDecodeError:
        return _BadUTF8()


def _row_problem(value) -> str | None:
    if value is None:
        return "is null"
    if isinstance(value, _BadUTF8) or (isinstance(value, list) and any(isinstance(v, _BadUTF8) for v in value)):
        return "is not valid UTF-8"
    if isinstance(value, list) and any(v is None for v in value):
        return "holds a null string"
    return None if isinstance(value, str) else valid_text(value)


# --------------------------------------------------------------------------- parquet


class _ParquetInput:
    """A parquet file, its schema checked; units are row groups, at their first column chunk's file offset."""

    def __init__(self, inp: Input, keys, skip_bad: bool):
        self.pa = optional("pyarrow", "reading parquet")
        pq = optional("pyarrow.parquet", "reading parquet")
        self.inp, self.keys = inp, list(keys)
        try:
            self.file = pq.ParquetFile(str(inp.path), buffer_size=1 << 20, pre_buffer=False)
            meta = self.file.metadata
        except (OSError, self.pa.ArrowException) as e:
            raise CookbookError(f"{inp.name}: cannot read as parquet ({_first_line(e)}); is the file complete?") from e
        self.problem = _check_schema(self.pa, self.file.schema_arrow, keys, inp.name, skip_bad)
        self.groups = []  # (file offset, first row, rows, compressed bytes, uncompressed bytes)
        row = 0
        for g in range(meta.num_row_groups):
            rg = meta.row_group(g)
            col = rg.column(0)
            offset = (
                col.dictionary_page_offset
                if col.has_dictionary_page and col.dictionary_page_offset
                else col.data_page_offset
            )
            size = sum(rg.column(c).total_compressed_size for c in range(rg.num_columns))
            self.groups.append((offset, row, rg.num_rows, size, rg.total_byte_size))
            row += rg.num_rows

    def close(self) -> None:
        self.file.close()

    def batches(self, block: int, start: int, end: int | None, skip_bad: bool) -> Iterator[Batch]:
        pa = self.pa
        for g, (offset, first, rows, size, raw) in enumerate(self.groups):
            if not (start <= offset and (end is None or offset < end)) or rows == 0:
                continue
            if self.problem:
                yield Batch(
                    {k: [] for k in self.keys},
                    [f"{self.inp.name} rows {first + 1}-{first + rows}: {self.problem}"],
                    size,
                    rows - 1,
                )
                continue
            per_row = max(1, raw // rows)  # decoded bytes per row (of all columns: an upper bound for the keys')
            row = first
            try:
                for chunk in self.file.iter_batches(
                    batch_size=max(1, block // per_row), row_groups=[g], columns=self.keys, use_threads=False
                ):
                    table = pa.Table.from_batches([chunk])
                    yield from _table_batches(
                        pa, table, self.keys, self.inp.name, row + 1, skip_bad, block, size * len(table) // rows
                    )
                    row += len(table)
            except (OSError, pa.ArrowException) as e:
                raise CookbookError(
                    f"{self.inp.name} rows {first + 1}-{first + rows}: cannot read ({_first_line(e)}); is the file complete?"
                ) from e


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# --------------------------------------------------------------------------- Arrow (datasets.save_to_disk)


def _open_arrow(path: Path, keys, skip_bad: bool):
    """(pyarrow, iterator of (start, end) in the file and record batch, schema problem or None).

    The file is memory-mapped, so a batch is read only when it is used. Pages of the batches already handed on
    are released (``madvise(MADV_DONTNEED)``), so resident memory stays that of one batch however large the file.
    """
    pa = optional("pyarrow", "reading Arrow datasets")
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        source = pa.BufferReader(pa.py_buffer(mm))
        try:
            reader = pa.ipc.open_stream(source)
            batches = _stream_batches(reader, source, mm)
        except pa.ArrowInvalid:  # the IPC file format (datasets writes streams; others may not)
            reader = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(mm)))
            batches = _file_batches(reader)
        schema = reader.schema
    except (OSError, ValueError, pa.ArrowException) as e:
        raise CookbookError(f"{path}: cannot read as Arrow ({_first_line(e)}); is the file complete?") from e
    return pa, batches, _check_schema(pa, schema, keys, str(path), skip_bad)


def _stream_batches(reader, source, mm) -> Iterator[tuple[int, int, object]]:
    offset = released = 0
    page = mmap.PAGESIZE
    while True:
        try:
            rb = reader.read_next_batch()
        except StopIteration:
            return
        yield offset, source.tell(), rb
        offset = source.tell()
        upto = offset // page * page
        if hasattr(mm, "madvise") and upto > released:
            mm.madvise(mmap.MADV_DONTNEED, released, upto - released)
            released = upto


def _file_batches(reader) -> Iterator[tuple[int, int, object]]:
    offset = 0
    for i in range(reader.num_record_batches):
        rb = reader.get_batch(i)
        yield offset, offset + rb.nbytes, rb
        offset += rb.nbytes


def _arrow_batches(inp: Input, keys, skip_bad, block, start, end) -> Iterator[Batch]:
    """Record batches of a saved dataset's files; a batch's offset is where it starts in the files laid end to
    end. Rows are numbered through the whole dataset from 1, as ``dataset[row - 1]``."""
    files = _arrow_files(inp.path) if inp.path.is_dir() else [inp.path]
    offset, row = 0, 0
    for f in files:
        size = f.stat().st_size
        pa, batches, problem = _open_arrow(f, keys, skip_bad)
        try:
            for here, there, rb in batches:
                rows, nbytes = rb.num_rows, there - here
                if start <= offset + here and (end is None or offset + here < end) and rows:
                    if problem:
                        yield Batch(
                            {k: [] for k in keys},
                            [f"{inp.name} rows {row + 1}-{row + rows}: {problem}"],
                            nbytes,
                            rows - 1,
                        )
                    else:
                        table = pa.Table.from_batches([rb.select(list(keys))])
                        yield from _table_batches(pa, table, keys, inp.name, row + 1, skip_bad, block, nbytes)
                row += rows
        except (OSError, pa.ArrowException) as e:
            raise CookbookError(f"{f} row {row + 1}: cannot read ({_first_line(e)}); is the file complete?") from e
        offset += size


# --------------------------------------------------------------------------- one entry point


def read(
    inp: Input, keys: Sequence[str], skip_bad: bool, block: int = 1 << 23, start: int = 0, end: int | None = None
) -> Iterator[Batch]:
    """Blocks of documents of ``inp`` whose units start in ``[start, end)`` of its bytes (all of it by default)."""
    if inp.kind == "parquet":
        pf = _ParquetInput(inp, keys, skip_bad)
        try:
            yield from pf.batches(block, start, end, skip_bad)
        finally:
            pf.close()
    elif inp.kind == "arrow":
        yield from _arrow_batches(inp, keys, skip_bad, block, start, end)
    else:
        if (start or end is not None) and not inp.seekable:
            if start > 0 or (end is not None and end <= 0):
                return
            start, end = 0, None  # a compressed file or stdin is one unit, at offset 0
        yield from _jsonl_batches(inp, keys, skip_bad, block, start, end)


@dataclass
class Partition:
    """Partition ``index`` of ``count``: the units whose offset, in all inputs' bytes laid end to end, lies in
    ``[index * total // count, (index + 1) * total // count)``."""

    index: int
    count: int
    ranges: list[tuple[int, int, int | None]] = field(default_factory=list)  # (input index, start, end)


def partition(inputs: list[Input], index: int, count: int) -> Partition:
    total = sum(i.size for i in inputs)
    lo = index * total // count
    hi = (index + 1) * total // count if index + 1 < count else None
    part = Partition(index, count)
    offset = 0
    for n, inp in enumerate(inputs):
        start, end = lo - offset, None if hi is None else hi - offset
        # the input's units lie at [0, size) (an empty input has one place, 0)
        if start < max(inp.size, 1) and (end is None or end > 0):
            part.ranges.append((n, max(0, start), end if end is not None and end < inp.size else None))
        offset += inp.size
    return part


def read_partition(inputs: list[Input], part: Partition | None, keys, skip_bad, block) -> Iterator[tuple[int, Batch]]:
    """(input index, block) over every input, or over one partition's units."""
    if part is None:
        for n, inp in enumerate(inputs):
            for b in read(inp, keys, skip_bad, block):
                yield n, b
        return
    for n, start, end in part.ranges:
        for b in read(inputs[n], keys, skip_bad, block, start, end):
            yield n, b
