"""One message, one line: when output goes to a pipe, nothing is wrapped, truncated or padded, whatever the line width
(COLUMNS=40 here) and however long the paths (a folder name of ~150 characters); tables become a line per row and no
terminal codes or box drawing appear."""

from __future__ import annotations

import re

import pytest
from conftest import stdlib_texts
from helpers_data import cli_env, run_cli, write_jsonl
from helpers_train import SMALL, check

ANSI = re.compile(r"\x1b\[")
BOX = re.compile(r"[│┃─━┏┓┗┛╭╮╰╯┡┩]")


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("out") / ("a_rather_long_folder_name_" * 6)[:150]
    folder.mkdir()
    return folder


def narrow(*args, cwd=None, timeout=300):
    env = {**cli_env(), "COLUMNS": "40", "LINES": "10"}
    return run_cli(*args, cwd=cwd, env=env, timeout=timeout)


def assert_plain(text: str, *whole: str) -> None:
    """No terminal codes, no box drawing, no padding; each string in ``whole`` appears unbroken on some line."""
    assert not ANSI.search(text), text
    assert not BOX.search(text), text
    for line in text.splitlines():
        assert line == line.rstrip(), f"padded line: {line!r}"
    lines = text.splitlines()
    for w in whole:
        assert any(w in line for line in lines), f"{w!r} is not whole on one line:\n{text}"


def test_commands_print_one_line_per_message_into_a_pipe(long_dir, sp_model):
    corpus = write_jsonl(long_dir / "corpus.jsonl", stdlib_texts(12, offset=900))
    prefix = long_dir / "data" / "corpus"
    proc = check(
        narrow(
            "preprocess", "--input", corpus, "--output-prefix", prefix, "--tokenizer-model", sp_model, "--append-eod"
        )
    )
    assert_plain(proc.stdout + proc.stderr, f"{prefix}_text_document.bin/.idx")
    assert re.search(r"^documents: 12$", proc.stdout, re.M), proc.stdout

    dataset = f"{prefix}_text_document"
    proc = check(narrow("data", "info", dataset))
    assert_plain(proc.stdout, dataset)
    assert re.search(r"^documents: 12$", proc.stdout, re.M)

    proc = check(narrow("merge", "--input", dataset, "--output-prefix", long_dir / "merged"))
    assert_plain(proc.stdout, f"{long_dir / 'merged'}.bin/.idx")

    save = long_dir / "ckpt"
    proc = check(
        narrow(
            "pretrain",
            *SMALL,
            "--data-path",
            dataset,
            "--tokenizer-model",
            sp_model,
            "--seq-length",
            "32",
            "--micro-batch-size",
            "2",
            "--train-iters",
            "2",
            "--log-interval",
            "1",
            "--eval-interval",
            "0",
            "--split",
            "100,0,0",
            "--dtype",
            "fp32",
            "--device",
            "cpu",
            "--save",
            save,
        )
    )
    out = proc.stdout + proc.stderr
    assert_plain(out, f"saved {save / 'step_000002'}")
    assert re.search(r"^step +2/2 +loss [0-9.]+ .* tokens/s .* mem [0-9.]+ GiB$", out, re.M), out

    proc = check(
        narrow("eval", "--load", save, "--ppl-files", corpus, "--append-eod", "--seq-length", "32", "--device", "cpu")
    )
    assert_plain(proc.stdout, str(corpus))

    proc = check(
        narrow(
            "generate",
            "--load",
            save,
            "--prompt",
            "def main(",
            "--max-new-tokens",
            "3",
            "--device",
            "cpu",
            "--output",
            long_dir / "generations.jsonl",
        )
    )
    assert_plain(proc.stdout, str(long_dir / "generations.jsonl"))

    proc = check(
        narrow("convert", "--from", "cookbook", "--to", "hf", "--load-dir", save, "--save-dir", long_dir / "hf")
    )
    assert_plain(proc.stdout, str(long_dir / "hf"))

    proc = check(narrow("plan", "--preset", "llama2-7b", "--num-gpus", "8"))
    assert_plain(proc.stdout, "recommended: ")
    assert " | " in proc.stdout  # the layouts table, a line per row


def test_errors_and_usage_errors_stay_one_line(long_dir):
    missing = long_dir / "missing" / "ckpt"
    proc = narrow("generate", "--load", missing, "--prompt", "x")
    assert proc.returncode == 2
    assert_plain(proc.stderr, str(missing))
    assert len(proc.stderr.strip().splitlines()) == 1
