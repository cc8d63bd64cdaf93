"""Reading jsonl corpora fast (plain, gzip, zstd or standard input): large sequential reads; orjson.

Lines are read in blocks of several MB and parsed with orjson (``json`` when orjson is missing or
for the rare line orjson rejects but ``json.loads`` accepts, such as ``NaN``), so what Megatron-LM's
``json.loads`` accepts is accepted here too. Every bad line is reported with its file and line.
"""

from __future__ import annotations

import gzip
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from cookbook.errors import CookbookError

try:
    import orjson

    _loads = orjson.loads
    _JSONError: tuple[type[Exception], ...] = (orjson.JSONDecodeError,)

    def dumps(obj) -> bytes:
        return orjson.dumps(obj)

except ImportError:  # pragma: no cover - orjson is a dependency; the GPU image may lack it
    _loads = json.loads
    _JSONError = (ValueError,)

    def dumps(obj) -> bytes:
        return json.dumps(obj, ensure_ascii=False).encode("utf-8")


STDIN = "-"


def optional(module: str, what: str):
    """Import an optional dependency of the ``data`` extra, or say in one line how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise CookbookError(f"{what} needs {module}; pip install 'cookbook[data]'") from e


class _Zstd:
    """A zstd stream read frame by frame. A frame cut short is an error (python-zstandard's stream reader would
    return what it had and stop). Input is fed 16 KiB at a time and output handed on ``n`` bytes at a time, so
    memory stays bounded however well the text compresses."""

    def __init__(self, raw):
        self.raw = raw
        self.dctx = optional("zstandard", "reading .zst files").ZstdDecompressor()
        self.obj, self.fed, self.pending = self.dctx.decompressobj(), False, b""
        self.out = bytearray()

    def read(self, n: int) -> bytes:
        while len(self.out) < n:
            data = self.pending or self.raw.read(1 << 14)
            self.pending = b""
            if not data:
                if self.fed and not self.obj.eof:
                    raise EOFError("the last zstd frame is cut short")
                break
            self.fed = True
            self.out += self.obj.decompress(data)
            if self.obj.eof:  # a frame ended: the rest of the data starts the next one
                self.pending, self.obj, self.fed = self.obj.unused_data, self.dctx.decompressobj(), False
        chunk = bytes(self.out[:n])
        del self.out[:n]
        return chunk

    def close(self) -> None:
        pass


def is_compressed(path: Path) -> bool:
    return path.name.endswith((".gz", ".zst", ".zstd"))


def _open(path: Path):
    """(raw file, the stream of its decompressed bytes); ``-`` is standard input."""
    if str(path) == STDIN:
        return sys.stdin.buffer, sys.stdin.buffer
    raw = open(path, "rb")
    if path.name.endswith(".gz"):
        return raw, gzip.open(raw)
    if path.name.endswith((".zst", ".zstd")):
        return raw, _Zstd(raw)
    return raw, raw


def _read_errors() -> tuple[type[BaseException], ...]:
    zstd = sys.modules.get("zstandard")
    return (OSError, EOFError, gzip.BadGzipFile) + ((zstd.ZstdError,) if zstd else ())


def read_lines(
    path: Path, block: int = 1 << 23, start: int = 0, end: int | None = None
) -> Iterator[tuple[int, list[bytes], int]]:
    """Yield (number of the first line, lines, bytes of the file on disk consumed) per block of about ``block``.

    With ``start``/``end`` (plain files only): the lines whose first byte lies in ``[start, end)``, numbered
    from 1 at the range's first line. A line longer than a block is gathered in pieces and joined once, so a
    huge document costs its own size, never the file's.
    """
    path = Path(path)
    stdin = str(path) == STDIN
    raw, f = _open(path)
    try:
        if start:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                _rest_of_line(f, block, keep=False)  # a line that started before the range is not ours
        left = None if end is None else max(0, end - f.tell())
        last = 0 if stdin else raw.tell()
        line_no, parts = 1, []
        while True:
            want = block if left is None else min(block, left)
            try:
                chunk = f.read(want) if want else b""
                if not chunk and want == 0 and parts:  # the range ends inside a line: it is ours to its end
                    parts.append(_rest_of_line(f, block).rstrip(b"\n"))
            except _read_errors() as e:
                raise CookbookError(f"{path}: cannot read ({e}); is the file complete?") from e
            if not chunk:
                break
            if left is not None:
                left -= len(chunk)
            if chunk.rfind(b"\n") < 0:
                parts.append(chunk)
                continue
            lines = chunk.split(b"\n")
            tail = lines.pop()  # after the last newline: the start of a line the next block ends
            if parts:
                lines[0] = b"".join([*parts, lines[0]])
            parts = [tail] if tail else []
            pos = last + len(chunk) if stdin else raw.tell()
            yield line_no, lines, pos - last
            last = pos
            line_no += len(lines)
        if parts:
            pos = last if stdin else raw.tell()
            yield line_no, [b"".join(parts)], pos - last
    finally:
        if f is not raw:
            f.close()
        if not stdin:
            raw.close()


def _rest_of_line(f, block: int, keep: bool = True) -> bytes:
    """Read up to and including the next newline (or to the end of the file)."""
    parts = []
    while True:
        chunk = f.read(min(block, 1 << 20))
        if not chunk:
            break
        cut = chunk.find(b"\n")
        if cut >= 0:
            f.seek(cut + 1 - len(chunk), os.SEEK_CUR)
            if keep:
                parts.append(chunk[: cut + 1])
            break
        if keep:
            parts.append(chunk)
    return b"".join(parts)


def count_lines_before(path: Path, start: int) -> int:
    """How many lines of a plain file start before the first line that starts at or after ``start``."""
    with open(path, "rb") as f:
        if start:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                _rest_of_line(f, 1 << 20, keep=False)
        offset = f.tell()
        f.seek(0)
        n = 0
        while offset > 0:
            chunk = f.read(min(offset, 1 << 24))
            if not chunk:
                break
            n += chunk.count(b"\n")
            offset -= len(chunk)
    return n


def _parse_slow(line: bytes):
    """What orjson refused: decode as ``json.loads`` would, or say why the line is bad."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"invalid UTF-8 at byte {e.start}"
    try:
        obj = json.loads(text)
    except ValueError as e:
        return None, f"not valid JSON ({e})"
    return obj, None


def valid_text(value) -> str | None:
    """None when the value can be tokenized, else why not."""
    if isinstance(value, str):
        values = [value]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        values = value
    else:
        return f"is {type(value).__name__}, not a string"
    for v in values:
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return "holds a lone surrogate (invalid Unicode)"
    return None


def parse_lines(
    path: Path,
    first_line: int,
    lines: list[bytes],
    keys: Sequence[str],
    skip_bad: bool,
    locate: Callable[[int], str] | None = None,
    fix: str = "fix it or pass --skip-bad-lines",
) -> tuple[dict[str, list], list[str]]:
    """Parse jsonl lines into one value per key and document; blank lines are ignored. ``locate(n)`` names
    line ``n`` in messages (default ``path:n``). A bad line is skipped (and reported) with ``skip_bad``, else it
    ends the run with one line saying ``fix``."""
    texts: dict[str, list] = {k: [] for k in keys}
    columns = [texts[k] for k in keys]
    skipped: list[str] = []
    for n, line in enumerate(lines, first_line):
        problem, slow = None, _loads is json.loads
        try:
            obj = _loads(line)
        except _JSONError:
            if not line.strip():
                continue
            obj, problem = _parse_slow(line)
            slow = True
        if problem is None:
            if not isinstance(obj, dict):
                problem = f"is a JSON {type(obj).__name__}, not an object"
            else:
                for k in keys:
                    if k not in obj:
                        problem = f"has no key {k!r}"
                        break
                    # orjson never yields lone surrogates; json.loads and lists need a look
                    why = None if isinstance(obj[k], str) and not slow else valid_text(obj[k])
                    if why:
                        problem = f"key {k!r} {why}"
                        break
        if problem is not None:
            where = f"{locate(n) if locate else f'{path}:{n}'}: {problem}"
            if not skip_bad:
                raise CookbookError(f"bad input line {where}; {fix}")
            skipped.append(where)
            continue
        for k, col in zip(keys, columns):
            col.append(obj[k])
    return texts, skipped
