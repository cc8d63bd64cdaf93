"""Every command that reads a model takes a Hugging Face folder as ``--load`` and gives what it gives for the same
model as a cookbook checkpoint: eval's perplexity, generate's greedy text, prune's and extend's outputs, and the
losses of a run that fine-tunes from it (pretrain and extend convert the folder on the fly, into SAVE/.hf_source).
The oracle is the cookbook checkpoint converted from the same folder."""

from __future__ import annotations

import json

import pytest
from helpers_data import run_cli as run_any_cli
from helpers_distill import make_teacher
from helpers_train import check, env, losses, write_token_dataset


def run_cli(*args, timeout: float = 300):
    """One thread per process: the runs compared are then the same to the last bit, whatever the machine's load."""
    return run_any_cli(*args, env=env(threads=1), timeout=timeout)


RUN = ["--dtype", "fp32", "--device", "cpu"]
TRAIN = [
    "--seq-length",
    "32",
    "--micro-batch-size",
    "2",
    "--train-iters",
    "3",
    "--lr",
    "1e-3",
    "--lr-warmup-iters",
    "1",
    "--log-interval",
    "1",
    "--eval-interval",
    "0",
    "--seed",
    "3",
    *RUN,
]


@pytest.fixture(scope="module")
def model(tmp_path_factory, sp_model):
    root = tmp_path_factory.mktemp("hf_load")
    made = make_teacher(root, sp_model)  # the SentencePiece tokenizer's 600 pieces; the model's vocabulary 640
    data = write_token_dataset(root / "data" / "docs", vocab=600)
    texts = ["def main():\n    return 0\n", "The quick brown fox jumps over the lazy dog. " * 6, "x = [1, 2, 3]\n" * 5]
    (root / "heldout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return {**made, "data": data, "heldout": root / "heldout.jsonl"}


def perplexity(load, tmp, *extra) -> list[dict]:
    dump = tmp / f"eval_{abs(hash((str(load), extra)))}"
    check(
        run_cli(
            "eval",
            "--load",
            load,
            "--ppl-files",
            tmp.parent / "heldout.jsonl",
            "--seq-length",
            "32",
            "--dump-dir",
            dump,
            *RUN,
            *extra,
            timeout=300,
        )
    )
    return json.loads((dump / "perplexity.json").read_text())["results"]


def greedy(load) -> str:
    return check(
        run_cli(
            "generate",
            "--load",
            load,
            "--prompt",
            "def",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
            *RUN,
            timeout=300,
        )
    ).stdout


def same_perplexity(a: list[dict], b: list[dict]) -> None:
    assert [(r["name"], r["tokens"]) for r in a] == [(r["name"], r["tokens"]) for r in b]
    for x, y in zip(a, b):
        assert x["nll"] == pytest.approx(y["nll"], abs=1e-5)


def test_eval_and_generate(model):
    tmp = model["root"] / "eval"
    tmp.mkdir()
    same_perplexity(perplexity(model["hf"], tmp), perplexity(model["cookbook"], tmp))
    assert greedy(model["hf"]) == greedy(model["cookbook"])


def test_prune_and_extend_without_training(model):
    tmp = model["root"] / "outputs"
    tmp.mkdir()
    for kind in ("hf", "cookbook"):
        check(
            run_cli(
                "prune",
                "--load",
                model[kind],
                "--hidden-size-remain",
                "48",
                "--importance",
                "magnitude",
                "--save",
                tmp / f"pruned_{kind}",
                timeout=300,
            )
        )
        check(
            run_cli(
                "extend",
                "--load",
                model[kind],
                "--interp-factor",
                "2",
                "--no-train",
                "--save",
                tmp / f"extended_{kind}",
                timeout=300,
            )
        )
    same_perplexity(perplexity(tmp / "pruned_hf", tmp), perplexity(tmp / "pruned_cookbook", tmp))
    same_perplexity(perplexity(tmp / "extended_hf", tmp), perplexity(tmp / "extended_cookbook", tmp))


def test_finetune_and_extend_runs_start_from_the_folder(model):
    tmp = model["root"] / "runs"
    tmp.mkdir()
    for kind in ("hf", "cookbook"):
        check(
            run_cli(
                "pretrain",
                "--load",
                model[kind],
                "--finetune",
                "--data-path",
                model["data"],
                *TRAIN,
                "--save",
                tmp / f"tuned_{kind}",
                timeout=300,
            )
        )
        check(
            run_cli(
                "extend",
                "--load",
                model[kind],
                "--interp-factor",
                "2",
                "--data-path",
                model["data"],
                *TRAIN,
                "--seq-length",
                "256",  # twice the context of 128
                "--save",
                tmp / f"extended_{kind}",
                timeout=300,
            )
        )
    assert (tmp / "tuned_hf" / ".hf_source").is_dir()
    for run in ("tuned", "extended"):
        ours, oracle = losses(tmp / f"{run}_hf"), losses(tmp / f"{run}_cookbook")
        assert sorted(ours) == [1, 2, 3]
        assert ours == pytest.approx(oracle, abs=1e-5), run


def test_a_training_load_of_a_folder_needs_finetune(model, tmp_path):
    proc = run_cli("pretrain", "--load", model["hf"], "--data-path", model["data"], *TRAIN, "--save", tmp_path / "x")
    assert proc.returncode == 2 and "start a run from it with --finetune" in proc.stderr, proc.stderr
    assert not (tmp_path / "x").exists()
