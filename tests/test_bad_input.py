"""``cookbook preprocess`` on bad input: one line, exit code 2, no traceback, nothing half-written.

Also: --skip-bad-lines keeps exactly the good documents, a failed run leaves an earlier dataset at
the same prefix untouched, --debug shows the traceback, and the ways of naming inputs (gzip,
folder, glob, several --input) give the documents in the documented order.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers_data import (
    assert_one_line_error,
    documents,
    files_under,
    make_texts,
    preprocess,
    run_cli,
    snapshot,
    train_sp,
    write_jsonl,
)

from cookbook.data.tokenizer import load_tokenizer
from cookbook.errors import CookbookError

GOOD = b'{"text": "a good document"}\n'


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    return train_sp(tmp_path_factory.mktemp("bad_input_tok"), make_texts(60, seed=1), vocab_size=400)


@pytest.fixture(scope="module")
def tokenizer(tok):
    return load_tokenizer(tok)


def expected_docs(tokenizer, texts, append_eod=True) -> list[list[int]]:
    """What Megatron-LM writes per document: tokenize(text) (+ eod when non-empty)."""
    out = []
    for t in texts:
        ids = tokenizer.tokenize(t)
        out.append(ids + [tokenizer.eod] if append_eod and ids else ids)
    return out


def preprocess_cli(inputs, out_prefix, tok, *extra, cwd=None):
    return run_cli(*preprocess_args(inputs, out_prefix, tok, *extra), cwd=cwd)


def preprocess_args(inputs, out_prefix, tok, *extra) -> list:
    args = ["preprocess"]
    for i in inputs:
        args += ["--input", i]
    if tok is not None:
        args += ["--tokenizer-model", tok]
    return [*args, "--output-prefix", out_prefix, *extra]


# --------------------------------------------------------------------------- one-line errors
# Every failing run below is a real `python -m cookbook preprocess` subprocess. They are all
# launched at once by the module fixture `error_runs` (each takes about a second to start), and
# each test checks its own run: exit 2, one "error:" line naming the file (and line), no
# traceback, and nothing at all under the run's output folder.

# name -> (file content, number of the bad line, words the message must hold)
BAD_LINES = {
    "not-json": (GOOD + b"not json at all\n" + GOOD, 2, ["not valid JSON"]),
    "truncated-json": (GOOD * 3 + b'{"text": "no end', 4, ["not valid JSON"]),
    "json-list": (GOOD + b'["text", "a list"]\n', 2, ["list", "not an object"]),
    "json-string": (b'"just a string"\n' + GOOD, 1, ["not an object"]),
    "missing-key": (GOOD + GOOD + b'{"txt": "wrong key"}\n', 3, ["'text'"]),
    "number-value": (GOOD + b'{"text": 12345}\n', 2, ["'text'", "int"]),
    "dict-value": (GOOD + b'{"text": {"nested": "x"}}\n', 2, ["'text'", "dict"]),
    "null-value": (GOOD + b'{"text": null}\n', 2, ["'text'"]),
    "list-with-number": (GOOD + b'{"text": ["ok", 1]}\n', 2, ["'text'"]),
    "invalid-utf8": (GOOD + b'{"text": "bad bytes \xff\xfe here"}\n' + GOOD, 2, ["UTF-8"]),
    "lone-surrogate": (GOOD + b'{"text": "a \\ud800 b"}\n', 2, ["surrogate"]),
    # blank lines are ignored but still counted in the line numbers
    "after-blank-lines": (GOOD + b"\n   \n" + GOOD + b"{oops}\n", 5, ["not valid JSON"]),
}


def _bad_line_case(name):
    content, line, words = BAD_LINES[name]

    def make(d: Path, tok: Path):
        src = d / f"{name}.jsonl"
        src.write_bytes(content)
        return preprocess_args([src], d / "out" / "corpus", tok, "-q"), [
            f"{src.name}:{line}",
            "--skip-bad-lines",
            *words,
        ]

    return make


def _second_file(d, tok):
    a = write_jsonl(d / "a.jsonl", make_texts(5))
    b = d / "b.jsonl"
    b.write_bytes(GOOD * 6 + b"[1]\n")
    return preprocess_args([a, b], d / "out" / "corpus", tok, "-q"), ["b.jsonl:7"]


def _second_key(d, tok):
    """--json-keys text,title: a line without 'title' fails the run; neither dataset is written."""
    src = write_jsonl(d / "k.jsonl", [{"text": "a", "title": "b"}] * 4 + [{"text": "no title"}])
    return preprocess_args([src], d / "out" / "corpus", tok, "--json-keys", "text,title", "-q"), [
        "k.jsonl:5",
        "'title'",
    ]


def _file_case(name: str, content: bytes):
    def make(d, tok):
        src = d / name
        src.write_bytes(content)
        return preprocess_args([src], d / "out" / "corpus", tok, "-q"), [name]

    return make


def _missing(d, tok):
    return preprocess_args([d / "nope.jsonl"], d / "out" / "corpus", tok, "-q"), ["nope.jsonl"]


def _glob(d, tok):
    (d / "other.txt").write_text("x")
    return preprocess_args([str(d / "zz*.jsonl")], d / "out" / "corpus", tok, "-q"), ["zz*.jsonl"]


def _folder(d, tok):
    f = d / "no_jsonl"
    f.mkdir()
    (f / "readme.txt").write_text("not a corpus")
    (f / "data.csv").write_text("a,b\n")
    return preprocess_args([f], d / "out" / "corpus", tok, "-q"), ["no_jsonl"]


def _corpus(d) -> Path:
    return write_jsonl(d / "c.jsonl", make_texts(5))


def _missing_tokenizer(d, tok):
    return preprocess_args([_corpus(d)], d / "out" / "corpus", d / "no_such_tok.model", "-q"), ["no_such_tok.model"]


def _no_tokenizer(d, tok):
    return preprocess_args([_corpus(d)], d / "out" / "corpus", None, "-q"), ["--tokenizer-model"]


def _not_a_model(d, tok):
    fake = d / "fake.model"
    fake.write_bytes(b"this is not a sentencepiece model")
    return preprocess_args([_corpus(d)], d / "out" / "corpus", fake, "-q"), ["fake.model"]


def _unknown_type(d, tok):
    args = preprocess_args([_corpus(d)], d / "out" / "corpus", tok, "--tokenizer-type", "NoSuchTokenizer", "-q")
    return args, ["NoSuchTokenizer", "Llama2Tokenizer"]


def _flag(flag, value, word):
    def make(d, tok):
        return preprocess_args([_corpus(d)], d / "out" / "corpus", tok, flag, value, "-q"), [word]

    return make


def _no_quiet(content: bytes):
    def make(d, tok):
        src = d / "noquiet.jsonl"
        src.write_bytes(content)
        return preprocess_args([src], d / "out" / "corpus", tok), ["noquiet.jsonl"]  # progress bar on

    return make


CASES = {
    **{f"line-{name}": _bad_line_case(name) for name in BAD_LINES},
    "line-in-second-file": _second_file,
    "line-missing-second-key": _second_key,
    "empty-file": _file_case("empty.jsonl", b""),
    "blank-lines-only": _file_case("blank.jsonl", b"\n\n   \n\t\n"),
    "truncated-gzip": _file_case("cut.jsonl.gz", gzip.compress(GOOD * 500)[:60]),
    "gz-name-not-gzip": _file_case("plain.jsonl.gz", GOOD * 3),
    "nonexistent-input": _missing,
    "glob-matches-nothing": _glob,
    "folder-without-jsonl": _folder,
    "missing-tokenizer": _missing_tokenizer,
    "no-tokenizer-given": _no_tokenizer,
    "tokenizer-not-a-model": _not_a_model,
    "unknown-tokenizer-type": _unknown_type,
    "workers-zero": _flag("--workers", "0", "--workers"),
    "unknown-backend": _flag("--tokenizer-backend", "fastest", "fastest"),
    "no-quiet-bad-line": _no_quiet(GOOD + b"not json\n"),
    "no-quiet-empty-file": _no_quiet(b""),
}
NO_QUIET = ["no-quiet-bad-line", "no-quiet-empty-file"]


@pytest.fixture(scope="module")
def error_runs(tmp_path_factory, tok):
    """case -> (finished process, its output folder, words its message must hold); run concurrently."""
    root = tmp_path_factory.mktemp("error_runs")
    specs = {}
    for name, make in CASES.items():
        d = root / name
        d.mkdir()
        specs[name] = (*make(d, tok), d / "out")
    with ThreadPoolExecutor(max_workers=max(2, min(8, (os.cpu_count() or 2) * 2))) as pool:
        futures = {name: pool.submit(run_cli, *args) for name, (args, _, _) in specs.items()}
    return {name: (futures[name].result(), out, words) for name, (_, words, out) in specs.items()}


@pytest.mark.parametrize("case", [c for c in CASES if c not in NO_QUIET])
def test_bad_input_is_one_line_error(error_runs, case):
    proc, out, words = error_runs[case]
    assert_one_line_error(proc, *words)
    assert files_under(out) == [], "a failed run left files behind"


@pytest.mark.parametrize("case", NO_QUIET)
def test_error_is_one_line_without_quiet(error_runs, case):
    proc, out, words = error_runs[case]
    assert files_under(out) == []
    assert_one_line_error(proc, *words)


# --------------------------------------------------------------------------- --skip-bad-lines


def _summary_value(text: str, row: str) -> int:
    m = re.search(rf"{row}\W+([\d,]+)", text)
    assert m, f"no {row!r} row in the summary:\n{text}"
    return int(m.group(1).replace(",", ""))


def test_skip_bad_lines_keeps_exactly_the_good_documents(tmp_path, tok, tokenizer):
    good = make_texts(12, seed=7)
    bad = [content.splitlines(keepends=True)[line - 1] for content, line, _ in BAD_LINES.values()]
    bad = [b if b.endswith(b"\n") else b + b"\n" for b in bad]
    lines, good_iter = [], iter(good)
    for i in range(len(good) + len(bad)):
        if i % 2 and bad:
            lines.append(bad.pop())
        else:
            lines.append(write_line(next(good_iter)))
    lines += [write_line(t) for t in good_iter] + [b"\n"]  # a trailing blank line is no bad line
    n_bad = len(lines) - len(good) - 1
    src = tmp_path / "mixed.jsonl"
    src.write_bytes(b"".join(lines))
    out = tmp_path / "out" / "corpus"
    proc = preprocess_cli([src], out, tok, "--skip-bad-lines", "--append-eod", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert documents(f"{out}_text_document") == expected_docs(tokenizer, good)
    text = proc.stdout + proc.stderr
    assert _summary_value(text, "skipped lines") == n_bad
    assert _summary_value(text, "documents") == len(good)
    assert "mixed.jsonl:2" in text.replace("\n", "")  # the first skipped line is named (a long path may wrap)
    assert sorted(p.name for p in files_under(tmp_path / "out")) == [
        "corpus_text_document.bin",
        "corpus_text_document.idx",
    ]


def write_line(text: str) -> bytes:
    return (json.dumps({"text": text}) + "\n").encode()


def test_skip_bad_lines_in_process_reports_locations(tmp_path, tok, tokenizer):
    src = tmp_path / "m.jsonl"
    src.write_bytes(GOOD + b"[1]\n" + GOOD + b"\n" + b'{"text": 3}\n')
    from recipes.preprocess import PreprocessConfig, run

    s = run(
        PreprocessConfig([str(src)], str(tmp_path / "o"), str(tok), skip_bad_lines=True, workers=1), show_progress=False
    )
    assert s.documents == 2
    assert [w.split(": ")[0] for w in s.skipped] == [f"{src}:2", f"{src}:5"]


def test_skip_bad_lines_with_no_good_line_fails(tmp_path, tok):
    src = tmp_path / "allbad.jsonl"
    src.write_bytes(b'[1]\nnope\n{"text": 1}\n')
    proc = preprocess_cli([src], tmp_path / "out" / "corpus", tok, "--skip-bad-lines", "-q")
    assert_one_line_error(proc, "allbad.jsonl", "3")
    assert files_under(tmp_path / "out") == []


# --------------------------------------------------------------------------- nothing lost


def test_failed_run_keeps_the_earlier_dataset(tmp_path, tok):
    out_dir = tmp_path / "out"
    good = write_jsonl(tmp_path / "good.jsonl", make_texts(20, seed=3))
    proc = preprocess_cli([good], out_dir / "corpus", tok, "--append-eod", "-q")
    assert proc.returncode == 0, proc.stderr
    before = snapshot(out_dir / "corpus_text_document")
    listing = files_under(out_dir)

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(GOOD * 10 + b"not json\n")
    for source in (bad, tmp_path / "missing.jsonl"):
        proc = preprocess_cli([source], out_dir / "corpus", tok, "--append-eod", "-q")
        assert_one_line_error(proc, source.name)
        assert snapshot(out_dir / "corpus_text_document") == before
        assert files_under(out_dir) == listing, "a temporary file was left behind"


def test_failure_after_tokens_were_written_leaves_nothing(tmp_path, tok):
    """Small blocks, so the .bin has been written to before the bad line near the end is read."""
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:
        for i in range(2500):
            f.write(write_line(f"document {i} " + "some words to tokenize " * 4))
        f.write(b"oops\n")
    out_dir = tmp_path / "out"
    from recipes.preprocess import PreprocessConfig, run

    with pytest.raises(CookbookError, match=r"big\.jsonl:2501"):
        run(PreprocessConfig([str(big)], str(out_dir / "c"), str(tok), block_mb=0.0001, workers=1), show_progress=False)
    assert files_under(out_dir) == []

    # and with an earlier dataset at the prefix, it survives byte for byte
    prefix = preprocess([write_jsonl(tmp_path / "small.jsonl", make_texts(4))], out_dir / "c", tok)
    before, listing = snapshot(prefix), files_under(out_dir)
    with pytest.raises(CookbookError, match=r"big\.jsonl:2501"):
        run(PreprocessConfig([str(big)], str(out_dir / "c"), str(tok), block_mb=0.0001, workers=1), show_progress=False)
    assert snapshot(prefix) == before
    assert files_under(out_dir) == listing


def test_line_numbers_across_blocks(tmp_path, tok):
    src = tmp_path / "long.jsonl"
    with open(src, "wb") as f:
        for i in range(3000):
            f.write(write_line(f"line {i}") if i % 7 else b"\n")
        f.write(b'{"text": false}\n')
    from recipes.preprocess import PreprocessConfig, run

    with pytest.raises(CookbookError, match=r"long\.jsonl:3001: key 'text'"):
        run(
            PreprocessConfig([str(src)], str(tmp_path / "o"), str(tok), block_mb=0.0001, workers=1), show_progress=False
        )


# --------------------------------------------------------------------------- --debug


def test_debug_shows_traceback(tmp_path, tok):
    args = [
        "preprocess",
        "--input",
        tmp_path / "nope.jsonl",
        "--output-prefix",
        tmp_path / "o",
        "--tokenizer-model",
        tok,
        "-q",
    ]
    proc = run_cli("--debug", *args)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
    assert "CookbookError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error:")
    # the environment variable does the same
    from helpers_data import cli_env

    proc = run_cli(*args, env={**cli_env(), "COOKBOOK_DEBUG": "1"})
    assert proc.returncode == 2 and "Traceback" in proc.stderr
    # and without either: no traceback
    assert_one_line_error(run_cli(*args), "nope.jsonl")


# --------------------------------------------------------------------------- how inputs are named


def test_gzip_input_is_byte_identical(tmp_path, tok):
    texts = make_texts(40, seed=11)
    plain = write_jsonl(tmp_path / "c.jsonl", texts)
    gz = tmp_path / "c.jsonl.gz"
    gz.write_bytes(gzip.compress(plain.read_bytes()))
    ref = preprocess([plain], tmp_path / "plain", tok, append_eod=True)
    proc = preprocess_cli([gz], tmp_path / "gz", tok, "--append-eod", "-q")
    assert proc.returncode == 0, proc.stderr
    assert snapshot(tmp_path / "gz_text_document") == snapshot(ref)


@pytest.fixture
def shards(tmp_path):
    """Four shards whose sorted() order differs from creation and numeric order, one gzipped,
    one with CRLF line ends, one without a final newline; an empty and a blank shard; and a file
    that is no jsonl."""
    d = tmp_path / "shards"
    d.mkdir()
    texts = {name: make_texts(6, seed=i + 20) for i, name in enumerate(["b.jsonl.gz", "2.jsonl", "10.jsonl", "a.json"])}
    gz_plain = write_jsonl(tmp_path / "tmp.jsonl", texts["b.jsonl.gz"]).read_bytes()
    (d / "b.jsonl.gz").write_bytes(gzip.compress(gz_plain))
    write_jsonl(d / "2.jsonl", texts["2.jsonl"])
    (d / "10.jsonl").write_bytes(b"".join(write_line(t).replace(b"\n", b"\r\n") for t in texts["10.jsonl"]))
    (d / "a.json").write_bytes(b"".join(write_line(t) for t in texts["a.json"]).rstrip(b"\n"))
    (d / "notes.txt").write_text("not part of the corpus\n")
    (d / "0-empty.jsonl").write_bytes(b"")  # an empty shard and a blank one add no documents
    (d / "3-blank.jsonl").write_bytes(b"\n\n")
    return d, texts


def test_folder_input_is_sorted(tmp_path, tok, tokenizer, shards):
    d, texts = shards
    order = sorted(texts)
    assert order == ["10.jsonl", "2.jsonl", "a.json", "b.jsonl.gz"]
    concat = write_jsonl(tmp_path / "concat.jsonl", [t for name in order for t in texts[name]])
    ref = preprocess([concat], tmp_path / "ref", tok, append_eod=True)
    proc = preprocess_cli([d], tmp_path / "folder", tok, "--append-eod", "-q")
    assert proc.returncode == 0, proc.stderr
    assert snapshot(tmp_path / "folder_text_document") == snapshot(ref)
    assert documents(ref) == expected_docs(tokenizer, [t for name in order for t in texts[name]])


def test_glob_input_is_sorted(tmp_path, tok, shards):
    d, texts = shards
    order = ["10.jsonl", "2.jsonl", "b.jsonl.gz"]  # what *.jsonl* matches, sorted
    concat = write_jsonl(tmp_path / "concat.jsonl", [t for name in order for t in texts[name]])
    ref = preprocess([concat], tmp_path / "ref", tok, append_eod=True)
    proc = preprocess_cli([str(d / "*.jsonl*")], tmp_path / "glob", tok, "--append-eod", "-q")
    assert proc.returncode == 0, proc.stderr
    assert snapshot(tmp_path / "glob_text_document") == snapshot(ref)


def test_several_inputs_keep_the_given_order(tmp_path, tok, shards):
    d, texts = shards
    order = ["b.jsonl.gz", "a.json", "2.jsonl", "10.jsonl"]  # not sorted
    concat = write_jsonl(tmp_path / "concat.jsonl", [t for name in order for t in texts[name]])
    ref = preprocess([concat], tmp_path / "ref", tok, append_eod=True)
    proc = preprocess_cli([d / n for n in order], tmp_path / "repeat", tok, "--append-eod", "-q")
    assert proc.returncode == 0, proc.stderr
    assert snapshot(tmp_path / "repeat_text_document") == snapshot(ref)
    # comma-separated does the same
    proc = preprocess_cli([",".join(str(d / n) for n in order)], tmp_path / "comma", tok, "--append-eod", "-q")
    assert proc.returncode == 0, proc.stderr
    assert snapshot(tmp_path / "comma_text_document") == snapshot(ref)


def test_folder_and_file_mixed_keep_the_given_order(tmp_path, tok, shards):
    """--input FILE --input FOLDER: the file first, then the folder's files sorted."""
    d, texts = shards
    extra = write_jsonl(tmp_path / "extra.jsonl", make_texts(3, seed=99))
    sub = tmp_path / "sub"
    sub.mkdir()
    for name in ("2.jsonl", "10.jsonl"):
        shutil.copy(d / name, sub / name)
    expected = make_texts(3, seed=99) + texts["10.jsonl"] + texts["2.jsonl"]
    ref = preprocess([write_jsonl(tmp_path / "concat.jsonl", expected)], tmp_path / "ref", tok)
    got = preprocess([extra, sub], tmp_path / "mixed", tok)
    assert snapshot(got) == snapshot(ref)
