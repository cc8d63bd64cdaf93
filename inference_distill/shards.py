"""Sharded jsonl output that a killed run resumes without duplicates or gaps.

A run's prompts are numbered 0..total-1 (``PromptSource``) and cut into fixed blocks: shard ``k`` holds the kept
records of prompts ``[k * B, min((k + 1) * B, total))``, the final partial block included. The output folder:

``manifest.json``            what decides which prompts go where and what they produce (the caller's ``identity``
                             dict), the prompt count and ``prompts_per_shard``; written first. Reopening the folder
                             with a different manifest is refused, so a resume never mixes two runs.
``shard_00000.stats.json``   shard 0's stats (prompts, records, completions, generated tokens, filtered counts, ...)
                             and the dedup hashes of its kept records;
``shard_00000.jsonl``        shard 0's records, one JSON object per line;
``summary.json``             the totals, once every shard is written.

Each file is written under a temporary name, flushed to disk and renamed into place. A shard's stats are renamed
into place before its records, and **the records file is the commit point**: a shard is done when
``shard_K.jsonl`` exists (its stats always exist by then), so a reader that globs ``shard_*.jsonl`` in an
unfinished folder (``distill train``) only ever sees complete shards. A crash at any instant leaves: shards that
are done, perhaps the stats of the next one without its records (removed on reopen; the shard is redone), and
temporary files (removed on reopen). Nothing else. A resumed run regenerates exactly the missing shards; when the
backend is deterministic for a prompt and its seed, the output equals an uninterrupted run's byte for byte.

The dedup state is the hashes of the kept records, stored with each shard's stats, so a resumed ``Filter`` starts
from exactly what an uninterrupted run would hold at that shard. The lock file ``.lock`` keeps two runs from
writing one folder at once (where the filesystem supports ``flock``).

A first run that ends with an error (a teacher that fails to load, Ctrl-C) before it wrote a shard leaves nothing
behind: its manifest, its lock file and the folder, if it made it, are removed, so the next run starts afresh with
any flags. A folder refused (foreign files, another run's manifest) is left exactly as it was.

A driver loop (``recipes/distill.py``)::

    source = PromptSource(data, tokenizer, prefix_tokens=128, seed=seed)
    identity = {**source.identity(), "teacher": backend.teacher, "sampling": params.to_dict(), "filters": asdict(fcfg), ...}
    with ShardWriter(output, identity, source.count(), prompts_per_shard=2048) as writer:
        filt = Filter(fcfg, seen=writer.seen_hashes())
        for k in writer.pending():
            prompts = source.prompts(*writer.bounds(k))
            outs = backend.generate([p.text for p in prompts], params, seeds=[seed + p.index for p in prompts])
            records = []
            for p, completions in zip(prompts, outs):
                for c in completions:
                    text = p.text + c.text if with_prompt else c.text
                    if filt.keep(text, c) is None:
                        records.append({"text": text, "prefix": p.text, "doc_id": p.doc_id, ...})
            stats, hashes = filt.end_shard()
            writer.write(k, records, stats, hashes)
        summary = writer.finish()
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from cookbook.data.jsonl import dumps
from cookbook.errors import CookbookError
from cookbook.fileio import atomic_paths

FORMAT = "cookbook-distill-shards/1"
MANIFEST = "manifest.json"
SUMMARY = "summary.json"
LOCK = ".lock"
RESERVED = ("shard", "first_prompt", "prompts", "records", "hashes")  # stats keys the writer sets itself
_TEMPORARY = re.compile(r"^\.(manifest\.json|summary\.json|shard_\d+\.jsonl|shard_\d+\.stats\.json)\.tmp-\d+$")
_STATS = re.compile(r"^shard_(\d+)\.stats\.json$")


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_durable(path: Path, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` under a temporary name, fsync, rename into place, fsync the folder."""
    with atomic_paths(path) as (tmp,):
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    _fsync_dir(path.parent)


def _json(obj) -> bytes:
    return (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def _add(total: dict, part: dict) -> None:
    """``total += part`` for numbers, recursively for dicts; other values are not summed."""
    for key, value in part.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            total[key] = total.get(key, 0) + value
        elif isinstance(value, dict):
            _add(total.setdefault(key, {}), value)


class ShardWriter:
    """Opens (or creates) an output folder for ``total`` prompts in shards of ``prompts_per_shard``.

    ``identity``: JSON-ready dict of everything that decides the output (flags, ``PromptSource.identity()``, the
    teacher, sampling and filter settings). Resuming with a different identity is a CookbookError naming the first
    key that differs. Use as a context manager, or call ``close()`` (``finish()`` closes too).
    """

    def __init__(self, folder: str | os.PathLike, identity: dict, total: int, prompts_per_shard: int):
        if total < 0:
            raise ValueError(f"total {total} is negative")
        if prompts_per_shard < 1:
            raise CookbookError(f"prompts per shard {prompts_per_shard} must be at least 1")
        self.folder = Path(folder)
        self.total, self.prompts_per_shard = total, prompts_per_shard
        self.num_shards = -(-total // prompts_per_shard)
        if self.folder.exists() and not self.folder.is_dir():
            raise CookbookError(f"output {self.folder} is a file; give a folder for the shards")
        self._check_empty_or_ours()  # before the lock file: a refused folder gains nothing
        self._made_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._made_lock = not (self.folder / LOCK).exists()
        self._new = False  # this writer made the manifest
        self._done: dict[int, dict] = {}
        self._lock = self._acquire()
        try:
            self.manifest = {
                "format": FORMAT,
                "identity": json.loads(json.dumps(identity)),  # as it reads back: tuples become lists
                "prompts": total,
                "prompts_per_shard": prompts_per_shard,
                "shards": self.num_shards,
            }
            self._open_manifest()
            self._clean()
            self._done = {
                k: self._read_stats(k)
                for k in range(self.num_shards)
                if self.shard_path(k).exists() and self.stats_path(k).exists()
            }
        except BaseException:
            self._discard()
            raise

    # ----------------------------------------------------------------------- opening

    def _check_empty_or_ours(self) -> None:
        if not self.folder.is_dir() or (self.folder / MANIFEST).exists():
            return
        others = [p.name for p in self.folder.iterdir() if not p.name.startswith(".")]
        if others:
            raise CookbookError(
                f"{self.folder} is not empty and holds no {MANIFEST} (it has {sorted(others)[0]}); choose a new or empty --output"
            )

    def _discard(self) -> None:
        """Close; and when this writer made the manifest but wrote no shard, remove the manifest, then the lock file and
        the folder where this writer made them (and nothing else is there)."""
        self.close()
        if self._new and not self._done:
            (self.folder / MANIFEST).unlink(missing_ok=True)
        if self._made_lock and not (self.folder / MANIFEST).exists():
            (self.folder / LOCK).unlink(missing_ok=True)
            if self._made_folder:
                with contextlib.suppress(OSError):  # not empty: something else is there, keep it
                    self.folder.rmdir()

    def _acquire(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not on POSIX
            return None
        f = open(self.folder / LOCK, "a+b")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise CookbookError(
                f"another run is writing to {self.folder}; wait for it to end or choose another --output"
            ) from None
        except OSError:  # a filesystem without flock: go on unlocked
            pass
        return f

    def _open_manifest(self) -> None:
        path = self.folder / MANIFEST
        if not path.exists():
            self._check_empty_or_ours()
            _write_durable(path, [_json(self.manifest)])
            self._new = True
            return
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise CookbookError(f"{path} is not valid JSON; was it edited? Choose a new --output") from None
        if not isinstance(old, dict) or old.get("format") != FORMAT:
            raise CookbookError(
                f"{path} was not written by this version of cookbook distill generate; choose a new --output"
            )
        mine, theirs = self.manifest["identity"], old.get("identity", {})
        diffs = [
            (k, theirs.get(k), mine.get(k)) for k in sorted(set(mine) | set(theirs)) if theirs.get(k) != mine.get(k)
        ]
        diffs += [
            (k, old.get(k), self.manifest[k])
            for k in ("prompts", "prompts_per_shard")
            if old.get(k) != self.manifest[k]
        ]
        if diffs:
            key, was, now = diffs[0]
            raise CookbookError(
                f"{self.folder} holds a run with {key} = {json.dumps(was)} but this run has {key} = {json.dumps(now)}; "
                "resume with the same flags, or choose a new --output"
            )

    def _clean(self) -> None:
        """Remove what a killed run left: temporary files, and stats whose shard was never renamed into place."""
        for p in self.folder.iterdir():
            m = _STATS.match(p.name)
            if _TEMPORARY.match(p.name) or (m and not self.shard_path(int(m.group(1))).exists()):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def _read_stats(self, k: int) -> dict:
        path = self.stats_path(k)
        try:
            stats = json.loads(path.read_text(encoding="utf-8"))
        except ValueError:
            raise CookbookError(
                f"{path} is not valid JSON; delete it and {self.shard_path(k).name} to generate that shard again"
            ) from None
        stats.pop("hashes", None)
        return stats

    # ----------------------------------------------------------------------- the API

    def shard_path(self, k: int) -> Path:
        return self.folder / f"shard_{k:05d}.jsonl"

    def stats_path(self, k: int) -> Path:
        return self.folder / f"shard_{k:05d}.stats.json"

    def bounds(self, k: int) -> tuple[int, int]:
        """The prompts of shard ``k``: ``[start, stop)``."""
        if not 0 <= k < self.num_shards:
            raise ValueError(f"shard {k} is not in 0..{self.num_shards - 1}")
        start = k * self.prompts_per_shard
        return start, min(start + self.prompts_per_shard, self.total)

    def pending(self) -> list[int]:
        """Shards not written yet, in order."""
        return [k for k in range(self.num_shards) if k not in self._done]

    def done_stats(self) -> dict[int, dict]:
        """The stats of every shard written (by this run or an earlier one), by shard index."""
        return dict(self._done)

    def totals(self) -> dict:
        """The stats of the written shards summed (``shards``, ``prompts``, ``records``, ``completions``,
        ``generated_tokens``, ``filtered`` per reason, and whatever else the stats held as numbers)."""
        total: dict = {"shards": 0, "prompts": 0, "records": 0}
        for stats in self._done.values():
            total["shards"] += 1
            _add(total, {k: v for k, v in stats.items() if k not in ("shard", "first_prompt")})
        return total

    def seen_hashes(self) -> set[bytes]:
        """The dedup keys of every record already written: a resumed ``Filter`` starts from them."""
        seen: set[bytes] = set()
        for k in self._done:
            seen.update(
                bytes.fromhex(h) for h in json.loads(self.stats_path(k).read_text(encoding="utf-8")).get("hashes", [])
            )
        return seen

    def write(self, k: int, records: list[dict], stats: dict | None = None, hashes: Iterable[bytes] = ()) -> None:
        """Write shard ``k``: its stats and ``hashes`` (the dedup keys of its records) first, then its records."""
        start, stop = self.bounds(k)
        stats = dict(stats or {})
        clash = [key for key in RESERVED if key in stats]
        if clash:
            raise ValueError(f"stats may not set {clash}: the writer sets them")
        side = {"shard": k, "first_prompt": start, "prompts": stop - start, "records": len(records), **stats}
        _write_durable(self.stats_path(k), [_json({**side, "hashes": [h.hex() for h in hashes]})])
        _write_durable(self.shard_path(k), (dumps(r) + b"\n" for r in records))
        self._done[k] = side

    def finish(self) -> dict:
        """Write ``summary.json`` (every shard must be written) and close; returns the summary."""
        missing = self.pending()
        if missing:
            raise ValueError(f"shards {missing[:5]} are not written yet")
        summary = self.totals()
        _write_durable(self.folder / SUMMARY, [_json(summary)])
        self.close()
        return summary

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the flock
            self._lock = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self._discard()
