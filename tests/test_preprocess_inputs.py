"""Every input format gives the documents of the jsonl form of the same corpus, so the same bytes.

jsonl, .jsonl.gz, .jsonl.zst (several frames), parquet (several row groups), a folder saved by Hugging Face
``datasets.save_to_disk`` and standard input, mixed in one run, in sorted order; the reference is one jsonl file
of all the texts in that order, and megatron-core's builder (tests/megatron_oracle.py) writes it as Megatron-LM would.
"""

from __future__ import annotations

import gzip
import subprocess
import sys

import megatron_oracle as oracle
import pytest
from helpers_data import (
    assert_one_line_error,
    cli_env,
    files_under,
    jsonl_bytes,
    make_texts,
    preprocess,
    run_cli,
    save_dataset,
    snapshot,
    train_sp,
    write_jsonl,
    write_parquet,
    write_zst,
)

from cookbook.data.sources import expand
from cookbook.errors import CookbookError

pytest.importorskip("pyarrow")
pytest.importorskip("zstandard")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_sp(tmp_path_factory.mktemp("inputs_tok"), make_texts(80, seed=1), vocab_size=400)


@pytest.fixture
def mixed(tmp_path, corpus_texts):
    """A folder with one corpus spread over every format; (folder, texts in the sorted order of the names)."""
    d = tmp_path / "mixed"
    d.mkdir()
    t = corpus_texts
    n = len(t) // 6
    chunks = {
        "a.jsonl": t[:n],
        "b.jsonl.gz": t[n : 2 * n],
        "c.jsonl.zst": t[2 * n : 3 * n],
        "d.parquet": t[3 * n : 4 * n],
        "e_saved": t[4 * n : 5 * n],
        "f.jsonl.zstd": t[5 * n :],
    }
    write_jsonl(d / "a.jsonl", chunks["a.jsonl"])
    (d / "b.jsonl.gz").write_bytes(gzip.compress(jsonl_bytes(chunks["b.jsonl.gz"])))
    write_zst(d / "c.jsonl.zst", chunks["c.jsonl.zst"], frames=3)
    write_parquet(
        d / "d.parquet", {"text": chunks["d.parquet"], "id": list(range(len(chunks["d.parquet"])))}, row_group_size=5
    )
    save_dataset(d / "e_saved", {"text": chunks["e_saved"]}, num_shards=2)
    write_zst(d / "f.jsonl.zstd", chunks["f.jsonl.zstd"], frames=1)
    (d / "notes.txt").write_text("not part of the corpus")
    return d, [x for name in sorted(chunks) for x in chunks[name]]


def test_mixed_formats_equal_megatron_on_jsonl(tmp_path, mixed, tok):
    d, texts = mixed
    assert [i.path.name for i in expand([d])] == [
        "a.jsonl",
        "b.jsonl.gz",
        "c.jsonl.zst",
        "d.parquet",
        "e_saved",
        "f.jsonl.zstd",
    ]
    jsonl = write_jsonl(tmp_path / "all.jsonl", texts)
    oracle.megatron_preprocess(jsonl, str(tmp_path / "megatron"), oracle.Llama2(tok), ["text"], True)
    got = preprocess([d], tmp_path / "ours", tok, append_eod=True, block_mb=0.01)
    assert snapshot(got) == snapshot(tmp_path / "megatron_text_document")


def test_globs_and_files_mixed_in_given_order(tmp_path, mixed, tok):
    d, texts = mixed
    order = [d / "e_saved", str(d / "*.parquet"), d / "a.jsonl"]
    by_name = {}
    n = len(texts) // 6
    by_name["a"], by_name["d"], by_name["e"] = texts[:n], texts[3 * n : 4 * n], texts[4 * n : 5 * n]
    ref = preprocess(
        [write_jsonl(tmp_path / "r.jsonl", by_name["e"] + by_name["d"] + by_name["a"])], tmp_path / "ref", tok
    )
    assert snapshot(preprocess(order, tmp_path / "got", tok)) == snapshot(ref)


def test_parquet_columns_as_json_keys(tmp_path, tok):
    """Several keys; string, large_string, dictionary-encoded and list-of-string columns (sentence lists)."""
    import pyarrow as pa

    texts = make_texts(30, seed=5)
    titles = [t[:12] for t in texts]
    sentences = [[t[:5], "", t[5:]] for t in texts]
    records = [{"text": a, "title": b, "sents": c} for a, b, c in zip(texts, titles, sentences)]
    jsonl = write_jsonl(tmp_path / "in.jsonl", records)
    keys = ["text", "title", "sents"]
    ref = preprocess([jsonl], tmp_path / "ref", tok, json_keys=keys, append_eod=True)
    table = pa.table(
        {
            "text": pa.array(texts, pa.large_string()),
            "title": pa.array(titles).dictionary_encode(),
            "sents": pa.array(sentences, pa.list_(pa.string())),
            "other": list(range(30)),
        }
    )
    import pyarrow.parquet as pq

    pq.write_table(table, str(tmp_path / "in.parquet"), row_group_size=4)
    got = preprocess([tmp_path / "in.parquet"], tmp_path / "got", tok, json_keys=keys, append_eod=True)
    for key in keys:
        assert snapshot(got.replace("_text_", f"_{key}_")) == snapshot(ref.replace("_text_", f"_{key}_"))


def test_stdin(tmp_path, tok):
    texts = make_texts(50, seed=9)
    ref = preprocess([write_jsonl(tmp_path / "in.jsonl", texts)], tmp_path / "ref", tok, append_eod=True)
    out = tmp_path / "stdin"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cookbook",
            "preprocess",
            "--input",
            "-",
            "--output-prefix",
            str(out),
            "--tokenizer-model",
            str(tok),
            "--append-eod",
            "-q",
        ],
        input=jsonl_bytes(texts),
        capture_output=True,
        env=cli_env(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert snapshot(f"{out}_text_document") == snapshot(ref)


def test_document_longer_than_a_block(tmp_path, tok):
    """A line many blocks long is gathered in pieces; the result is the same as with one big block."""
    texts = make_texts(20, seed=4)
    texts[7] = " ".join(make_texts(3000, seed=8))  # ~600 KB, blocks of 64 KiB
    src = write_jsonl(tmp_path / "in.jsonl", texts)
    zst = write_zst(tmp_path / "in.jsonl.zst", texts, frames=1)
    ref = preprocess([src], tmp_path / "ref", tok, block_mb=64)
    assert snapshot(preprocess([src], tmp_path / "small", tok, block_mb=0.0625)) == snapshot(ref)
    assert snapshot(preprocess([zst], tmp_path / "zst", tok, block_mb=0.0625)) == snapshot(ref)


# --------------------------------------------------------------------------- bad input names the file and the row


def test_parquet_null_row_named(tmp_path, tok):
    write_parquet(tmp_path / "n.parquet", {"text": ["a", "b", None, "d"]}, row_group_size=2)
    with pytest.raises(CookbookError, match=r"n\.parquet row 3: column 'text' is null.*--skip-bad-lines"):
        preprocess([tmp_path / "n.parquet"], tmp_path / "o", tok)
    assert files_under(tmp_path / "o") == []


def test_parquet_skip_bad_rows(tmp_path, tok):
    from recipes.preprocess import PreprocessConfig, run

    write_parquet(tmp_path / "n.parquet", {"text": ["a", None, "c", None, "e"]}, row_group_size=2)
    s = run(
        PreprocessConfig([str(tmp_path / "n.parquet")], str(tmp_path / "o"), str(tok), skip_bad_lines=True, workers=1),
        show_progress=False,
    )
    assert s.documents == 3 and s.skipped_rows == 2
    assert [w.split(": ")[0] for w in s.skipped] == [
        f"{tmp_path / 'n.parquet'} row 2",
        f"{tmp_path / 'n.parquet'} row 4",
    ]
    ref = preprocess([write_jsonl(tmp_path / "r.jsonl", ["a", "c", "e"])], tmp_path / "r", tok)
    assert snapshot(s.outputs["text"]) == snapshot(ref)


def test_missing_or_non_text_column_skipped_whole_file(tmp_path, tok):
    from recipes.preprocess import PreprocessConfig, run

    write_parquet(tmp_path / "a.parquet", {"text": ["x", "y"]})
    write_parquet(tmp_path / "b.parquet", {"body": ["z"] * 5})
    write_parquet(tmp_path / "c.parquet", {"text": [1, 2, 3]})
    s = run(
        PreprocessConfig([str(tmp_path / "*.parquet")], str(tmp_path / "o"), str(tok), skip_bad_lines=True, workers=1),
        show_progress=False,
    )
    assert s.documents == 2 and s.skipped_rows == 8
    assert s.inputs[str(tmp_path / "*.parquet")].skipped == 8


def test_datasetdict_names_a_split(tmp_path, tok):
    import datasets

    datasets.disable_progress_bars()
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(CookbookError, match=r"DatasetDict.*dd/train"):
        preprocess([tmp_path / "dd"], tmp_path / "o", tok)


def test_arrow_null_row_named_through_the_dataset(tmp_path, tok):
    save_dataset(tmp_path / "ds", {"text": ["a", "b", "c", None, "e"]}, num_shards=2)
    with pytest.raises(CookbookError, match=r"ds row 4: column 'text' is null"):
        preprocess([tmp_path / "ds"], tmp_path / "o", tok)


def _cli_errors(tmp_path, tok):
    good = jsonl_bytes(make_texts(200, seed=2))
    import zstandard

    whole = zstandard.ZstdCompressor().compress(good)
    cases = {}
    d = tmp_path
    (d / "cut.jsonl.zst").write_bytes(whole[: len(whole) // 2])
    cases["cut.jsonl.zst"] = ["cut.jsonl.zst", "cut short"]
    (d / "garbage.jsonl.zst").write_bytes(whole[:4] + b"\x00" * 64)
    cases["garbage.jsonl.zst"] = ["garbage.jsonl.zst", "cannot read"]
    write_parquet(d / "full.parquet", {"text": make_texts(200, seed=3)}, row_group_size=20)
    data = (d / "full.parquet").read_bytes()
    (d / "cut.parquet").write_bytes(data[: len(data) * 2 // 3])
    cases["cut.parquet"] = ["cut.parquet", "is the file complete"]
    write_parquet(d / "nocol.parquet", {"body": ["a", "b"]})
    cases["nocol.parquet"] = ["nocol.parquet", "'text'", "body", "--skip-bad-lines"]
    write_parquet(d / "ints.parquet", {"text": [1, 2]})
    cases["ints.parquet"] = ["ints.parquet", "'text'", "int64", "not text"]
    write_parquet(d / "nulls.parquet", {"text": ["a", "b", "c", None]}, row_group_size=3)
    cases["nulls.parquet"] = ["nulls.parquet row 4", "null"]
    return cases


def test_bad_inputs_are_one_line_errors(tmp_path, tok):
    from concurrent.futures import ThreadPoolExecutor

    cases = _cli_errors(tmp_path, tok)
    with ThreadPoolExecutor(4) as pool:
        procs = {
            name: pool.submit(
                run_cli,
                "preprocess",
                "--input",
                tmp_path / name,
                "--output-prefix",
                tmp_path / "out" / name / "c",
                "--tokenizer-model",
                tok,
                "-q",
            )
            for name in cases
        }
    for name, words in cases.items():
        assert_one_line_error(procs[name].result(), *words)
        assert files_under(tmp_path / "out" / name) == [], name


def test_progress_on_a_terminal_only(tmp_path, tok):
    """On a terminal the bar shows bytes of the total, documents, MB/s, tokens/s and the time left; into a pipe,
    nothing but the summary."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    texts = make_texts(3000, seed=6)
    src = write_jsonl(tmp_path / "in.jsonl", texts)
    args = [
        sys.executable,
        "-m",
        "cookbook",
        "preprocess",
        "--input",
        str(src),
        "--output-prefix",
        str(tmp_path / "o"),
        "--tokenizer-model",
        str(tok),
        "-w",
        "1",
    ]
    piped = subprocess.run(args, capture_output=True, text=True, env=cli_env(), timeout=120)
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr
    master, slave = pty.openpty()
    # a terminal of 50 x 160, whatever the width of the one the tests run in (COLUMNS would override it)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    env = {k: v for k, v in cli_env().items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, env={**env, "TERM": "xterm"}
    )
    os.close(slave)
    seen = b""
    while True:
        try:
            data = os.read(master, 1 << 16)
        except OSError:
            break
        if not data:
            break
        seen += data
    assert proc.wait(timeout=120) == 0
    text = seen.decode(errors="replace")
    size = src.stat().st_size / 1e6
    assert f"/{size:,.0f} MB" in text and "docs" in text and "tokens/s" in text and "MB/s" in text, text[-2000:]


def test_summary_counts_per_input(tmp_path, tok):
    (tmp_path / "j").mkdir()
    write_jsonl(tmp_path / "j" / "a.jsonl", make_texts(7, seed=1))
    (tmp_path / "j" / "b.jsonl").write_bytes(jsonl_bytes(make_texts(5, seed=2)) + b"not json\n")
    write_parquet(tmp_path / "p.parquet", {"text": make_texts(4, seed=3) + [None]})
    proc = run_cli(
        "preprocess",
        "--input",
        "j/*.jsonl",
        "--input",
        "p.parquet",  # short names: rows never wrap
        "--output-prefix",
        "o",
        "--tokenizer-model",
        tok,
        "--skip-bad-lines",
        "-q",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    row = {
        name: next(line for line in lines if name in line and "documents," in line) for name in ("*.jsonl", "p.parquet")
    }
    assert "12 documents, 1 skipped" in row["*.jsonl"] and "4 documents, 1 skipped" in row["p.parquet"], proc.stdout
    assert "b.jsonl:6" in proc.stdout and "p.parquet row 5" in proc.stdout


def test_without_pyarrow_or_zstandard_one_line_says_what_to_install(tmp_path, tok):
    write_parquet(tmp_path / "a.parquet", {"text": ["x"]})
    write_zst(tmp_path / "a.jsonl.zst", ["x"], frames=1)
    script = """
import sys
sys.modules["pyarrow"] = sys.modules["zstandard"] = None  # import fails
from cookbook.errors import CookbookError
from recipes.preprocess import PreprocessConfig, run
try:
    run(PreprocessConfig([sys.argv[1]], sys.argv[2], sys.argv[3]), show_progress=False)
except CookbookError as e:
    print(e)
"""
    for name, module in (("a.parquet", "pyarrow"), ("a.jsonl.zst", "zstandard")):
        proc = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / name), str(tmp_path / "o"), str(tok)],
            capture_output=True,
            text=True,
            env=cli_env(),
            timeout=120,
        )
        assert f"needs {module}; pip install 'cookbook[data]'" in proc.stdout, proc.stdout + proc.stderr
