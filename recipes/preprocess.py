"""``cookbook preprocess``: a corpus in, Megatron indexed dataset out, byte-identical to Megatron-LM.

Megatron-LM's ``tools/preprocess_data.py`` sends every line through a process pool that calls
``json.loads`` and ``tokenizer.tokenize`` once per document. Here the main work is batched: a reader
thread parses blocks of documents (orjson for jsonl; pyarrow for parquet and Arrow) while the tokenizer
encodes the previous block in its native threads (``--workers`` of them), and token arrays are written in
large sequential writes. The ids, the dtype, the document order, the handling of empty documents and
``--append-eod`` are Megatron-LM's, so the ``.bin``/``.idx`` bytes are the same.

``--partitions N`` cuts the inputs, laid end to end, into N contiguous byte ranges (``cookbook.data.sources``)
and writes each to ``PREFIX_KEY_document.parts/IIIII-of-NNNNN.bin/.idx``; a partition is done once its
``.json`` record is there, so a run started again after a crash redoes only the others. Merged in order,
the partitions are the one-pass dataset byte for byte. ``--partition-index i`` does partition i alone (one
task of a SLURM array); ``cookbook merge`` of the parts folder then gives the same bytes.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import shutil
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from cookbook.data.indexed import IndexedDatasetWriter, bin_path, idx_path, optimal_dtype, output_prefix, part_name
from cookbook.data.sources import Input, Partition, check_inputs, expand, partition, read_partition
from cookbook.data.tokenizer import Tokenizer, encode_documents, load_tokenizer
from cookbook.errors import CookbookError
from cookbook.fileio import check_writable, write_text_atomic
from cookbook.progress import rate_progress

SKIPPED_KEPT = 100  # locations of skipped rows kept for the summary; the rest are counted


@dataclass
class PreprocessConfig:
    inputs: list[str]
    output_prefix: str
    tokenizer_model: str | None = None
    tokenizer_type: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    json_keys: list[str] = field(default_factory=lambda: ["text"])
    append_eod: bool = False
    workers: int = max(1, os.cpu_count() or 1)
    skip_bad_lines: bool = False
    tokenizer_backend: str = "auto"
    block_mb: float = 2.0  # bytes of input per block: 2 MB measured as fast as 8 MB, with a lower, flatter peak
    partitions: int = 1
    partition_index: int | None = None  # do only this partition (of ``partitions``), and merge nothing
    jobs: int = 1  # partitions written at once, each in its own process


@dataclass
class InputCounts:
    documents: int = 0
    skipped: int = 0
    bytes: int = 0


@dataclass
class PreprocessSummary:
    outputs: dict[str, str]  # json key -> output prefix
    documents: int = 0
    sequences: int = 0
    tokens: int = 0
    empty: int = 0  # documents that tokenized to nothing (kept in the index, as Megatron-LM does)
    skipped: list[str] = field(default_factory=list)  # the first SKIPPED_KEPT skipped rows: "location: why"
    skipped_rows: int = 0
    bytes: int = 0
    seconds: float = 0.0
    tokenizer: str = ""
    inputs: dict[str, InputCounts] = field(default_factory=dict)  # per --input argument
    partitions_reused: int = 0
    partitions_done: int = 0

    def add(self, other: PreprocessSummary) -> None:
        """Add a partition's counts."""
        for name in ("documents", "sequences", "tokens", "empty", "skipped_rows", "bytes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.skipped.extend(other.skipped[: max(0, SKIPPED_KEPT - len(self.skipped))])
        for given, c in other.inputs.items():
            mine = self.inputs.setdefault(given, InputCounts())
            mine.documents, mine.skipped, mine.bytes = (
                mine.documents + c.documents,
                mine.skipped + c.skipped,
                mine.bytes + c.bytes,
            )


HANDOFF = {"main thread waited": 0.0, "reader thread waited": 0.0}  # seconds, summed over runs (bench --profile)


def _prefetch(iterator, depth: int = 2):
    """Run ``iterator`` in a thread, ``depth`` items ahead; its exceptions surface in the caller. The time each
    side spends waiting for the other is added to ``HANDOFF``."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def work():
        try:
            for item in iterator:
                t = time.perf_counter()
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                HANDOFF["reader thread waited"] += time.perf_counter() - t
                if stop.is_set():
                    return
            q.put((end, None))
        except BaseException as e:  # handed to the consumer
            q.put((None, e))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            t = time.perf_counter()
            item, error = q.get()
            HANDOFF["main thread waited"] += time.perf_counter() - t
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()


def parts_folder(prefix: str) -> Path:
    """Where ``--partitions`` writes a dataset's partitions: ``PREFIX.parts/``."""
    return Path(f"{prefix}.parts")


def _check(cfg: PreprocessConfig) -> None:
    if not cfg.json_keys:
        raise CookbookError("--json-keys needs at least one key")
    if cfg.workers < 1:
        raise CookbookError(f"--workers must be at least 1, got {cfg.workers}")
    if cfg.partitions < 1:
        raise CookbookError(f"--partitions must be at least 1, got {cfg.partitions}")
    if cfg.jobs < 1:
        raise CookbookError(f"--jobs must be at least 1, got {cfg.jobs}")
    if cfg.partition_index is not None and not 0 <= cfg.partition_index < cfg.partitions:
        raise CookbookError(
            f"--partition-index must be in [0, {cfg.partitions}) for --partitions {cfg.partitions}, got {cfg.partition_index}"
        )


def _fingerprint(cfg: PreprocessConfig, inputs: list[Input], tok: Tokenizer) -> dict:
    """What decides a partition's bytes: the inputs (names, sizes, times), the tokenizer and the flags."""

    def stamp(path) -> list:
        p = Path(path)
        files = sorted(p.rglob("*")) if p.is_dir() else [p]
        return [
            str(p),
            sum(f.stat().st_size for f in files if f.is_file()),
            max((f.stat().st_mtime_ns for f in files if f.is_file()), default=0),
        ]

    return {
        "inputs": [stamp(i.path) for i in inputs],
        "partitions": cfg.partitions,
        "json_keys": cfg.json_keys,
        "append_eod": cfg.append_eod,
        "skip_bad_lines": cfg.skip_bad_lines,
        "tokenizer": [tok.type, *(stamp(f) for f in (cfg.tokenizer_model, cfg.vocab_file, cfg.merge_file) if f)],
    }


def _claim_parts(prefixes: dict[str, str], plan: dict) -> None:
    """Create the parts folders with the run's plan, or check that those there belong to this run."""
    text = json.dumps(plan, indent=1) + "\n"
    for prefix in prefixes.values():
        folder = parts_folder(prefix)
        folder.mkdir(parents=True, exist_ok=True)
        f = folder / "plan.json"
        if f.exists():
            if json.loads(f.read_text(encoding="utf-8")) != json.loads(text):
                raise CookbookError(
                    f"{folder} holds partitions of another run (its inputs, tokenizer or flags differ); "
                    "remove it, or choose another --output-prefix"
                )
        else:
            write_text_atomic(f, text)


def _finished(prefixes: dict[str, str], name: str) -> PreprocessSummary | None:
    """A partition's summary if every key's dataset and record are complete, else None."""
    found = None
    for key, prefix in prefixes.items():
        folder = parts_folder(prefix)
        record = folder / f"{name}.json"
        if not (record.exists() and bin_path(folder / name).exists() and idx_path(folder / name).exists()):
            return None
        if found is None:
            data = json.loads(record.read_text(encoding="utf-8"))
            data["inputs"] = {k: InputCounts(**v) for k, v in data["inputs"].items()}
            found = PreprocessSummary(**data)
    return found


def _clear_leftovers(prefix: str | Path) -> None:
    """Remove the temporary files a killed run left of dataset ``prefix`` (``fileio.temporary_path`` names)."""
    prefix = Path(prefix)
    for f in prefix.parent.glob(f".{prefix.name}.*.tmp-*"):
        f.unlink(missing_ok=True)


def _map_large_blocks() -> None:
    """Have glibc map every allocation of 1 MiB or more on its own and unmap it when freed.

    Blocks of text and ids are allocated and freed for every block of input. glibc's default threshold for that
    rises with each large block freed, after which such blocks come from the heap, whose free space is not given
    back: peak RSS crept up by some 60 MB over 1 GB of input. With a fixed threshold it stays flat (and a little
    faster). Elsewhere than glibc this does nothing.
    """
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def run(cfg: PreprocessConfig, show_progress: bool = True) -> PreprocessSummary:
    start = time.perf_counter()  # the summary's time: all of the command's own work, tokenizer loading included
    _check(cfg)
    check_writable(Path(cfg.output_prefix).parent, "--output-prefix", folder=True)
    _map_large_blocks()
    inputs = expand(cfg.inputs)
    if cfg.partitions > 1 and any(i.is_stdin for i in inputs):
        raise CookbookError("--partitions cannot split standard input; give files")
    check_inputs(inputs, cfg.json_keys, cfg.skip_bad_lines)
    tok = _load_tokenizer(cfg, cfg.workers)
    dtype = optimal_dtype(tok.vocab_size)
    Path(cfg.output_prefix).parent.mkdir(parents=True, exist_ok=True)
    outputs = {k: output_prefix(cfg.output_prefix, k) for k in cfg.json_keys}
    summary = PreprocessSummary(outputs=outputs, tokenizer=f"{tok.type} ({tok.backend})")
    if cfg.partitions == 1:
        total = sum(i.size for i in inputs) if not any(i.is_stdin for i in inputs) else None
        with rate_progress("preprocess", total, enabled=show_progress) as bar:
            summary.add(_write(cfg, tok, dtype, inputs, None, outputs, bar, require_documents=True))
        summary.partitions_done = 1
    else:
        _partitioned(cfg, tok, dtype, inputs, summary, show_progress)
    if summary.documents == 0 and cfg.partition_index is None:
        raise CookbookError(
            f"no documents in {', '.join(i.name for i in inputs)}"
            + (f" ({summary.skipped_rows} bad rows skipped)" if summary.skipped_rows else "")
        )
    summary.seconds = time.perf_counter() - start
    return summary


def render(s: PreprocessSummary, cfg: PreprocessConfig) -> list:
    """What ``cookbook preprocess`` prints: a table of the counts, then the first skipped lines."""
    seconds = max(s.seconds, 1e-9)
    rows = [
        ("documents", f"{s.documents:,}"),
        ("sequences", f"{s.sequences:,}"),
        ("tokens", f"{s.tokens:,}"),
        ("empty documents", f"{s.empty:,}"),
        ("skipped lines", f"{s.skipped_rows:,}"),
        ("input", f"{s.bytes / 1e6:,.1f} MB"),
        (
            "time",
            f"{s.seconds:,.2f} s  ({s.documents / seconds:,.0f} docs/s, "
            f"{s.bytes / 1e6 / seconds:,.1f} MB/s, {s.tokens / seconds:,.0f} tokens/s)",
        ),
        ("tokenizer", s.tokenizer),
    ]
    if cfg.partitions > 1:
        reused = f"{s.partitions_reused:,} reused from an earlier run"
        rows.append(("partitions", f"{s.partitions_done:,} written, {reused}"))
    rows += [
        (f"input {escape(name)}", f"{c.documents:,} documents, {c.skipped:,} skipped, {c.bytes / 1e6:,.1f} MB")
        for name, c in s.inputs.items()
    ]
    rows += [(f"output ({key})", f"{prefix}.bin/.idx") for key, prefix in s.outputs.items()]
    table = Table(title="preprocess", show_header=False, title_justify="left")
    for row in rows:
        table.add_row(*row)
    skipped = [f"[yellow]skipped[/yellow] {escape(where)}" for where in s.skipped[:5]]
    if s.skipped_rows > 5:
        skipped.append(f"[yellow]... and {s.skipped_rows - 5:,} more skipped lines[/yellow]")
    return [table, *skipped]


def _partitioned(cfg, tok, dtype, inputs, summary, show_progress) -> None:
    """Write the partitions not yet done (``--jobs`` at a time); without --partition-index, merge them all."""
    _claim_parts(summary.outputs, _fingerprint(cfg, inputs, tok))
    todo = [cfg.partition_index] if cfg.partition_index is not None else list(range(cfg.partitions))
    plans = {i: partition(inputs, i, cfg.partitions) for i in todo}
    total = sum(sum(_range_bytes(inputs, r) for r in plans[i].ranges) for i in todo)
    results: dict[int, PreprocessSummary] = {}
    with rate_progress("preprocess", total, enabled=show_progress) as bar:
        pending = []
        for i in todo:
            done = _finished(summary.outputs, part_name(i, cfg.partitions))
            if done is None:
                pending.append(i)
                continue
            results[i] = done
            summary.partitions_reused += 1
            bar.advance(done.bytes, done.documents, done.tokens)
        if cfg.jobs > 1 and len(pending) > 1:
            # spawn, not fork: the tokenizers' native thread pools do not survive a fork
            with ProcessPoolExecutor(min(cfg.jobs, len(pending)), mp_context=mp.get_context("spawn")) as pool:
                futures = {pool.submit(_job, cfg, i): i for i in pending}
                for f in as_completed(futures):
                    results[futures[f]] = part = f.result()
                    bar.advance(part.bytes, part.documents, part.tokens)
        else:
            for i in pending:
                results[i] = _write_partition(cfg, tok, dtype, inputs, plans[i], summary.outputs, bar)
        summary.partitions_done += len(pending)
    for i in sorted(results):
        summary.add(results[i])
    if cfg.partition_index is not None:
        summary.outputs = {
            k: str(parts_folder(p) / part_name(cfg.partition_index, cfg.partitions)) for k, p in summary.outputs.items()
        }
        return
    if summary.documents == 0:
        return
    for prefix in summary.outputs.values():
        _clear_leftovers(prefix)
        with IndexedDatasetWriter(prefix, dtype) as writer:
            for i in range(cfg.partitions):
                writer.add_dataset(parts_folder(prefix) / part_name(i, cfg.partitions))
    for prefix in summary.outputs.values():
        shutil.rmtree(parts_folder(prefix))


def _write_partition(cfg, tok, dtype, inputs, plan: Partition, outputs: dict[str, str], bar) -> PreprocessSummary:
    """Write one partition into the parts folders, then its record (which marks it done); return its counts."""
    name = part_name(plan.index, cfg.partitions)
    prefixes = {k: str(parts_folder(p) / name) for k, p in outputs.items()}
    for prefix in prefixes.values():
        _clear_leftovers(prefix)
    part = _write(cfg, tok, dtype, inputs, plan, prefixes, bar)
    record = asdict(part)
    record.update(outputs=prefixes, seconds=0.0)
    for prefix in outputs.values():
        write_text_atomic(parts_folder(prefix) / f"{name}.json", json.dumps(record) + "\n")
    return part


def _job(cfg: PreprocessConfig, index: int) -> PreprocessSummary:
    """Partition ``index`` in a worker process of ``--jobs``, with ``--workers / --jobs`` tokenizer threads."""
    _map_large_blocks()
    inputs = expand(cfg.inputs)
    tok = _load_tokenizer(cfg, max(1, cfg.workers // cfg.jobs))
    outputs = {k: output_prefix(cfg.output_prefix, k) for k in cfg.json_keys}
    with rate_progress("", None, enabled=False) as bar:
        return _write_partition(
            cfg, tok, optimal_dtype(tok.vocab_size), inputs, partition(inputs, index, cfg.partitions), outputs, bar
        )


def _load_tokenizer(cfg: PreprocessConfig, threads: int) -> Tokenizer:
    return load_tokenizer(
        cfg.tokenizer_model,
        cfg.tokenizer_type,
        vocab_file=cfg.vocab_file,
        merge_file=cfg.merge_file,
        threads=threads,
        backend=cfg.tokenizer_backend,
    )


def _range_bytes(inputs: list[Input], r: tuple[int, int, int | None]) -> int:
    n, start, end = r
    return (inputs[n].size if end is None else end) - start


def _scanned(tok: Tokenizer, batches):
    """Each block with, per key, the texts the fast encoder cannot do: found here, in the reader thread, which
    would otherwise wait for the main thread (bench/preprocess.py --profile)."""
    for n, batch in batches:
        yield (
            n,
            batch,
            {k: tok.special_texts(v) if all(type(x) is str for x in v) else None for k, v in batch.texts.items()},
        )


def _write(
    cfg,
    tok,
    dtype,
    inputs: list[Input],
    part: Partition | None,
    prefixes: dict[str, str],
    bar,
    require_documents: bool = False,
) -> PreprocessSummary:
    """Tokenize every input (or one partition of them) into datasets at ``prefixes``; return the counts."""
    s = PreprocessSummary(outputs=prefixes)
    block = max(1 << 16, int(cfg.block_mb * (1 << 20)))
    first = cfg.json_keys[0]
    with ExitStack() as stack:
        writers = {k: stack.enter_context(IndexedDatasetWriter(p, dtype)) for k, p in prefixes.items()}
        for n, batch, special in _prefetch(
            _scanned(tok, read_partition(inputs, part, cfg.json_keys, cfg.skip_bad_lines, block))
        ):
            docs, tokens = s.documents, s.tokens
            counts = s.inputs.setdefault(inputs[n].given, InputCounts())
            s.skipped.extend(batch.skipped[: max(0, SKIPPED_KEPT - len(s.skipped))])
            s.skipped_rows += batch.n_skipped
            counts.skipped += batch.n_skipped
            for key, values in batch.texts.items():
                flat, lengths, per_doc = encode_documents(tok, values, cfg.append_eod, dtype, special[key])
                writers[key].add_documents(flat, lengths, per_doc)
                if key == first:
                    s.documents += len(values)
                    s.sequences += len(lengths)
                    s.tokens += len(flat)
                    s.empty += int((per_doc == 0).sum())
                    counts.documents += len(values)
            s.bytes += batch.nbytes
            counts.bytes += batch.nbytes
            bar.advance(batch.nbytes, s.documents - docs, s.tokens - tokens)
        if require_documents and s.documents == 0:  # before the writers rename anything into place
            raise CookbookError(
                f"no documents in {', '.join(i.name for i in inputs)}"
                + (f" ({s.skipped_rows} bad rows skipped)" if s.skipped_rows else "")
            )
    return s
