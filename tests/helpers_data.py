"""Helpers for the CLI / bad-input / merge tests: tiny corpora, tiny tokenizers, running the CLI,
and megatron-core as the oracle for merges. Nothing here downloads anything."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np

WORDS = (
    "the quick brown fox jumps over a lazy dog while data flows through token streams "
    "into llama models trained on 128 GPUs for 3 days; merge split shard 0x1F 3.14 "
    "naïve café über straße 日本語 テキスト 😀 — “quoted”"
).split()


def make_texts(n: int, seed: int = 0, min_words: int = 3, max_words: int = 40) -> list[str]:
    """``n`` deterministic short documents, some multi-line, some non-ASCII."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))]
        if i % 5 == 3:
            words.insert(len(words) // 2, "\n")
        texts.append(f"doc {seed}-{i}: " + " ".join(words))
    return texts


def write_jsonl(path: Path, records, key: str = "text") -> Path:
    """Write ``records`` (strings become ``{key: text}``) one JSON object per line."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r if isinstance(r, dict) else {key: r}) + "\n")
    return path


def train_sp(folder: Path, texts: list[str], vocab_size: int = 400, model_type: str = "bpe", name: str = "tok") -> Path:
    """A tiny Llama-2 style SentencePiece model trained on ``texts``."""
    from cookbook.data.tokenizer_train import TokenizerTrainConfig, train_tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = write_jsonl(folder / f"{name}-train.jsonl", texts)
    return train_tokenizer(
        TokenizerTrainConfig(
            [str(corpus)], str(folder / f"{name}.model"), model_type=model_type, vocab_size=vocab_size, threads=1
        )
    )


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("COOKBOOK_DEBUG", None)
    return env


def run_cli(
    *args, cwd: Path | None = None, env: dict | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """``python -m cookbook ARGS`` in a subprocess; text output captured."""
    return subprocess.run(
        [sys.executable, "-m", "cookbook", *map(str, args)],
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, stderr one line starting with ``error:`` that holds every needle, no traceback."""
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out, out
    assert proc.returncode == 2, f"exit {proc.returncode}\n{out}"
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1, f"stderr is not one line:\n{proc.stderr}"
    assert err.startswith("error:"), err
    for n in needles:
        assert n in err, f"{n!r} not in {err!r}"
    return err


def files_under(folder: Path) -> list[Path]:
    """Every file below ``folder`` (none when it does not exist)."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def snapshot(prefix) -> tuple[bytes, bytes]:
    """The bytes of ``PREFIX.bin`` and ``PREFIX.idx``."""
    return Path(f"{prefix}.bin").read_bytes(), Path(f"{prefix}.idx").read_bytes()


def preprocess(inputs, output_prefix, tokenizer, **kw) -> str:
    """Preprocess in-process with ``recipes.preprocess.run``; return the dataset prefix of key text."""
    from recipes.preprocess import PreprocessConfig, run

    cfg = PreprocessConfig([str(i) for i in inputs], str(output_prefix), str(tokenizer), workers=1, **kw)
    summary = run(cfg, show_progress=False)
    return summary.outputs[cfg.json_keys[0]]


def documents(prefix) -> list[list[int]]:
    from cookbook.data.indexed import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds.document(d).tolist() for d in range(ds.num_documents)]


def megatron_build(prefix, docs: list[list[list[int]]], dtype=np.uint16) -> str:
    """Write a dataset with megatron-core's IndexedDatasetBuilder; each document is a list of
    sequences (an empty list: a document that tokenized to nothing)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for seqs in docs:
        flat = [t for s in seqs for t in s]
        builder.add_document(torch.tensor(flat, dtype=torch.int64), [len(s) for s in seqs])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def megatron_merge(prefixes: list[str], output_prefix) -> str:
    """What Megatron-LM's tools/merge_datasets.py does for ``prefixes`` (in the order given)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset as MDataset
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = None
    for p in prefixes:
        if builder is None:
            dataset = MDataset(p, multimodal=False)
            builder = IndexedDatasetBuilder(f"{output_prefix}.bin", dtype=dataset.index.dtype, multimodal=False)
            del dataset
        builder.add_index(p)
    builder.finalize(f"{output_prefix}.idx")
    return str(output_prefix)


# --------------------------------------------------------------------------- corpora in every input format


def jsonl_bytes(texts, key: str = "text") -> bytes:
    return b"".join((json.dumps(t if isinstance(t, dict) else {key: t}) + "\n").encode() for t in texts)


def write_zst(path: Path, texts, frames: int = 2) -> Path:
    """jsonl compressed as ``frames`` zstd frames (the second with a checksum), as ``zstd`` and pzstd write them."""
    import zstandard

    raw = jsonl_bytes(texts)
    cuts = [len(raw) * i // frames for i in range(frames + 1)]
    Path(path).write_bytes(
        b"".join(
            zstandard.ZstdCompressor(write_checksum=bool(i % 2)).compress(raw[cuts[i] : cuts[i + 1]])
            for i in range(frames)
        )
    )
    return Path(path)


def write_parquet(path: Path, columns: dict, row_group_size: int = 7, **kw) -> Path:
    """A parquet file of ``columns`` (name -> list of values) in row groups of ``row_group_size`` rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), str(path), row_group_size=row_group_size, **kw)
    return Path(path)


def save_dataset(folder: Path, columns: dict, num_shards: int = 2) -> Path:
    """A folder written by Hugging Face ``datasets.Dataset.save_to_disk`` (the real library: the format's oracle)."""
    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset.from_dict(columns).save_to_disk(str(folder), num_shards=num_shards)
    return Path(folder)
