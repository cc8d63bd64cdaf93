"""``cookbook extend`` (RoPE scaling + continued training), ``cookbook eval --passkey/--recall`` and ``cookbook plot``.

The scaled configs are checked field by field for every rope type (their logits against transformers' are
tests/test_model.py's), composition and refusals; a short PI run through the CLI trains at twice the context,
carries the scaling in its checkpoint, and continues when the same command runs again; ``--no-train`` writes
the same weights under the scaled config. ``eval --passkey`` and ``--recall`` write their tables, JSON and plot
(the tasks themselves: tests/test_retrieval.py).
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from helpers_data import assert_one_line_error, preprocess, run_cli, write_jsonl
from helpers_train import check, losses, train_flags

from cookbook.engine.checkpoint import find_checkpoint, read_config, read_train_state
from cookbook.errors import CookbookError
from cookbook.inference.load import load_model
from cookbook.inference.retrieval import read_answer
from recipes.extend import plan_extension

BASE = {"max_seq_len": 32}


# --------------------------------------------------------------------------- the scaled config


@pytest.mark.parametrize(
    "rope_type, scaling, max_seq_len",
    [
        ("linear", {"rope_type": "linear", "factor": 2.0}, 64),
        ("dynamic", {"rope_type": "dynamic", "factor": 2.0}, 32),
        ("yarn", {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32}, 64),
        (
            "llama3",
            {
                "rope_type": "llama3",
                "factor": 2.0,
                "original_max_position_embeddings": 32,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
            },
            64,
        ),
    ],
)
def test_each_rope_type_gets_the_transformers_config(rope_type, scaling, max_seq_len):
    ext = plan_extension(BASE, rope_type, 2.0, None)
    assert (ext.rope_scaling, ext.max_seq_len, ext.seq_length, ext.original) == (scaling, max_seq_len, 64, 32)
    from cookbook.model import ModelConfig

    ModelConfig(max_seq_len=ext.max_seq_len, rope_scaling=ext.rope_scaling)  # a valid model config


def test_linear_scaling_composes_and_others_refuse():
    once = plan_extension(BASE, "linear", 2.0, 64)
    twice = plan_extension({"max_seq_len": once.max_seq_len, "rope_scaling": once.rope_scaling}, "linear", 2.0, None)
    assert (twice.rope_scaling, twice.max_seq_len, twice.seq_length, twice.original) == (
        {"rope_type": "linear", "factor": 4.0},
        128,
        128,
        32,
    )
    assert "total factor 4" in twice.note
    with pytest.raises(CookbookError, match="already extended linearly"):
        plan_extension({"max_seq_len": 64, "rope_scaling": once.rope_scaling}, "yarn", 2.0, None)
    with pytest.raises(CookbookError, match="already extended with yarn"):
        plan_extension({"max_seq_len": 64, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "linear", 2.0, None)


@pytest.mark.parametrize(
    "rope_type, factor, seq, message",
    [
        ("linear", 1.0, None, "must be greater than 1"),
        ("linear", 0.5, None, "must be greater than 1"),
        ("linear", 2.0, 48, "use --seq-length 64 or --interp-factor 1.5"),
        ("ntk-by-magic", 2.0, None, "unknown --rope-type"),
    ],
)
def test_bad_extensions_are_clear_errors(rope_type, factor, seq, message):
    with pytest.raises(CookbookError, match=message):
        plan_extension(BASE, rope_type, factor, seq)


# --------------------------------------------------------------------------- a short PI run


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, sp_model, train_jsonl):
    root = tmp_path_factory.mktemp("extend")
    return preprocess([train_jsonl], root / "corpus", sp_model, append_eod=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tokenized, sp_model):
    """A tiny model trained 20 iterations at a 32-token context, with the tokenizer."""
    save = tmp_path_factory.mktemp("base") / "base"
    flags = train_flags(tokenized, save, 20, vocab_size=640, max_position_embeddings=32, tokenizer_model=sp_model)
    check(run_cli("pretrain", *flags, timeout=300))
    return save


def extend_flags(tokenized, load, save, iters: int, *extra: str) -> list[str]:
    return [
        "extend",
        "--load",
        str(load),
        "--save",
        str(save),
        "--data-path",
        tokenized,
        "--train-iters",
        str(iters),
        "--micro-batch-size",
        "2",
        "--lr",
        "1e-3",
        "--lr-warmup-iters",
        "1",
        "--log-interval",
        "1",
        "--eval-interval",
        "0",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        *extra,
    ]


def test_pi_run_trains_at_twice_the_context_and_resumes(tmp_path, tokenized, base):
    save = tmp_path / "pi"
    check(run_cli(*extend_flags(tokenized, base, save, 4, "--interp-factor", "2"), timeout=300))
    ckpt = find_checkpoint(save)
    cfg = read_config(ckpt)
    assert cfg["model"]["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert cfg["model"]["max_seq_len"] == 64 and cfg["data"]["seq_length"] == 64
    assert read_train_state(ckpt)["step"] == 4
    first = losses(save)
    assert sorted(first) == [1, 2, 3, 4] and all(v == v for v in first.values())
    # the same command again, with more iterations: it continues from its own save, not from the base
    proc = check(run_cli(*extend_flags(tokenized, base, save, 6, "--interp-factor", "2"), timeout=300))
    assert "continuing the extension" in proc.stdout + proc.stderr
    assert sorted(losses(save)) == [1, 2, 3, 4, 5, 6]
    model, _ = load_model(save, device="cpu")
    assert model.config.rope_scaling == {"rope_type": "linear", "factor": 2.0}


def test_no_train_writes_the_same_weights_under_the_scaled_config(tmp_path, base):
    save = tmp_path / "yarn"
    check(
        run_cli(
            "extend",
            "--load",
            str(base),
            "--save",
            str(save),
            "--interp-factor",
            "4",
            "--rope-type",
            "yarn",
            "--no-train",
        )
    )
    scaled, _ = load_model(save, device="cpu")
    original, _ = load_model(base, device="cpu")
    assert scaled.config.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    assert scaled.config.max_seq_len == 128
    for (name, a), (_, b) in zip(original.state_dict().items(), scaled.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    tokens = torch.randint(0, 600, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.allclose(original(tokens), scaled(tokens))  # the positions are scaled


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "yarn", "llama3"])
def test_extended_checkpoint_runs_in_transformers_at_the_long_length(tmp_path, base, rope_type):
    """extend --no-train, then convert --to hf: config.json carries the scaling, and transformers (no code edits)
    reproduces our logits over 64 tokens, twice the trained context."""
    pytest.importorskip("transformers")
    from helpers_convert import hf_model

    from recipes.convert import ConvertConfig, run

    scaled, hf = tmp_path / "scaled", tmp_path / "hf"
    check(
        run_cli(
            "extend",
            "--load",
            str(base),
            "--save",
            str(scaled),
            "--interp-factor",
            "2",
            "--rope-type",
            rope_type,
            "--no-train",
        )
    )
    run(ConvertConfig("cookbook", "hf", str(scaled), str(hf)), show_progress=False)
    conf = json.loads((hf / "config.json").read_text())
    scaling = conf.get("rope_scaling") or conf.get("rope_parameters")
    assert scaling["rope_type"] == rope_type and scaling["factor"] == 2.0
    ours, _ = load_model(scaled, device="cpu")
    theirs = hf_model(hf)
    tokens = torch.randint(0, 600, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(tokens) - theirs(tokens).logits).abs().max().item()
    assert diff < 1e-5, diff


def test_extend_bad_input_is_one_line(tmp_path, tokenized, base):
    assert_one_line_error(
        run_cli(*extend_flags(tokenized, base, tmp_path / "x", 2, "--interp-factor", "2", "--seq-length", "48")),
        "does not match --interp-factor 2",
    )
    assert_one_line_error(
        run_cli(*extend_flags(tokenized, base, tmp_path / "x", 2, "--interp-factor", "1")), "must be greater than 1"
    )
    assert_one_line_error(run_cli(*extend_flags(tokenized, base, tmp_path / "x", 2)), "needs --interp-factor")
    assert_one_line_error(
        run_cli(*extend_flags(tokenized, base, tmp_path / "x", 2, "--interp-factor", "2", "--rope-type", "ntk")),
        "unknown --rope-type 'ntk'",
    )
    assert_one_line_error(
        run_cli(*extend_flags(tokenized, tmp_path / "nothing", tmp_path / "x", 2, "--interp-factor", "2")),
        "holds no checkpoint",
    )
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- passkey and recall


def test_passkey_command_writes_its_table_and_json(tmp_path, base):
    proc = check(
        run_cli(
            *("eval", "--load", base, "--passkey", "--seq-length", "160,200", "--device", "cpu"),
            *("--passkey-depths", "0,1", "--passkey-trials", "2", "--dump-dir", tmp_path),  # the flags' first names
            "--attention",
        )
    )
    assert "passkey retrieval accuracy" in proc.stdout
    assert "where the most copying head looks" in proc.stdout
    dumped = json.loads((tmp_path / "passkey.json").read_text())
    assert dumped["task"] == "passkey"
    assert [(r["length"], r["depth"]) for r in dumped["accuracy"]] == [(160, 0.0), (160, 1.0), (200, 0.0), (200, 1.0)]
    assert len(dumped["trials"]) == 8 and all(0 <= r["accuracy"] <= 1 for r in dumped["accuracy"])
    assert all(t["correct"] == (read_answer(t["answer"]) == t["key"]) for t in dumped["trials"])
    assert [r["length"] for r in dumped["accuracy_by_length"]] == [160, 200]
    # every head at every length and depth, its shares between 0 and 1
    config = dumped["model"]
    heads = {(h["length"], h["depth"], h["layer"], h["head"]) for h in dumped["attention"]}
    assert len(heads) == len(dumped["attention"]) == 4 * config["num_layers"] * config["num_heads"]
    assert all(
        0 <= h["copy"] <= h["share"] <= 1 and 0 < h["copy_chance"] < h["share_chance"] < 1 for h in dumped["attention"]
    )


def test_recall_command_writes_its_table_json_and_plot(tmp_path, base):
    png = tmp_path / "fig" / "recall.png"
    args = ["eval", "--load", base, "--recall", "--seq-length", "200,256", "--depths", "0,0.5", "--trials", "2"]
    proc = check(run_cli(*args, "--recall-keys", "3", "--device", "cpu", "--dump-dir", tmp_path, "--plot", png))
    assert "key-value recall accuracy" in proc.stdout and proc.stdout.count("wrote") == 2
    dumped = json.loads((tmp_path / "recall.json").read_text())
    assert dumped["task"] == "recall" and dumped["keys"] == 3 and len(dumped["trials"]) == 8
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_one_line_error(run_cli(*args, "--passkey"), "one at a time")
    assert_one_line_error(run_cli("eval", "--load", base, "--plot", tmp_path / "x.png"), "add --passkey or --recall")
    assert_one_line_error(run_cli("eval", "--load", base, "--attention"), "add --passkey or --recall")
    assert_one_line_error(run_cli(*args, "--recall-keys", "0"), "--recall-keys 0")
    assert_one_line_error(run_cli("eval", "--load", base, "--recall", "--seq-length", "40"), "too short")
    # cookbook plot draws several results, a line per run
    check(run_cli("eval", "--load", base, "--passkey", "--seq-length", "200", "--trials", "1", "--dump-dir", tmp_path))
    both = tmp_path / "both.png"
    check(
        run_cli("plot", tmp_path / "recall.json", tmp_path / "passkey.json", "-o", both, "--label", "r", "--label", "p")
    )
    assert both.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_one_line_error(run_cli("plot", tmp_path / "recall.json", base, "-o", both), "not both")
    (tmp_path / "other.json").write_text("{}")
    assert_one_line_error(run_cli("plot", tmp_path / "other.json", "-o", both), "is not a retrieval result")


# --------------------------------------------------------------------------- plot


def test_plot_draws_several_runs_into_one_png(tmp_path):
    for name, offset in (("pi", 0.0), ("nopi", 0.5)):
        records = [{"step": s, "loss": 5.0 - s / 10 + offset} for s in range(1, 21)]
        records += [{"step": s, "split": "valid", "loss": 5.0 - s / 12 + offset, "ppl": 1.0} for s in (10, 20)]
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "metrics.jsonl", records)
    out = tmp_path / "fig" / "loss.png"
    # a save folder and a metrics.jsonl file
    proc = check(
        run_cli(
            "plot",
            str(tmp_path / "pi"),
            str(tmp_path / "nopi" / "metrics.jsonl"),
            "--label",
            "with PI",
            "--label",
            "without PI",
            "-o",
            str(out),
            "--smooth",
            "3",
        )
    )
    assert "wrote" in proc.stdout
    head = out.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert width > 500 and height > 300
    assert_one_line_error(run_cli("plot", str(tmp_path / "missing"), "-o", str(out)), "has no metrics.jsonl")
    assert_one_line_error(
        run_cli("plot", str(tmp_path / "pi"), "--metric", "nope", "-o", str(tmp_path / "x.png")),
        "no both 'nope' records",
    )
    assert not (tmp_path / "x.png").exists()


def test_a_folder_of_retrieval_results_names_the_one_to_draw(tmp_path):
    from recipes.plot import retrieval_dump

    (tmp_path / "passkey.json").write_text("{}")
    assert retrieval_dump(tmp_path) == tmp_path / "passkey.json"
    (tmp_path / "recall.json").write_text("{}")
    with pytest.raises(CookbookError, match="holds both passkey.json and recall.json"):
        retrieval_dump(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    assert retrieval_dump(tmp_path) is None  # a save folder: its loss curve
