"""Checkpoints travel: a run folder copied to another path, with the folder it was trained in gone, works with every
command from any directory, without --tokenizer-model, because every save carries its tokenizer in hf/ and names
it relative to itself. Saves of earlier versions (a path relative to where training ran) still load where that
path resolves, and otherwise fail with one line naming --tokenizer-model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from conftest import stdlib_texts
from helpers_data import assert_one_line_error, cli_env, run_cli, write_jsonl
from helpers_train import CPU_RUN, SMALL, check

from cookbook.engine.checkpoint import find_checkpoint, read_config

TRAIN = [*CPU_RUN, "--split", "100,0,0"]
GREEDY = "--prompt x --max-new-tokens 2 --temperature 0 --device cpu".split()  # two tokens, greedy


@pytest.fixture(scope="module")
def moved(tmp_path_factory, sp_model):
    """A run trained in folder ``home`` with relative paths, copied to ``elsewhere/copy``, then ``home`` removed."""
    home = tmp_path_factory.mktemp("home")
    shutil.copy(sp_model, home / "tok.model")
    write_jsonl(home / "corpus.jsonl", stdlib_texts(20, offset=700))
    check(
        run_cli(
            "preprocess",
            "--input",
            "corpus.jsonl",
            "--output-prefix",
            "data/corpus",
            "--tokenizer-model",
            "tok.model",
            "--append-eod",
            cwd=home,
        )
    )
    check(
        run_cli(
            "pretrain",
            *SMALL,
            *TRAIN,
            "--data-path",
            "data/corpus_text_document",
            "--tokenizer-model",
            "tok.model",
            "--train-iters",
            "2",
            "--save",
            "run",
            cwd=home,
            timeout=300,
        )
    )
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    shutil.copytree(home / "run", elsewhere / "copy" / "run")
    shutil.copytree(home / "data", elsewhere / "data")
    shutil.rmtree(home)
    heldout = write_jsonl(elsewhere / "heldout.jsonl", [t[:2000] for t in stdlib_texts(3, offset=800)])
    cwd = tmp_path_factory.mktemp("cwd")  # every command below runs here: neither where it trained nor where it is
    return {
        "run": elsewhere / "copy" / "run",
        "data": elsewhere / "data" / "corpus_text_document",
        "heldout": heldout,
        "cwd": cwd,
        "tokenizer": sp_model,
    }


def cli(moved, *args, timeout=300):
    return check(run_cli(*args, cwd=moved["cwd"], timeout=timeout))


def test_the_save_carries_its_tokenizer_relative_to_itself(moved):
    step = find_checkpoint(moved["run"])
    recorded = (step / "config.toml").read_text()
    assert 'tokenizer_model = "hf/tokenizer.model"' in recorded
    assert (step / "hf" / "tokenizer.model").read_bytes() == Path(moved["tokenizer"]).read_bytes()
    assert read_config(step)["data"]["tokenizer_model"] == str((step / "hf" / "tokenizer.model").absolute())


def test_generate_and_eval_from_another_folder(moved):
    out = cli(
        moved,
        "generate",
        "--load",
        moved["run"],
        "--prompt",
        "def main(",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
        "--device",
        "cpu",
    ).stdout
    assert "def main(" in out
    step = find_checkpoint(moved["run"])
    for load in (moved["run"], step):  # the run folder, or one save alone
        out = cli(
            moved,
            "eval",
            "--load",
            load,
            "--ppl-files",
            moved["heldout"],
            "--append-eod",
            "--seq-length",
            "32",
            "--device",
            "cpu",
        ).stdout
        assert "heldout.jsonl" in out


def test_a_save_copied_alone_works(moved, tmp_path):
    alone = tmp_path / "just_one_save"
    shutil.copytree(find_checkpoint(moved["run"]), alone)
    out = cli(
        moved,
        "generate",
        "--load",
        alone,
        *GREEDY,
    ).stdout
    assert out.strip()


def test_continue_extend_prune_and_convert_a_moved_run(moved, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(moved["run"], run)
    cli(moved, "pretrain", *TRAIN, "--data-path", moved["data"], "--train-iters", "3", "--load", run, "--save", run)
    latest = find_checkpoint(run)
    assert latest.name == "step_000003" and (latest / "hf" / "tokenizer.model").is_file()

    cli(moved, "extend", "--load", run, "--interp-factor", "2", "--no-train", "--save", tmp_path / "extended")
    cli(
        moved,
        "prune",
        "--load",
        run,
        "--hidden-size-remain",
        "48",
        "--importance",
        "magnitude",
        "--save",
        tmp_path / "pruned",
    )
    cli(
        moved,
        "convert",
        "--from",
        "cookbook",
        "--to",
        "cookbook",
        "--load-dir",
        run,
        "--save-dir",
        tmp_path / "converted",
    )
    cli(moved, "convert", "--from", "cookbook", "--to", "hf", "--load-dir", run, "--save-dir", tmp_path / "hf")
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == Path(moved["tokenizer"]).read_bytes()
    for made in ("extended", "pruned", "converted"):
        shutil.move(tmp_path / made, tmp_path / f"{made}-moved")  # each output travels too
        cli(
            moved,
            "generate",
            "--load",
            tmp_path / f"{made}-moved",
            *GREEDY,
        )
    cli(
        moved,
        "generate",
        "--load",
        tmp_path / "hf",
        *GREEDY,
    )


def test_distill_generate_and_serve_a_moved_teacher(moved, tmp_path):
    cli(
        moved,
        "distill",
        "generate",
        "--teacher",
        moved["run"],
        "--prompts-from",
        moved["heldout"],
        "--prefix-tokens",
        "8",
        "--max-tokens",
        "4",
        "--device",
        "cpu",
        "--num-prompts",
        "2",
        "--output",
        tmp_path / "synthetic",
    )
    assert list((tmp_path / "synthetic").glob("shard_*.jsonl"))

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cookbook",
            "serve",
            "--load",
            str(moved["run"]),
            "--port",
            "0",
            "--device",
            "cpu",
            "--quiet",
        ],
        cwd=moved["cwd"],
        env={**cli_env(), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().strip()
        assert " at http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" at ")[1]
        request = urllib.request.Request(
            url + "/completions",
            json.dumps({"prompt": "def", "max_tokens": 2}).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            assert json.loads(r.read())["choices"][0]["text"] is not None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_save_from_an_earlier_version_loads_where_its_path_resolves(moved, tmp_path):
    """Earlier saves recorded the tokenizer as given to pretrain (relative to where it ran) and carried no hf/."""
    old = tmp_path / "old_run"
    shutil.copytree(moved["run"], old)
    step = find_checkpoint(old)
    shutil.rmtree(step / "hf")
    config = (step / "config.toml").read_text().replace('"hf/tokenizer.model"', '"tok.model"')
    (step / "config.toml").write_text(config)
    trained_in = tmp_path / "trained_in"
    trained_in.mkdir()
    shutil.copy(moved["tokenizer"], trained_in / "tok.model")
    generate = [
        "generate",
        "--load",
        str(old),
        *GREEDY,
    ]
    check(run_cli(*generate, cwd=trained_in))
    assert_one_line_error(run_cli(*generate, cwd=moved["cwd"]), "tok.model", "--tokenizer-model")
    check(run_cli(*generate, "--tokenizer-model", trained_in / "tok.model", cwd=moved["cwd"]))
    assert not os.path.exists(moved["cwd"] / "tok.model")
