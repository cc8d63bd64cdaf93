"""``cookbook preprocess``: jsonl in, Megatron indexed dataset out, byte-identical to Megatron-LM.

Megatron-LM's ``tools/preprocess_data.py`` sends every line through a process pool that calls
``json.loads`` and ``tokenizer.tokenize`` once per document. Here the main work is batched: a reader
thread parses blocks of lines with orjson while the tokenizer encodes the previous block in its
native threads (``--workers`` of them), and token arrays are written in large sequential writes.
The ids, the dtype, the document order, the handling of empty documents and ``--append-eod`` are
Megatron-LM's, so the ``.bin``/``.idx`` bytes are the same.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cookbook.data.indexed import IndexedDatasetWriter, optimal_dtype
from cookbook.data.jsonl import expand_inputs, parse_lines, read_lines
from cookbook.data.tokenizer import Tokenizer, load_tokenizer, scatter
from cookbook.errors import CookbookError
from cookbook.fileio import check_writable
from cookbook.progress import rate_progress


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
    block_mb: float = 8.0


@dataclass
class PreprocessSummary:
    outputs: dict[str, str]  # json key -> output prefix
    documents: int = 0
    sequences: int = 0
    tokens: int = 0
    empty: int = 0  # documents that tokenized to nothing (kept in the index, as Megatron-LM does)
    skipped: list[str] = field(default_factory=list)
    bytes: int = 0
    seconds: float = 0.0
    tokenizer: str = ""


def output_prefix(prefix: str, key: str) -> str:
    """Megatron-LM's naming: ``{prefix}_{key}_document``."""
    return f"{prefix}_{key}_document"


def encode_documents(tok: Tokenizer, values: list, append_eod: bool):
    """Tokenize documents as Megatron-LM does -> (flat ids, sequence lengths, sequences per document).

    A value is a string (one sequence) or a list of strings (one sequence per string). Empty
    sequences are dropped; with ``append_eod`` the EOD goes after each non-empty document's last
    sequence.
    """
    n_docs = len(values)
    if all(type(v) is str for v in values):
        texts, sentence_doc = values, np.arange(n_docs)
    else:
        texts = [s for v in values for s in ([v] if isinstance(v, str) else v)]
        sentence_doc = np.repeat(np.arange(n_docs), [1 if isinstance(v, str) else len(v) for v in values])
    flat, lengths = tok.encode_batch(texts)
    keep = lengths > 0
    seq_lengths, seq_doc = lengths[keep], sentence_doc[keep]
    if append_eod and len(seq_lengths):
        if tok.eod is None:
            raise CookbookError(f"tokenizer {tok.path} has no EOS token (eos_token in tokenizer_config.json); --append-eod needs one")
        last = np.append(seq_doc[1:] != seq_doc[:-1], True)
        new_lengths = seq_lengths + last
        ends = np.cumsum(new_lengths)
        out = np.empty(int(ends[-1]), dtype=flat.dtype)
        scatter(out, flat, seq_lengths, ends - new_lengths)
        out[ends[last] - 1] = tok.eod
        flat, seq_lengths = out, new_lengths
    return flat, seq_lengths, np.bincount(seq_doc, minlength=n_docs)


def _batches(cfg: PreprocessConfig, files: list[Path]):
    """Yield (texts per key, skipped, bytes of JSON, position on disk) per block of lines."""
    block = max(1 << 16, int(cfg.block_mb * (1 << 20)))
    done = 0
    for path in files:
        for first, lines, pos in read_lines(path, block):
            texts, skipped = parse_lines(path, first, lines, cfg.json_keys, cfg.skip_bad_lines)
            yield texts, skipped, sum(map(len, lines)) + len(lines), done + pos
        done += path.stat().st_size


def _prefetch(iterator, depth: int = 2):
    """Run ``iterator`` in a thread, ``depth`` items ahead; its exceptions surface in the caller."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    end = object()

    def work():
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((end, None))
        except BaseException as e:  # handed to the consumer
            q.put((None, e))

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()


def run(cfg: PreprocessConfig, show_progress: bool = True) -> PreprocessSummary:
    if not cfg.json_keys:
        raise CookbookError("--json-keys needs at least one key")
    if cfg.workers < 1:
        raise CookbookError(f"--workers must be at least 1, got {cfg.workers}")
    check_writable(Path(cfg.output_prefix).parent, "--output-prefix", folder=True)
    files = expand_inputs(cfg.inputs)
    tok = load_tokenizer(
        cfg.tokenizer_model, cfg.tokenizer_type, vocab_file=cfg.vocab_file, merge_file=cfg.merge_file,
        threads=cfg.workers, backend=cfg.tokenizer_backend,
    )
    dtype = optimal_dtype(tok.vocab_size)
    Path(cfg.output_prefix).parent.mkdir(parents=True, exist_ok=True)
    summary = PreprocessSummary(
        outputs={k: output_prefix(cfg.output_prefix, k) for k in cfg.json_keys},
        tokenizer=f"{tok.type} ({tok.backend})",
    )
    total = sum(p.stat().st_size for p in files)
    start = time.perf_counter()
    with ExitStack() as stack:
        writers = {k: stack.enter_context(IndexedDatasetWriter(p, dtype)) for k, p in summary.outputs.items()}
        bar = stack.enter_context(rate_progress("preprocess", total, enabled=show_progress))
        for texts, skipped, nbytes, pos in _prefetch(_batches(cfg, files)):
            summary.skipped.extend(skipped)
            for key, values in texts.items():
                flat, lengths, per_doc = encode_documents(tok, values, cfg.append_eod)
                if dtype == np.uint16 and len(flat) and int(flat.max()) > 65535:
                    raise CookbookError(f"token id {int(flat.max())} does not fit uint16; the tokenizer's vocab size is wrong")
                writers[key].add_documents(flat, lengths, per_doc)
                if key == cfg.json_keys[0]:
                    summary.documents += len(values)
                    summary.sequences += len(lengths)
                    summary.tokens += len(flat)
                    summary.empty += int((per_doc == 0).sum())
            summary.bytes += nbytes
            bar.update(pos, docs=summary.documents, tokens=summary.tokens, nbytes=summary.bytes)
        if summary.documents == 0:
            raise CookbookError(
                f"no documents in {', '.join(map(str, files))}"
                + (f" ({len(summary.skipped)} bad lines skipped)" if summary.skipped else "")
            )
    summary.seconds = time.perf_counter() - start
    return summary
