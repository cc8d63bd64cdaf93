"""Peak memory does not grow with the corpus: a 30x corpus, with documents 60x the average size mixed in,
peaks within 1.2x of the 1x corpus, in every input format. Holding every token, as Megatron-LM's fast path does
(about 2 bytes of int64 ids per byte of text here, so some 30 MB at 30x), or the whole decompressed file, would
fail that.

Each run is a fresh process (`python -c`, in-process preprocess) that reports its own peak RSS (VmHWM). Sized
for CI: 1x is ~0.5 MB, read in blocks of 128 KiB; bench/preprocess.py --memory measures 1x/10x/30x of the whole
sample corpus."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import stdlib_texts
from helpers_data import cli_env, make_texts, train_sp

from cookbook.data.sample_corpus import CORPUS_FORMATS, scaled_texts, write_corpus

pytest.importorskip("pyarrow")
pytest.importorskip("zstandard")

CHILD = """
import sys
from recipes.preprocess import PreprocessConfig, run
s = run(PreprocessConfig([sys.argv[1]], sys.argv[2], sys.argv[3], append_eod=True, workers=2, block_mb=0.125), show_progress=False)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(s.documents, int(hwm) * 1024)
"""


def peak(corpus, prefix, tok) -> tuple[int, int]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(corpus), str(prefix), str(tok)],
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    docs, rss = proc.stdout.split()
    return int(docs), int(rss)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_sp(tmp_path_factory.mktemp("memory_tok"), make_texts(80, seed=1), vocab_size=400)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("fmt", CORPUS_FORMATS)
def test_peak_memory_flat_in_corpus_size(tmp_path, tok, fmt):
    texts = [t for t in stdlib_texts(200) if len(t) < 4000][:150]  # ~0.5 MB of distinct documents
    small, big = tmp_path / f"x1.{fmt}", tmp_path / f"x30.{fmt}"
    write_corpus(small, scaled_texts(texts, 1), fmt, rows_per_group=50)
    size = write_corpus(big, scaled_texts(texts, 30, big_every=150), fmt, rows_per_group=50)
    docs1, rss1 = peak(small, tmp_path / "o1", tok)
    docs30, rss30 = peak(big, tmp_path / "o30", tok)
    assert (docs1, docs30) == (len(texts), 30 * len(texts))
    assert rss30 <= 1.2 * rss1, (
        f"peak {rss30 / 1e6:.0f} MB at 30x ({size / 1e6:.0f} MB of {fmt}) vs {rss1 / 1e6:.0f} MB at 1x"
    )
