"""Reading jsonl corpora fast: inputs by file, glob or folder; large sequential reads; orjson.

Lines are read in blocks of several MB and parsed with orjson (``json`` when orjson is missing or
for the rare line orjson rejects but ``json.loads`` accepts, such as ``NaN``), so what Megatron-LM's
``json.loads`` accepts is accepted here too. Every bad line is reported with its file and line.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from pathlib import Path
from typing import Iterator, Sequence

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

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz")


def expand_inputs(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files, globs and folders -> the list of jsonl files, in the order given (globs and folders sorted)."""
    files: list[Path] = []
    for item in inputs:
        text = str(item)
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(JSONL_SUFFIXES))
            if not found:
                raise CookbookError(f"the folder {path} holds no .jsonl or .jsonl.gz files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif glob.has_magic(text):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not found:
                raise CookbookError(f"no file matches {text}")
            files.extend(found)
        else:
            raise CookbookError(f"input {text} does not exist")
    if not files:
        raise CookbookError("no input given; pass --input FILE, GLOB or FOLDER")
    return files


def _open(path: Path):
    raw = open(path, "rb")
    return raw, (gzip.open(raw) if path.name.endswith(".gz") else raw)


def read_lines(path: Path, block: int = 1 << 23) -> Iterator[tuple[int, list[bytes], int]]:
    """Yield (number of the first line, lines, position in the file on disk) per block."""
    raw, f = _open(path)
    line_no = 1
    rest = b""
    try:
        while True:
            try:
                chunk = f.read(block)
            except (OSError, EOFError, gzip.BadGzipFile) as e:
                raise CookbookError(f"{path}: cannot read ({e}); is the file complete?") from e
            if not chunk:
                break
            chunk = rest + chunk
            cut = chunk.rfind(b"\n")
            if cut < 0:
                rest = chunk
                continue
            lines = chunk[:cut].split(b"\n")
            rest = chunk[cut + 1 :]
            yield line_no, lines, raw.tell()
            line_no += len(lines)
        if rest:
            yield line_no, [rest], raw.tell()
    finally:
        f.close()
        raw.close()


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


def _valid_text(value) -> str | None:
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
    path: Path, first_line: int, lines: list[bytes], keys: Sequence[str], skip_bad: bool,
    fix: str = "fix it or pass --skip-bad-lines",
) -> tuple[dict[str, list], list[str]]:
    """Parse jsonl lines into one value per key and document; blank lines are ignored. A bad line is skipped
    (and reported) with ``skip_bad``, else it ends the run with one line saying ``fix``."""
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
                    why = None if isinstance(obj[k], str) and not slow else _valid_text(obj[k])
                    if why:
                        problem = f"key {k!r} {why}"
                        break
        if problem is not None:
            where = f"{path}:{n}: {problem}"
            if not skip_bad:
                raise CookbookError(f"bad input line {where}; {fix}")
            skipped.append(where)
            continue
        for k, col in zip(keys, columns):
            col.append(obj[k])
    return texts, skipped
