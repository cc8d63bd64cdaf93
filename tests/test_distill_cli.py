"""``cookbook distill generate``: the cookbook backend writes every prompt's continuation once, in shards, and a
killed run resumes to exactly the uninterrupted output; the openai backend against ``cookbook serve`` on loopback
gives the cookbook backend's completions.

``cookbook distill train``: synthetic shards are tokenized by the preprocess code (the same ids as preprocess
gives), blended with original data by weight, trained on with the shared Trainer (with logit KD from a teacher
that shares the tokenizer), and the same command continues the run; a teacher with another tokenizer is refused."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers_data import assert_one_line_error, cli_env, documents, preprocess, run_cli, write_jsonl
from helpers_train import CPU_RUN, SMALL, check, losses

from cookbook.data.tokenizer import load_tokenizer, tokenizer_difference
from cookbook.engine.checkpoint import find_checkpoint, read_config
from recipes.distill import blend

TINY = ["--preset", "tiny", *SMALL]
RUN = [*CPU_RUN, *"--lr 3e-3 --lr-warmup-iters 1 --seed 7".split()]


@pytest.fixture(scope="module")
def student(tmp_path_factory, sp_model, train_jsonl) -> dict:
    """A tiny student trained 3 iterations on real text with the sentencepiece tokenizer, and a synthetic folder
    shaped as distill generate writes it."""
    root = tmp_path_factory.mktemp("distill-train")
    real = preprocess([train_jsonl], root / "real", sp_model, append_eod=True)
    save = root / "student"
    check(
        run_cli(
            "pretrain",
            *TINY,
            *RUN,
            "--data-path",
            real,
            "--tokenizer-model",
            sp_model,
            "--train-iters",
            "3",
            "--save",
            save,
            timeout=300,
        )
    )
    synthetic = root / "synthetic"
    synthetic.mkdir()
    texts = [f"def f{i}(x):\n    return x + {i}  # synthetic sample {i}" for i in range(40)]
    for k in range(2):
        write_jsonl(
            synthetic / f"shard_{k:05d}.jsonl",
            [{"text": t, "prefix": t[:8], "doc_id": i} for i, t in enumerate(texts) if i % 2 == k],
        )
    (synthetic / "summary.json").write_text("{}")
    return {
        "root": root,
        "real": real,
        "save": save,
        "synthetic": synthetic,
        "texts": texts,
        "tokenizer": sp_model,
        "jsonl": train_jsonl,
    }


def test_blend_weights():
    assert blend([], "S", None) == ["S"]
    assert blend(["A"], "S", None) == ["0.5", "A", "0.5", "S"]
    assert blend(["1", "A", "3", "B"], "S", 0.2) == ["0.2", "A", "0.6", "B", "0.2", "S"]
    assert blend(["0.3 A 0.7 B"], "S", 0.5) == ["0.15", "A", "0.35", "B", "0.5", "S"]


def test_distill_train_with_blend_and_kd_then_continue(tmp_path, student):
    save = tmp_path / "distilled"
    flags = [
        "distill",
        "train",
        "--load",
        student["save"],
        "--synthetic",
        student["synthetic"],
        "--data-path",
        student["real"],
        "--synthetic-weight",
        "0.25",
        "--kd-teacher",
        student["save"],
        "--kd-ratio",
        "0.5",
        "--kd-temperature",
        "2",
        *RUN,
        "--save",
        save,
    ]
    proc = check(run_cli(*flags, "--train-iters", "3", timeout=300))
    assert "tokenized 40 synthetic documents" in proc.stderr

    # the synthetic data are exactly what preprocess makes of the shards with the student's tokenizer
    tok = load_tokenizer(student["tokenizer"])
    dataset = save / "synthetic" / "synthetic_text_document"
    got = sorted(map(tuple, documents(dataset)))
    want = sorted(tuple(tok.tokenize(t) + [tok.eod]) for t in student["texts"])
    assert got == want

    config = read_config(find_checkpoint(save))
    assert config["data"]["data_path"] == ["0.75", student["real"], "0.25", str(dataset)]
    assert config["training"]["kd_teacher"] == student["save"].as_posix() or config["training"]["kd_teacher"] == str(
        student["save"]
    )
    assert sorted(losses(save)) == [1, 2, 3]

    # the same command with more iterations continues the run; the tokenized data are reused
    proc = check(run_cli(*flags, "--train-iters", "5", timeout=300))
    assert "already tokenized" in proc.stderr and "continuing the distillation" in proc.stderr
    assert sorted(losses(save)) == [1, 2, 3, 4, 5]


def test_kd_teacher_with_another_tokenizer_is_refused(tmp_path, student, sp_model, sp_unigram):
    assert tokenizer_difference(load_tokenizer(sp_model), load_tokenizer(sp_model)) is None
    assert tokenizer_difference(load_tokenizer(sp_model), load_tokenizer(sp_unigram)) is not None
    # the student's weights, but recorded with another tokenizer of the same vocabulary size
    teacher = tmp_path / "teacher"
    shutil.copytree(student["save"], teacher)
    ckpt = find_checkpoint(teacher)
    shutil.copyfile(sp_unigram, ckpt / "hf" / "tokenizer.model")  # the tokenizer its save carries
    proc = run_cli(
        "distill",
        "train",
        "--load",
        student["save"],
        "--synthetic",
        student["synthetic"],
        "--kd-teacher",
        teacher,
        *RUN,
        "--train-iters",
        "2",
        "--save",
        tmp_path / "out",
        timeout=300,
    )
    assert_one_line_error(proc, "another tokenizer")
    assert not (tmp_path / "out" / "latest").exists()


def test_distill_train_bad_input(tmp_path, student):
    base = ["distill", "train", "--load", student["save"], *RUN, "--train-iters", "2", "--save", tmp_path / "out"]
    assert_one_line_error(run_cli(*base), "--synthetic")
    assert_one_line_error(run_cli(*base, "--synthetic", tmp_path / "nothing"), "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_cli(*base, "--synthetic", empty), "shard_")
    assert_one_line_error(
        run_cli(*base, "--synthetic", student["synthetic"], "--synthetic-weight", "0.5"), "--data-path"
    )
    assert_one_line_error(
        run_cli(
            *base, "--synthetic", student["synthetic"], "--data-path", student["real"], "--synthetic-weight", "1.5"
        ),
        "between 0 and 1",
    )


def test_distill_train_dry_run_with_preset(tmp_path):
    proc = check(
        run_cli(
            "distill",
            "train",
            "--load",
            tmp_path / "not-here",
            "--preset",
            "llama2-13b",
            "--synthetic",
            tmp_path / "s",
            "--data-path",
            "data/pile_text_document",
            "--seq-length",
            "4096",
            "--micro-batch-size",
            "1",
            "--global-batch-size",
            "128",
            "--tensor-model-parallel-size",
            "8",
            "--sequence-parallel",
            "--save",
            tmp_path / "out",
            "--dry-run",
            "--world-size",
            "32",
            "--gpu",
            "A100-80GB",
        )
    )
    assert "valid for 32 processes" in proc.stderr
    assert json.dumps("synthetic_text_document")[1:-1] in proc.stderr


# --------------------------------------------------------------------------- distill generate


def generate_flags(student, output, *extra) -> list[str]:
    return [
        "distill",
        "generate",
        "--teacher",
        student["save"],
        "--prompts-from",
        student["jsonl"],
        "--prefix-tokens",
        "12",
        "--max-tokens",
        "6",
        "--temperature",
        "0.8",
        "--device",
        "cpu",
        "--batch-size",
        "4",
        "--output",
        output,
        *extra,
    ]


def read_shards(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob("shard_*.jsonl")) for line in f.read_text().splitlines()]


def test_generate_cookbook_backend(tmp_path, student):
    out = tmp_path / "synthetic"
    proc = check(
        run_cli(
            *generate_flags(student, out, "--num-prompts", "10", "--prompts-per-shard", "3", "--n", "2", "--no-dedup"),
            timeout=300,
        )
    )
    assert "wrote 20 records from 10 prompts" in proc.stderr
    assert sorted(p.name for p in out.glob("shard_*.jsonl")) == [f"shard_{k:05d}.jsonl" for k in range(4)]  # 3+3+3+1
    records = read_shards(out)
    assert sorted((r["prompt_index"], r["sample"]) for r in records) == [(i, j) for i in range(10) for j in range(2)]
    tok = load_tokenizer(student["tokenizer"])
    for r in records:
        assert r["text"].startswith(r["prefix"]) and len(r["text"]) > len(r["prefix"])
        assert (
            r["teacher"] == str(student["save"])
            and r["sampling"]["temperature"] == 0.8
            and r["sampling"]["max_tokens"] == 6
        )
        assert 1 <= r["generated_tokens"] <= 6 and r["finish_reason"] in ("stop", "length")
        assert (
            r["prefix_tokens"] == 12 and len(tok.tokenize(r["prefix"])) >= 12 - 2
        )  # a decode/re-encode may merge a piece or two
    summary = json.loads((out / "summary.json").read_text())
    assert summary["records"] == 20 and summary["prompts"] == 10
    # the same command again: everything is done, nothing changes
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    check(
        run_cli(
            *generate_flags(student, out, "--num-prompts", "10", "--prompts-per-shard", "3", "--n", "2", "--no-dedup"),
            timeout=300,
        )
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # another sampling setting into the same folder is refused
    proc = run_cli(
        *generate_flags(student, out, "--num-prompts", "10", "--prompts-per-shard", "3", "--n", "1", "--no-dedup")
    )
    assert_one_line_error(proc, "sampling")


def test_generate_killed_run_resumes_without_duplicates_or_gaps(tmp_path, student):
    flags = ["--num-prompts", "40", "--prompts-per-shard", "1", "--max-repeat-ratio", "0.9", "--min-tokens", "2"]
    whole = tmp_path / "whole"
    check(run_cli(*generate_flags(student, whole, *flags), timeout=300))

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cookbook", *map(str, generate_flags(student, killed, *flags))],
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (killed / "shard_00003.jsonl").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(list(killed.glob("shard_*.jsonl")))
    assert 4 <= written < 40 and not (killed / "summary.json").exists()

    proc = check(run_cli(*generate_flags(student, killed, *flags), timeout=300))
    assert f"{written} of 40 shards already written" in proc.stderr
    assert sorted(p.name for p in killed.iterdir() if not p.name.startswith(".")) == sorted(
        p.name for p in whole.iterdir() if not p.name.startswith(".")
    )
    for shard in whole.glob("shard_*.jsonl"):  # the same records, each prompt once
        assert (killed / shard.name).read_bytes() == shard.read_bytes()
    indices = [r["prompt_index"] for r in read_shards(killed)]
    assert len(indices) == len(set(indices))
    summary = json.loads((killed / "summary.json").read_text())
    assert summary == json.loads((whole / "summary.json").read_text())
    assert summary["records"] + sum(summary["filtered"].values()) == 40


def test_generate_bad_input(tmp_path, student):
    assert_one_line_error(run_cli(*generate_flags(student, tmp_path / "o", "--backend", "nope")), "--backend")
    assert_one_line_error(run_cli(*generate_flags(student, tmp_path / "o", "--temperature", "-1")), "temperature")
    assert_one_line_error(
        run_cli(
            "distill",
            "generate",
            "--teacher",
            student["save"],
            "--prompts-from",
            tmp_path / "missing.jsonl",
            "--output",
            tmp_path / "o",
        ),
        "does not exist",
    )
    assert_one_line_error(run_cli(*generate_flags(student, tmp_path / "o", "--backend", "openai")), "--endpoint")
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("shard_*"))


def test_generate_missing_or_broken_teacher_is_named_and_leaves_nothing(tmp_path, student):
    """A teacher that is not there is named as missing first, with or without --tokenizer-model, and no flag of
    another command is suggested; a teacher that fails to load leaves no manifest or lock behind, so the same output
    folder takes the next run with the right teacher."""
    out = tmp_path / "synth"
    for extra in ([], ["--tokenizer-model", student["tokenizer"]]):
        proc = run_cli(
            "distill",
            "generate",
            "--teacher",
            tmp_path / "big",
            "--prompts-from",
            student["jsonl"],
            "--output",
            out,
            *extra,
        )
        err = assert_one_line_error(proc, f"{tmp_path / 'big'} does not exist")
        assert "--from" not in err and not out.exists()
    broken = (
        tmp_path / "broken"
    )  # the student's save with a model config that cannot be built: found, then fails to load
    shutil.copytree(student["save"], broken)
    config = find_checkpoint(broken) / "config.toml"
    config.write_text(config.read_text().replace("num_kv_heads = 2", "num_kv_heads = 3"))
    assert_one_line_error(
        run_cli(*generate_flags({**student, "save": broken}, out, "--num-prompts", "2")), "num_kv_heads 3"
    )
    assert not out.exists()
    proc = check(run_cli(*generate_flags(student, out, "--num-prompts", "2"), timeout=300))
    assert "wrote 2 records" in proc.stderr


def test_generate_openai_backend_against_cookbook_serve(tmp_path, student):
    """Two `cookbook serve` processes on loopback behind the openai backend write what the cookbook backend writes
    in process (greedy decoding), and the records name the served model as the teacher."""
    servers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cookbook",
                "serve",
                "--load",
                str(student["save"]),
                "--port",
                "0",
                "--device",
                "cpu",
                "--served-model-name",
                "tiny-teacher",
                "--quiet",
            ],
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        urls = []
        for server in servers:
            line = server.stdout.readline()  # "serving NAME at http://127.0.0.1:PORT/v1"
            assert line.startswith("serving tiny-teacher at http://127.0.0.1:"), line + server.stderr.read()
            urls.append(line.split(" at ")[1].strip())
        greedy = ["--num-prompts", "8", "--prompts-per-shard", "4", "--temperature", "0", "--no-dedup"]
        check(run_cli(*generate_flags(student, tmp_path / "local", *greedy), timeout=300))
        check(
            run_cli(
                *generate_flags(
                    student,
                    tmp_path / "remote",
                    *greedy,
                    "--backend",
                    "openai",
                    "--endpoint",
                    ",".join(urls),
                    "--concurrency",
                    "2",
                ),
                timeout=300,
            )
        )
    finally:
        for server in servers:
            server.send_signal(signal.SIGTERM)
        for server in servers:
            assert server.wait(timeout=30) == 0
    local, remote = read_shards(tmp_path / "local"), read_shards(tmp_path / "remote")
    assert [r["text"] for r in remote] == [r["text"] for r in local]
    assert [r["generated_tokens"] for r in remote] == [r["generated_tokens"] for r in local]
    assert {r["teacher"] for r in remote} == {"tiny-teacher"}
