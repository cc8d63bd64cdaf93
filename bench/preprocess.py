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

Rungs beyond it:
- ``--fast-path``: Megatron-LM's ``tools/preprocess_data_fast.py --use-gigatoken`` (HF kinds), run as a
  process with the Python and checkout given by ``--megatron-python`` / ``--megatron-lm`` (or the
  MEGATRON_PYTHON / MEGATRON_LM variables), against ``cookbook preprocess`` as a process too: wall time, each
  side's own time without imports (the fast path prints it; cookbook's summary has it), peak RSS, and whether
  the bytes are the same. Skipped, with the reason, where it is not installed.
- ``--scale K``: the corpus is K distinct variants of the sample corpus (``scaled_texts``: each copy's lines
  in their own order), so no document repeats; ``--scale 32`` is about 1 GB.
- ``--memory``: peak RSS of ``cookbook preprocess`` on 1x, 10x and 30x of the sample corpus in every input
  format, the 30x with documents 60x the average size mixed in.
- ``--profile``: where cookbook's time goes, stage by stage (read, parse, tokenize, special-text scan,
  assemble, write), against the pipelined run's wall time.

    python bench/preprocess.py --workers 2                      # both tokenizer kinds on the sample corpus
    python bench/preprocess.py --kinds hf --scale 32 --no-baseline --fast-path --repeats 2
    python bench/preprocess.py --memory --no-baseline
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cookbook.data.sample_corpus import CORPUS_FORMATS, scaled_texts, write_corpus, write_sample_corpus  # noqa: E402
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
    cfg = PreprocessConfig(
        [corpus], prefix, tokenizer_model=tok_path, append_eod=True, workers=workers, tokenizer_backend=backend
    )
    s = run(cfg, show_progress=False)
    return time.perf_counter() - start, s


def timed_process(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """Run a command; (wall seconds, its peak RSS in bytes, its output).

    The peak is the kernel's high-water mark (VmHWM), read every 10 ms while it runs: getrusage's ru_maxrss
    would include this (large) benchmark process, which a child's RSS counts from the fork until the exec.
    """
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        peak = 0
        while proc.poll() is None:
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    peak = max(peak, *(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM")))
            except (OSError, ValueError, TypeError):
                pass
            time.sleep(0.01)
        wall = time.perf_counter() - start
        log.seek(0)
        out = log.read().decode(errors="replace")
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[:3])} ... failed:\n{out[-3000:]}")
    return wall, peak, out


def cookbook_process(corpus, prefix, tok: str, workers: int, extra=()) -> tuple[float, float, int]:
    """`cookbook preprocess` as a process: (wall, its own time from the summary, peak RSS)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "COLUMNS": "200"}
    wall, rss, out = timed_process(
        [
            sys.executable,
            "-m",
            "cookbook",
            "preprocess",
            "--input",
            str(corpus),
            "--output-prefix",
            str(prefix),
            "--tokenizer-model",
            tok,
            "--append-eod",
            "-w",
            str(workers),
            "-q",
            *extra,
        ],
        env,
    )
    own = float(re.search(r"time\W+([\d.,]+) s", out).group(1).replace(",", ""))
    return wall, own, rss


def fast_path(python: str, checkout: str, corpus, prefix, tok: str) -> tuple[float, float, int]:
    """Megatron-LM's preprocess_data_fast.py --use-gigatoken: (wall, its own elapsed time without imports, peak RSS)."""
    env = {**os.environ, "PYTHONPATH": checkout}
    wall, rss, out = timed_process(
        [
            python,
            f"{checkout}/tools/preprocess_data_fast.py",
            "--input",
            str(corpus),
            "--output-prefix",
            str(prefix),
            "--tokenizer-type",
            "HuggingFaceTokenizer",
            "--tokenizer-model",
            tok,
            "--use-gigatoken",
            "--append-eod",
        ],
        env,
    )
    return wall, float(re.search(r"Elapsed time: ([\d.]+) seconds", out).group(1)), rss


def fast_path_missing(python: str | None, checkout: str | None) -> str | None:
    """Why the fast path cannot run here, or None."""
    if not python or not checkout:
        return "pass --megatron-python and --megatron-lm (or set MEGATRON_PYTHON / MEGATRON_LM)"
    if not Path(checkout, "tools/preprocess_data_fast.py").exists():
        return f"{checkout} has no tools/preprocess_data_fast.py (it needs a Megatron-LM checkout of Aug 2026 or later)"
    probe = subprocess.run(
        [python, "-c", "import gigatoken, awkward, triton, megatron.core"],
        env={**os.environ, "PYTHONPATH": checkout},
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return f"{python} cannot import its dependencies: {(probe.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


def profile(tok_path: str, corpus: Path, workers: int, block_mb: float = 2.0) -> None:
    """Each stage alone, one after the other, then the pipelined run: where cookbook's time goes."""
    import numpy as np

    from cookbook.data.jsonl import parse_lines, read_lines
    from cookbook.data.tokenizer import _wrap, load_tokenizer

    tok = load_tokenizer(tok_path, threads=workers)
    times = {}

    def stage(name, fn, *inputs):  # the inputs as arguments: the caller frees them after
        t = time.perf_counter()
        out = fn(*inputs)
        times[name] = time.perf_counter() - t
        return out

    blocks = stage("read + split lines", lambda: [b for _, b, _ in read_lines(corpus, int(block_mb * (1 << 20)))])
    texts = stage(
        "parse (orjson)", lambda blocks: [parse_lines(corpus, 1, b, ["text"], False)[0]["text"] for b in blocks], blocks
    )
    del blocks
    plain = stage("tokenize (native threads)", lambda texts: [tok.plain(t) for t in texts], texts)
    stage("special-text scan", lambda texts: [[i for i, x in enumerate(t) if tok.needs_exact(x)] for t in texts], texts)
    dtype = np.uint16 if tok.vocab_size < 65500 else np.int32
    built = stage(
        "assemble (BOS/EOD, dtype)",
        lambda plain: [_wrap(f, n, tok.prefix, tok.suffix, tok.eod, dtype) for f, n in plain],
        plain,
    )
    del plain, texts
    with tempfile.TemporaryDirectory() as d:
        from cookbook.data.indexed import IndexedDatasetWriter

        def write():
            with IndexedDatasetWriter(f"{d}/w", dtype) as w:
                for f, n in built:
                    w.add_documents(f, n)

        stage("write .bin/.idx", write)
        from recipes import preprocess as recipe

        waits = dict(recipe.HANDOFF)
        start = time.perf_counter()
        run(
            PreprocessConfig(
                [str(corpus)], f"{d}/p", tokenizer_model=tok_path, append_eod=True, workers=workers, block_mb=block_mb
            ),
            show_progress=False,
        )
        pipelined = time.perf_counter() - start
        waits = {k: v - waits[k] for k, v in recipe.HANDOFF.items()}
    size = corpus.stat().st_size
    total = sum(times.values())
    print(f"profile ({size / 1e6:,.0f} MB, {workers} workers): each stage alone")
    for name, t in times.items():
        print(f"  {name:28s} {t:7.2f} s  {100 * t / total:5.1f}%  {size / 1e6 / max(t, 1e-9):8,.0f} MB/s")
    print(
        f"  {'sum of stages':28s} {total:7.2f} s;  pipelined run (tokenizer load included): {pipelined:.2f} s, "
        f"{size / 1e6 / pipelined:,.1f} MB/s"
    )
    print(
        "  hand-off in the pipelined run: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in waits.items())
        + " (the main thread waiting means the reader is the slower side)"
    )


def memory(work: Path, texts: list[str], tok: str, workers: int) -> None:
    """Peak RSS per input format at 1x, 10x and 30x (the 30x with 60x documents mixed in)."""
    print(f"memory: peak RSS of `cookbook preprocess -w {workers}` (one process)")
    print(
        f"  {'format':10s} "
        + " ".join(f"{label:>22s}" for label in ("1x", "10x", "30x + 60x documents"))
        + "   30x / 1x"
    )
    for fmt in CORPUS_FORMATS:
        peaks = []
        for factor in (1, 10, 30):
            path = work / f"mem{factor}.{fmt}"
            if not path.exists():
                write_corpus(path, scaled_texts(texts, factor, big_every=300 if factor == 30 else 0), fmt)
            wall, _, rss = cookbook_process(path, work / "mem_out", tok, workers)
            peaks.append((path.stat().st_size, rss, wall))
        cells = " ".join(f"{s / 1e6:7,.0f} MB: {r / 2**20:5,.0f} MiB {w:5.0f}s" for s, r, w in peaks)
        print(f"  {fmt:10s} {cells}   {peaks[2][1] / peaks[0][1]:.2f}")
        for factor in (1, 10, 30):
            (work / f"mem{factor}.{fmt}").unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--kinds",
        default="sentencepiece,hf",
        help="sentencepiece (Llama 2 settings), sentencepiece-nfkc "
        "(nmt_nfkc normalization), hf (baseline: transformers, as Megatron-LM), hf-tokenizers "
        "(baseline: tokenizers.Tokenizer.encode, faster than transformers)",
    )
    ap.add_argument("--corpus-mb", type=float, default=None, help="default: the whole sample corpus (~31 MB)")
    ap.add_argument("--vocab-size", type=int, default=8000)
    ap.add_argument("--tokenizer-backend", default="auto", help="cookbook's backend: auto, gigatoken or reference")
    ap.add_argument("--repeats", type=int, default=1, help="best of N for each side")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--scale", type=int, default=1, help="K distinct variants of the corpus (32: about 1 GB)")
    ap.add_argument(
        "--no-baseline", action="store_true", help="skip the multiprocessing baseline (slow on big corpora)"
    )
    ap.add_argument(
        "--fast-path", action="store_true", help="also run Megatron-LM's preprocess_data_fast.py --use-gigatoken"
    )
    ap.add_argument(
        "--megatron-python",
        default=os.environ.get("MEGATRON_PYTHON"),
        help="a Python >= 3.12 with gigatoken, awkward, triton, torch",
    )
    ap.add_argument(
        "--megatron-lm", default=os.environ.get("MEGATRON_LM"), help="a Megatron-LM checkout (Aug 2026 or later)"
    )
    ap.add_argument(
        "--memory", action="store_true", help="peak RSS at 1x/10x/30x of the sample corpus, every input format"
    )
    ap.add_argument("--profile", action="store_true", help="where cookbook's time goes, stage by stage")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="cookbook-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / "corpus.jsonl"
    docs, size = write_sample_corpus(corpus, args.corpus_mb)
    base_texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    if args.scale > 1:
        corpus = work / f"corpus_x{args.scale}.jsonl"
        if not corpus.exists():
            write_corpus(corpus, scaled_texts(base_texts, args.scale), "jsonl")
        docs, size = docs * args.scale, corpus.stat().st_size
    print(
        f"corpus: {docs:,} documents, {size / 1e6:.1f} MB of text; workers={args.workers}; "
        f"cpus={os.cpu_count()}; {platform.processor() or platform.machine()}; python {platform.python_version()}"
    )
    results = []
    for kind in args.kinds.split(","):
        sp = kind.startswith("sentencepiece")
        out = work / {"sentencepiece": "sp.model", "sentencepiece-nfkc": "sp_nfkc.model"}.get(kind, "hf")
        if not out.exists():
            train_tokenizer(
                TokenizerTrainConfig(
                    [str(corpus)],
                    str(out),
                    kind="sentencepiece" if sp else "hf-bpe",
                    vocab_size=args.vocab_size,
                    max_documents=600,
                    normalization="nmt_nfkc" if kind == "sentencepiece-nfkc" else "identity",
                )
            )
        if args.fast_path and not sp:
            why = fast_path_missing(args.megatron_python, args.megatron_lm)
            if why:
                print(f"{kind:14s} fast path not run: {why}")
            else:
                fp, cb = [], []
                for _ in range(args.repeats):  # alternating, so that both sides see the machine's load alike
                    fp.append(fast_path(args.megatron_python, args.megatron_lm, corpus, work / "fast", str(out)))
                    cb.append(cookbook_process(corpus, work / "cb", str(out), args.workers))
                (fw, fo, fr), (cw, co, cr) = min(fp), min(cb)  # best of N by wall time
                same = all(
                    Path(f"{work}/fast_text_document{e}").read_bytes()
                    == Path(f"{work}/cb_text_document{e}").read_bytes()
                    for e in (".bin", ".idx")
                )
                print(
                    f"{kind:14s} fast path: wall {fw:6.1f} s (own {fo:6.1f} s, {size / 1e6 / fo:6.1f} MB/s), peak {fr / 2**30:5.2f} GiB | "
                    f"cookbook: wall {cw:6.1f} s (own {co:6.1f} s, {size / 1e6 / co:6.1f} MB/s), peak {cr / 2**30:5.2f} GiB | "
                    f"own-time ratio {fo / co:4.2f}x, wall ratio {fw / cw:4.2f}x | same bytes: {same}"
                )
        if args.profile:  # after the processes above: it holds the corpus in this process
            profile(str(out), corpus, args.workers)
        if args.no_baseline:
            continue
        t_ours, s = min(
            (
                ours(str(out), str(corpus), str(work / f"ours_{kind}"), args.workers, args.tokenizer_backend)
                for _ in range(args.repeats)
            ),
            key=lambda r: r[0],
        )
        t_base = min(
            baseline(kind, str(out), str(corpus), str(work / f"base_{kind}"), args.workers, args.vocab_size)
            for _ in range(args.repeats)
        )
        same = all(
            Path(s.outputs["text"] + ext).read_bytes() == (work / f"base_{kind}{ext}").read_bytes()
            for ext in (".bin", ".idx")
        )
        ratio = t_base / t_ours
        results.append((kind, t_base, t_ours, ratio, same))
        print(
            f"{kind:14s} baseline {t_base:7.2f} s ({docs / t_base:8,.1f} docs/s) | cookbook {t_ours:6.2f} s "
            f"({docs / t_ours:8,.1f} docs/s, {s.tokenizer}) | ratio {ratio:5.2f}x | byte-identical: {same}"
        )
    if args.memory:
        tok = work / "hf"
        if not tok.exists():
            train_tokenizer(
                TokenizerTrainConfig(
                    [str(work / "corpus.jsonl")], str(tok), kind="hf-bpe", vocab_size=args.vocab_size, max_documents=600
                )
            )
        memory(work, base_texts, str(tok), args.workers)
    if not all(r[4] for r in results):
        sys.exit("outputs differ from the baseline")


if __name__ == "__main__":
    main()
