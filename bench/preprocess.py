"""Benchmark: `cookbook preprocess` against a baseline that does what Megatron-LM's
tools/preprocess_data.py does, on the same corpus, tokenizer and worker count.

Baseline: a ``multiprocessing.Pool(workers)`` whose workers call ``json.loads`` and the tokenizer
once per document (``imap(..., chunksize=32)``), the main process adding each document to
megatron-core's ``IndexedDatasetBuilder``. Tokenizer calls are Megatron-LM's: Llama2Tokenizer is
``[bos] + sentencepiece.encode(text)``; HuggingFaceTokenizer is transformers'
``AutoTokenizer(text).input_ids`` (``tokenizers.Tokenizer.encode`` when transformers is missing or
with the kind ``hf-tokenizers``).

Both runs are timed from start to the finished .bin/.idx (tokenizer loading included), their
outputs are checked to be byte-identical, and the docs/s ratio is printed.

    python bench/preprocess.py --workers 2            # both tokenizer kinds on the sample corpus
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cookbook.data.sample_corpus import write_sample_corpus  # noqa: E402
from cookbook.data.tokenizer_train import TokenizerTrainConfig, train_tokenizer  # noqa: E402
from recipes.preprocess import PreprocessConfig, run  # noqa: E402

_tok = None
_kind = None


def _init(kind: str, path: str) -> None:
    global _tok, _kind
    _kind = kind
    if kind.startswith("sentencepiece"):
        import sentencepiece

        _tok = sentencepiece.SentencePieceProcessor(model_file=path)
    else:
        try:
            if kind == "hf-tokenizers":
                raise ImportError
            from transformers import AutoTokenizer

            _tok = AutoTokenizer.from_pretrained(path)
        except ImportError:
            from tokenizers import Tokenizer

            _tok = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))


def _encode(line: str):
    text = json.loads(line)["text"]
    if _kind.startswith("sentencepiece"):
        ids = [_tok.bos_id()] + _tok.encode(text)
        eod = _tok.eos_id()
    elif hasattr(_tok, "eos_token_id"):
        ids, eod = _tok(text).input_ids, _tok.eos_token_id
    else:
        ids, eod = _tok.encode(text).ids, _tok.token_to_id("<|end_of_text|>")
    if ids:
        ids.append(eod)
    return ids, len(line)


def baseline(kind: str, tok_path: str, corpus: str, prefix: str, workers: int, vocab_size: int) -> float:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    start = time.perf_counter()
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=DType.optimal_dtype(vocab_size))
    with open(corpus, encoding="utf-8") as fin, mp.get_context("fork").Pool(workers, _init, (kind, tok_path)) as pool:
        for ids, _ in pool.imap(_encode, fin, 32):
            builder.add_document(ids, [len(ids)] if ids else [])
    builder.finalize(prefix + ".idx")
    return time.perf_counter() - start


def ours(tok_path: str, corpus: str, prefix: str, workers: int, backend: str):
    start = time.perf_counter()
    cfg = PreprocessConfig([corpus], prefix, tokenizer_model=tok_path, append_eod=True, workers=workers, tokenizer_backend=backend)
    s = run(cfg, show_progress=False)
    return time.perf_counter() - start, s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--kinds", default="sentencepiece,hf", help="sentencepiece (Llama 2 settings), sentencepiece-nfkc "
                    "(nmt_nfkc normalization), hf (baseline: transformers, as Megatron-LM), hf-tokenizers "
                    "(baseline: tokenizers.Tokenizer.encode, faster than transformers)")
    ap.add_argument("--corpus-mb", type=float, default=None, help="default: the whole sample corpus (~31 MB)")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--tokenizer-backend", default="auto", help="cookbook's backend: auto, gigatoken or reference")
    ap.add_argument("--repeats", type=int, default=1, help="best of N for each side")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="cookbook-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    docs, size = write_sample_corpus(corpus, args.corpus_mb)
    print(f"corpus: {docs:,} documents, {size / 1e6:.1f} MB of text; workers={args.workers}; "
          f"cpus={os.cpu_count()}; {platform.processor() or platform.machine()}; python {platform.python_version()}")
    results = []
    for kind in args.kinds.split(","):
        sp = kind.startswith("sentencepiece")
        out = work / {"sentencepiece": "sp.model", "sentencepiece-nfkc": "sp_nfkc.model"}.get(kind, "hf")
        if not out.exists():
            train_tokenizer(TokenizerTrainConfig(
                [str(corpus)], str(out), kind="sentencepiece" if sp else "hf-bpe", vocab_size=args.vocab_size,
                max_documents=600, normalization="nmt_nfkc" if kind == "sentencepiece-nfkc" else "identity",
            ))
        t_ours, s = min((ours(str(out), str(corpus), str(work / f"ours_{kind}"), args.workers, args.tokenizer_backend) for _ in range(args.repeats)), key=lambda r: r[0])
        t_base = min(baseline(kind, str(out), str(corpus), str(work / f"base_{kind}"), args.workers, args.vocab_size)
                     for _ in range(args.repeats))
        same = all(
            Path(s.outputs["text"] + ext).read_bytes() == (work / f"base_{kind}{ext}").read_bytes() for ext in (".bin", ".idx")
        )
        ratio = t_base / t_ours
        results.append((kind, t_base, t_ours, ratio, same))
        print(f"{kind:14s} baseline {t_base:7.2f} s ({docs / t_base:8,.1f} docs/s) | cookbook {t_ours:6.2f} s "
              f"({docs / t_ours:8,.1f} docs/s, {s.tokenizer}) | ratio {ratio:5.2f}x | byte-identical: {same}")
    if not all(r[4] for r in results):
        sys.exit("outputs differ from the baseline")


if __name__ == "__main__":
    main()
