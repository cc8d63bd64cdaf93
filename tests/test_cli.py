"""The ``cookbook`` command line: help, version, entry points, ``data info``, ``tokenizer train``,
``sample-corpus``, and how usage errors and interrupts end."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from helpers_data import (
    assert_one_line_error,
    files_under,
    make_texts,
    preprocess,
    run_cli,
    train_sp,
    write_jsonl,
)

import cookbook
from cookbook.data.indexed import IndexedDataset
from cookbook.data.tokenizer import load_tokenizer

COMMANDS = ["preprocess", "merge", "data", "tokenizer", "sample-corpus"]


def output(proc) -> str:
    return proc.stdout + proc.stderr


def assert_ok(proc):
    assert proc.returncode == 0, output(proc)
    assert "Traceback" not in output(proc)


# --------------------------------------------------------------------------- help, version, entry points


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_the_commands(flag):
    proc = run_cli(flag)
    assert_ok(proc)
    for name in COMMANDS:
        assert re.search(rf"(^|\W){re.escape(name)}(\W|$)", proc.stdout, re.M), f"{name} not in --help:\n{proc.stdout}"
    assert "Usage" in proc.stdout


def test_version():
    proc = run_cli("--version")
    assert_ok(proc)
    assert output(proc).strip() == f"cookbook {cookbook.__version__}"
    assert importlib.metadata.version("cookbook") == cookbook.__version__


def test_console_script():
    script = shutil.which("cookbook") or str(Path(sys.executable).parent / "cookbook")
    if not Path(script).exists():
        pytest.skip("the cookbook console script is not installed")
    import subprocess

    proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert_ok(proc)
    assert all(name in proc.stdout for name in COMMANDS)


@pytest.mark.parametrize(
    "command, flags",
    [
        (
            ["preprocess"],
            [
                "--input",
                "--output-prefix",
                "--tokenizer-model",
                "--tokenizer-type",
                "--append-eod",
                "--workers",
                "--json-keys",
                "--skip-bad-lines",
            ],
        ),
        (["merge"], ["--input", "--output-prefix"]),
        (["data", "info"], ["--decode", "--tokenizer"]),
        (["tokenizer", "train"], ["--input", "--output", "--kind", "--model-type", "--vocab-size"]),
        (["sample-corpus"], ["--max-mb"]),
    ],
)
def test_command_help(command, flags):
    proc = run_cli(*command, "--help")
    assert_ok(proc)
    for flag in flags:
        assert flag in proc.stdout, f"{flag} not in {' '.join(command)} --help"


def test_interrupt_exits_130(monkeypatch, tmp_path, capsys):
    import cookbook.cli as cli
    import cookbook.data.sample_corpus as sc

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sc, "write_sample_corpus", interrupted)
    with pytest.raises(SystemExit) as e:
        cli.main(["sample-corpus", str(tmp_path / "c.jsonl")])
    assert e.value.code == 130
    assert "Traceback" not in capsys.readouterr().err


# Usage errors end like every other user-facing error: exit 2 and a message, no traceback.
@pytest.mark.parametrize(
    "args, word",
    [
        (["no-such-command"], "no-such-command"),
        (["preprocess", "--input", "x.jsonl"], "output"),  # a required option missing
        (["preprocess", "--input", "x.jsonl", "-o", "o", "-t", "t.model", "--workers", "many"], "workers"),
        (["merge", "--input", "x", "--output-prefix", "y", "--bogus-flag"], "bogus"),
    ],
    ids=["unknown-command", "missing-option", "bad-int", "unknown-option"],
)
def test_usage_errors_have_no_traceback(args, word):
    proc = run_cli(*args)
    assert "Traceback" not in output(proc), output(proc)
    assert proc.returncode == 2
    assert word in output(proc)


def test_no_arguments_shows_help_without_traceback():
    proc = run_cli()
    assert "Usage" in output(proc)
    assert "Traceback" not in output(proc), output(proc)
    assert proc.returncode in (0, 2)


# --------------------------------------------------------------------------- data info

TEXTS = [
    "The first document: plain words and digits 12345.",
    "Second one, with ünïcödé and 日本語 and an emoji 😀.",
    "third document",
    "a fourth\nspanning two lines",
] + make_texts(16, seed=5)


@pytest.fixture(scope="module")
def sp_tok(tmp_path_factory) -> Path:
    return train_sp(tmp_path_factory.mktemp("cli_tok"), TEXTS + make_texts(60, seed=6), vocab_size=400)


@pytest.fixture(scope="module")
def sp_data(tmp_path_factory, sp_tok) -> str:
    d = tmp_path_factory.mktemp("cli_data")
    return preprocess([write_jsonl(d / "c.jsonl", TEXTS)], d / "corpus", sp_tok, append_eod=True)


def _row(text: str, name: str) -> str:
    m = re.search(rf"{name}\s*\W\s*([^\s│|]+)", text)
    assert m, f"no {name!r} row in:\n{text}"
    return m.group(1)


def test_data_info(sp_data):
    ds = IndexedDataset(sp_data)
    for prefix in (sp_data, sp_data + ".bin", sp_data + ".idx"):
        proc = run_cli("data", "info", prefix)
        assert_ok(proc)
        text = output(proc)
        assert int(_row(text, "documents").replace(",", "")) == len(TEXTS) == ds.num_documents
        assert int(_row(text, "tokens").replace(",", "")) == ds.num_tokens
        assert _row(text, "dtype") == "uint16"


def test_decode_library_gives_back_the_original_texts(sp_data, sp_tok):
    """Llama2Tokenizer with --append-eod: decoding each stored document gives its text back."""
    from recipes.data_info import decode_documents

    tok = load_tokenizer(sp_tok)
    ds = IndexedDataset(sp_data)
    assert all(ds.document(i)[0] == tok.bos and ds.document(i)[-1] == tok.eod for i in range(ds.num_documents))
    assert decode_documents(sp_data, tok, len(TEXTS)) == TEXTS


def test_data_info_decode_prints_the_first_document(sp_data, sp_tok):
    proc = run_cli("data", "info", sp_data, "--decode", "1", "--tokenizer", sp_tok)
    assert_ok(proc)
    text = output(proc)
    assert "document 0" in text
    assert TEXTS[0] in text
    assert TEXTS[1] not in text and "document 1" not in text


def test_data_info_decode_several(sp_data, sp_tok):
    proc = run_cli("data", "info", sp_data, "--decode", "3", "--tokenizer-model", sp_tok)
    assert_ok(proc)
    text = output(proc)
    after = text.split("document 0", 1)[1]
    positions = [after.find(t) for t in TEXTS[:3]]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), text
    assert "document 3" not in text


def test_data_info_decode_prints_long_lines_verbatim(tmp_path, sp_tok):
    long_text = "word " * 60 + "end\n\tindented\tcolumns\n" + "x" * 150
    prefix = preprocess([write_jsonl(tmp_path / "long.jsonl", [long_text])], tmp_path / "long", sp_tok, append_eod=True)
    proc = run_cli("data", "info", prefix, "--decode", "1", "--tokenizer", sp_tok)
    assert_ok(proc)
    assert long_text in output(proc)


def test_data_info_counts_empty_documents(tmp_path, sp_tok):
    """SentencePieceTokenizer adds no BOS: "" is a document with no tokens, still counted."""
    texts = ["", "hello world", "", ""]
    prefix = preprocess(
        [write_jsonl(tmp_path / "e.jsonl", texts)], tmp_path / "e", sp_tok, tokenizer_type="SentencePieceTokenizer"
    )
    proc = run_cli(
        "data", "info", prefix, "--decode", "4", "--tokenizer", sp_tok, "--tokenizer-type", "SentencePieceTokenizer"
    )
    assert_ok(proc)
    text = output(proc)
    assert _row(text, "documents") == "4"
    assert _row(text, "sequences") == "1"
    assert _row(text, "empty documents") == "3"
    assert "hello world" in text and "document 3" in text


def test_data_info_decode_needs_a_tokenizer(sp_data):
    assert_one_line_error(run_cli("data", "info", sp_data, "--decode", "1"), "--tokenizer")


def test_data_info_missing_dataset(tmp_path):
    assert_one_line_error(run_cli("data", "info", tmp_path / "nothing_here"), "nothing_here")


# --------------------------------------------------------------------------- tokenizer train


@pytest.fixture(scope="module")
def train_corpus(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("train_corpus")
    return write_jsonl(d / "train.jsonl", TEXTS + make_texts(80, seed=8))


CHECK = TEXTS[:4] + ["  two leading spaces", "tab\tand\nnewline", "a <s> literal and </s>", ""]


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_tokenizer_train_sentencepiece(tmp_path, train_corpus, model_type):
    proc = run_cli(
        "tokenizer",
        "train",
        "--input",
        train_corpus,
        "--output",
        tmp_path / "tok",
        "--kind",
        "sentencepiece",
        "--model-type",
        model_type,
        "--vocab-size",
        "400",
    )
    assert_ok(proc)
    path = tmp_path / "tok.model"  # the .model suffix is added
    assert path.exists()
    tok = load_tokenizer(path)
    assert tok.type == "Llama2Tokenizer"
    assert 300 < tok.vocab_size <= 400
    assert (tok.bos, tok.eod) == (1, 2)
    for t in CHECK:
        ids = tok.tokenize(t)
        assert ids[0] == 1 and max(ids) < tok.vocab_size
        assert tok.decode(ids) == t
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    assert sp.encode("日本語")  # byte fallback or pieces: never empty, never unk
    assert sp.unk_id() not in sp.encode("unseen ✓ ∑ characters")


def test_tokenizer_train_sentencepiece_kinds_differ(tmp_path, train_corpus):
    for model_type in ("bpe", "unigram"):
        proc = run_cli(
            "tokenizer",
            "train",
            "-i",
            train_corpus,
            "-o",
            tmp_path / f"{model_type}.model",
            "--model-type",
            model_type,
            "--vocab-size",
            "400",
        )
        assert_ok(proc)
    assert (tmp_path / "bpe.model").read_bytes() != (tmp_path / "unigram.model").read_bytes()


def test_tokenizer_train_hf_bpe_loads_in_transformers(tmp_path, train_corpus):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    proc = run_cli(
        "tokenizer", "train", "--input", train_corpus, "--output", out, "--kind", "hf-bpe", "--vocab-size", "500"
    )
    assert_ok(proc)
    assert (out / "tokenizer.json").exists()
    ours = load_tokenizer(out)
    assert ours.type == "HuggingFaceTokenizer"
    auto = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert ours.vocab_size == len(auto)
    assert ours.eod == auto.eos_token_id is not None
    assert ours.bos == auto.bos_token_id is not None
    for t in CHECK + ["x<|end_of_text|>y <|begin_of_text|> z"]:
        assert auto(t).input_ids == ours.tokenize(t), t
    flat, lengths = ours.encode_batch(CHECK)
    assert flat.tolist() == [i for t in CHECK for i in auto(t).input_ids]
    assert lengths.tolist() == [len(auto(t).input_ids) for t in CHECK]


def test_tokenizer_train_bad_requests(tmp_path, train_corpus):
    base = ["tokenizer", "train", "--input", train_corpus, "--output", tmp_path / "t.model"]
    assert_one_line_error(run_cli(*base, "--kind", "wordpiece"), "wordpiece")
    assert_one_line_error(run_cli(*base, "--model-type", "char"), "char")
    assert_one_line_error(run_cli(*base, "--vocab-size", "10"), "10")
    assert_one_line_error(
        run_cli("tokenizer", "train", "--input", tmp_path / "none.jsonl", "--output", tmp_path / "t.model"),
        "none.jsonl",
    )
    assert files_under(tmp_path) == []


# --------------------------------------------------------------------------- sample-corpus


def test_sample_corpus_max_mb(tmp_path):
    out = tmp_path / "corpus.jsonl"
    proc = run_cli("sample-corpus", out, "--max-mb", "1")
    assert_ok(proc)
    lines = out.read_bytes().splitlines()
    assert len(lines) > 5
    docs = [json.loads(line) for line in lines]
    assert all(isinstance(d.get("text"), str) and d["text"] for d in docs)
    total = sum(len(d["text"]) for d in docs)
    assert 0.5e6 < total <= 1e6
    assert out.stat().st_size < 1.3e6
    assert f"{len(docs):,} documents" in output(proc)
    assert [p.name for p in files_under(tmp_path)] == ["corpus.jsonl"]


def test_sample_corpus_into_missing_folder(tmp_path):
    assert_one_line_error(run_cli("sample-corpus", tmp_path / "no" / "such" / "c.jsonl", "--max-mb", "0.1"), "no")
    assert files_under(tmp_path) == []


# --------------------------------------------------------------------------- the examples of --help, end to end


def test_help_examples_end_to_end(tmp_path):
    """sample-corpus -> tokenizer train -> preprocess -> merge -> data info, as --help shows them."""

    def ok(*args):
        proc = run_cli(*args, cwd=tmp_path)
        assert_ok(proc)
        return output(proc)

    ok("sample-corpus", "corpus.jsonl", "--max-mb", "0.3")
    ok("tokenizer", "train", "--input", "corpus.jsonl", "--output", "tok.model", "--vocab-size", "600")
    ok(
        "preprocess",
        "--input",
        "corpus.jsonl",
        "--output-prefix",
        "data/corpus",
        "--tokenizer",
        "tok.model",
        "--append-eod",
        "-q",
    )
    ok("preprocess", "-i", "corpus.jsonl", "-o", "data/again", "-t", "tok.model", "-q")
    ok("merge", "--input", "data/", "--output-prefix", "data/all")
    text = ok("data", "info", "data/all", "--decode", "1", "--tokenizer", "tok.model")
    n_docs = len((tmp_path / "corpus.jsonl").read_bytes().splitlines())
    assert int(_row(text, "documents").replace(",", "")) == 2 * n_docs
    merged = IndexedDataset(tmp_path / "data" / "all")
    again = IndexedDataset(tmp_path / "data" / "again_text_document")
    corpus = IndexedDataset(tmp_path / "data" / "corpus_text_document")
    # sorted(): again_text_document comes before corpus_text_document
    assert merged.document(0).tolist() == again.document(0).tolist()
    assert merged.document(n_docs).tolist() == corpus.document(0).tolist()
    first = json.loads((tmp_path / "corpus.jsonl").read_bytes().splitlines()[0])["text"]
    assert load_tokenizer(tmp_path / "tok.model").decode(merged.document(0).tolist()) == first
