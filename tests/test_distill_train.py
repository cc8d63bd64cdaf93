"""``cookbook distill train``: synthetic shards are tokenized by the preprocess code (the same ids as preprocess
gives), blended with original data by weight, trained on with the shared Trainer (with logit KD from a teacher
that shares the tokenizer), and the same command continues the run; a teacher with another tokenizer is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers_data import assert_one_line_error, documents, preprocess, run_cli, write_jsonl
from helpers_train import check, losses

from cookbook.data.tokenizer import load_tokenizer, tokenizer_difference
from cookbook.engine.checkpoint import find_checkpoint, read_config
from recipes.distill import blend

TINY = ["--preset", "tiny", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--num-query-groups", "2",
        "--ffn-hidden-size", "128", "--max-position-embeddings", "64"]
RUN = ["--seq-length", "32", "--micro-batch-size", "2", "--dtype", "fp32", "--device", "cpu", "--log-interval", "1",
       "--eval-interval", "0", "--lr", "3e-3", "--lr-warmup-iters", "1", "--seed", "7"]


@pytest.fixture(scope="module")
def student(tmp_path_factory, sp_model, train_jsonl) -> dict:
    """A tiny student trained 3 iterations on real text with the sentencepiece tokenizer, and a synthetic folder
    shaped as distill generate writes it."""
    root = tmp_path_factory.mktemp("distill-train")
    real = preprocess([train_jsonl], root / "real", sp_model, append_eod=True)
    save = root / "student"
    check(run_cli("pretrain", *TINY, *RUN, "--data-path", real, "--tokenizer-model", sp_model, "--train-iters", "3",
                  "--save", save, timeout=300))
    synthetic = root / "synthetic"
    synthetic.mkdir()
    texts = [f"def f{i}(x):\n    return x + {i}  # synthetic sample {i}" for i in range(40)]
    for k in range(2):
        write_jsonl(synthetic / f"shard_{k:05d}.jsonl", [{"text": t, "prefix": t[:8], "doc_id": i} for i, t in enumerate(texts) if i % 2 == k])
    (synthetic / "summary.json").write_text("{}")
    return {"root": root, "real": real, "save": save, "synthetic": synthetic, "texts": texts, "tokenizer": sp_model}


def test_blend_weights():
    assert blend([], "S", None) == ["S"]
    assert blend(["A"], "S", None) == ["0.5", "A", "0.5", "S"]
    assert blend(["1", "A", "3", "B"], "S", 0.2) == ["0.2", "A", "0.6", "B", "0.2", "S"]
    assert blend(["0.3 A 0.7 B"], "S", 0.5) == ["0.15", "A", "0.35", "B", "0.5", "S"]


def test_distill_train_with_blend_and_kd_then_continue(tmp_path, student):
    save = tmp_path / "distilled"
    flags = ["distill", "train", "--load", student["save"], "--synthetic", student["synthetic"], "--data-path", student["real"],
             "--synthetic-weight", "0.25", "--kd-teacher", student["save"], "--kd-ratio", "0.5", "--kd-temperature", "2",
             *RUN, "--save", save]
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
    assert config["training"]["kd_teacher"] == student["save"].as_posix() or config["training"]["kd_teacher"] == str(student["save"])
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
    toml = (ckpt / "config.toml").read_text()
    (ckpt / "config.toml").write_text(toml.replace(str(sp_model), str(sp_unigram)))
    proc = run_cli("distill", "train", "--load", student["save"], "--synthetic", student["synthetic"], "--kd-teacher", teacher,
                   *RUN, "--train-iters", "2", "--save", tmp_path / "out", timeout=300)
    assert_one_line_error(proc, "another tokenizer")
    assert not (tmp_path / "out" / "latest").exists()


def test_distill_train_bad_input(tmp_path, student):
    base = ["distill", "train", "--load", student["save"], *RUN, "--train-iters", "2", "--save", tmp_path / "out"]
    assert_one_line_error(run_cli(*base), "--synthetic")
    assert_one_line_error(run_cli(*base, "--synthetic", tmp_path / "nothing"), "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(run_cli(*base, "--synthetic", empty), "shard_")
    assert_one_line_error(run_cli(*base, "--synthetic", student["synthetic"], "--synthetic-weight", "0.5"), "--data-path")
    assert_one_line_error(run_cli(*base, "--synthetic", student["synthetic"], "--data-path", student["real"], "--synthetic-weight", "1.5"),
                          "between 0 and 1")


def test_distill_train_dry_run_with_preset(tmp_path):
    proc = check(run_cli("distill", "train", "--load", tmp_path / "not-here", "--preset", "llama2-13b", "--synthetic", tmp_path / "s",
                         "--data-path", "data/pile_text_document", "--seq-length", "4096", "--micro-batch-size", "1",
                         "--global-batch-size", "128", "--tensor-model-parallel-size", "8", "--sequence-parallel",
                         "--save", tmp_path / "out", "--dry-run", "--world-size", "32", "--gpu", "A100-80GB"))
    assert "valid for 32 processes" in proc.stderr
    assert json.dumps("synthetic_text_document")[1:-1] in proc.stderr
