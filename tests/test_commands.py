"""``cookbook eval`` and ``cookbook generate`` on a checkpoint ``cookbook pretrain`` wrote, with a
real tokenizer: the loaded model is the trained one, and the commands equal their library calls."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import stdlib_texts
from helpers_data import assert_one_line_error, run_cli, write_jsonl
from helpers_train import SMALL, check, pretrain

from cookbook.data.loader import BatchLoader, build_splits, split_sizes
from cookbook.data.tokenizer import load_tokenizer
from cookbook.engine.checkpoint import find_checkpoint
from cookbook.engine.metrics import read_metrics
from cookbook.engine.trainer import next_token_loss
from cookbook.inference.generator import generate
from cookbook.inference.load import load_model
from cookbook.inference.perplexity import evaluate, file_stream


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sp_model):
    """A tiny model trained 8 iterations on preprocessed stdlib text; valid loss logged at the end."""
    folder = tmp_path_factory.mktemp("run")
    corpus = write_jsonl(folder / "corpus.jsonl", stdlib_texts(30, offset=400))
    check(
        run_cli(
            "preprocess",
            "--input",
            corpus,
            "--output-prefix",
            folder / "data",
            "--tokenizer-model",
            sp_model,
            "--append-eod",
        )
    )
    data = str(folder / "data_text_document")
    save = folder / "ckpt"
    check(
        pretrain(
            SMALL
            + [
                "--data-path",
                data,
                "--tokenizer-model",
                str(sp_model),
                "--seq-length",
                "32",
                "--split",
                "90,10,0",
                "--train-iters",
                "8",
                "--micro-batch-size",
                "2",
                "--eval-interval",
                "8",
                "--eval-iters",
                "2",
                "--dtype",
                "fp32",
                "--device",
                "cpu",
                "--save",
                str(save),
            ]
        )
    )
    heldout = write_jsonl(folder / "heldout.jsonl", [t[:3000] for t in stdlib_texts(2, offset=600)])
    check(
        run_cli(
            "preprocess",
            "--input",
            heldout,
            "--output-prefix",
            folder / "heldout",
            "--tokenizer-model",
            sp_model,
            "--append-eod",
        )
    )
    return {
        "save": save,
        "data": data,
        "heldout": heldout,
        "heldout_data": str(folder / "heldout_text_document"),
        "tokenizer": sp_model,
    }


def test_checkpoint_records_the_padded_tokenizer_vocab(trained):
    model, sections = load_model(trained["save"], device="cpu")
    vocab = load_tokenizer(trained["tokenizer"]).vocab_size
    assert model.config.vocab_size == -(-vocab // 128) * 128
    # the save carries the tokenizer it was trained with, and names it inside itself
    carried = Path(sections["data"]["tokenizer_model"])
    assert carried.is_relative_to(find_checkpoint(trained["save"]).absolute())
    assert carried.read_bytes() == Path(trained["tokenizer"]).read_bytes()


def test_loaded_model_reproduces_the_logged_valid_loss(trained):
    model, sections = load_model(trained["save"], device="cpu")
    logged = [r for r in read_metrics(trained["save"] / "metrics.jsonl") if r.get("split") == "valid"][-1]["loss"]
    t, d = sections["training"], sections["data"]
    splits = build_splits(d["data_path"], d["split"], d["seq_length"], t["seed"], split_sizes(8, 2, 8, 2))
    loader = BatchLoader(splits["valid"], 2, 0, 1, model.config.vocab_size)
    with torch.no_grad():
        loss = sum(next_token_loss(model, loader.next()).item() for _ in range(2)) / 2
    assert abs(loss - logged) < 1e-6, (loss, logged)


def test_eval_command_equals_evaluate(trained, tmp_path):
    proc = run_cli(
        "eval",
        "--load",
        trained["save"],
        "--ppl-files",
        trained["heldout"],
        "--data-path",
        trained["heldout_data"],
        "--seq-length",
        "16,32",
        "--stride",
        "8",
        "--batch-size",
        "3",
        "--append-eod",
        "--device",
        "cpu",
        "--dump-dir",
        tmp_path,
    )
    check(proc)
    assert "perplexity" in proc.stdout
    dumped = json.loads((tmp_path / "perplexity.json").read_text())
    model, _ = load_model(trained["save"], device="cpu")
    stream = file_stream(trained["heldout"], load_tokenizer(trained["tokenizer"]), append_eod=True)
    expected = evaluate(model, {"f": stream}, [16, 32], 8, 1, torch.device("cpu"), show_progress=False)
    got = [r for r in dumped["results"] if r["name"] == str(trained["heldout"])]
    assert [(r["seq_length"], r["tokens"]) for r in got] == [(e.seq_length, e.tokens) for e in expected]
    for r, e in zip(got, expected):
        assert abs(r["nll"] - e.nll) < 1e-6
    assert len(dumped["results"]) == 4  # two sources x two lengths
    # the same documents as jsonl (with EOD) and as the indexed dataset preprocess made: the same stream
    by_source = {(r["name"], r["seq_length"]): r["nll"] for r in dumped["results"]}
    for length in (16, 32):
        assert by_source[(str(trained["heldout"]), length)] == by_source[(trained["heldout_data"], length)]


def test_generate_command_equals_generate(trained, tmp_path):
    prompts = ["import os\n", "def main(", "class A:"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts[1:]) + "\n")
    out = tmp_path / "gen.jsonl"
    proc = run_cli(
        "generate",
        "--load",
        trained["save"],
        "--prompt",
        prompts[0],
        "--prompts-file",
        tmp_path / "prompts.txt",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--output",
        out,
    )
    check(proc)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == prompts
    model, _ = load_model(trained["save"], device="cpu")
    tok = load_tokenizer(trained["tokenizer"])
    ids = [tok.tokenize(p) for p in prompts]
    new = generate(model, ids, 12, temperature=0, eos_id=tok.eod)
    for r, prompt, tokens in zip(records, ids, new):  # the continuation as it reads after its prompt
        assert r["text"] == tok.decode(prompt + [t for t in tokens if t != tok.eod])[len(tok.decode(prompt)) :]
        assert r["tokens"] == len(tokens)


def test_commands_bad_input(trained, tmp_path):
    assert_one_line_error(run_cli("generate", "--load", trained["save"]), "no prompts")
    assert_one_line_error(run_cli("generate", "--load", tmp_path, "--prompt", "x"), "holds no cookbook checkpoint")
    assert_one_line_error(run_cli("generate", "--load", trained["save"], "--prompt", "x", "--top-p", "1.5"), "top")
    assert_one_line_error(run_cli("eval", "--load", trained["save"]), "nothing to evaluate")
    assert_one_line_error(
        run_cli("eval", "--load", trained["save"], "--data-path", trained["data"], "--seq-length", "8,x"),
        "--seq-length",
    )
    assert_one_line_error(
        run_cli("eval", "--load", trained["save"], "--ppl-files", tmp_path / "none.jsonl"), "none.jsonl"
    )
    assert_one_line_error(
        run_cli(
            "eval", "--load", trained["save"], "--data-path", trained["data"], "--seq-length", "8", "--stride", "9"
        ),
        "stride",
    )
    assert find_checkpoint(trained["save"]) is not None
