"""``cookbook prune`` end to end: a Trainer-saved model pruned, evaluated and healed with distillation; the pruned
checkpoint trains, evaluates and loads like any other; bad input is one line before any work; the real recipes
validate with --dry-run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_data import assert_one_line_error, run_cli
from helpers_train import TINY, VOCAB, check, losses, train_flags, write_token_dataset

from cookbook.engine.checkpoint import find_checkpoint, read_config
from cookbook.engine.metrics import read_metrics
from cookbook.inference.load import load_model

ROOT = Path(__file__).resolve().parents[1]
SHAPE = [
    "--hidden-size-remain",
    "32",
    "--intermediate-size-remain",
    "64",
    "--num-attention-heads-remain",
    "2",
    "--drop-layers",
    "1",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("prune-data")
    return {
        "train": write_token_dataset(root / "train", documents=300),
        "heldout": write_token_dataset(root / "heldout", 40, seed=9),
        "wide": write_token_dataset(root / "wide", 20, vocab=VOCAB + 50, seed=3),
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory, data) -> Path:
    """The tests' tiny shape with 4 layers, trained 60 iterations by cookbook pretrain (held-out perplexity ~3)."""
    save = tmp_path_factory.mktemp("prune-base") / "base"
    flags = train_flags(data["train"], save, 60)
    for flag, value in (("--num-layers", "4"), ("--micro-batch-size", "8"), ("--log-interval", "10")):
        flags[flags.index(flag) + 1] = value
    check(run_cli("pretrain", *flags, timeout=300))
    return save


def prune_flags(data, base, save, *extra) -> list[str]:
    return [
        "prune",
        "--load",
        str(base),
        "--save",
        str(save),
        *SHAPE,
        "--calib-data",
        data["train"],
        "--calib-samples",
        "16",
        "--seq-length",
        "32",
        "--device",
        "cpu",
        "--dtype",
        "fp32",
        *extra,
    ]


def test_prune_and_heal_with_distillation(tmp_path, data, base):
    save = tmp_path / "healed"
    heal = [
        "--eval-data",
        data["heldout"],
        "--heal-steps",
        "12",
        "--data-path",
        data["train"],
        "--micro-batch-size",
        "4",
        "--lr",
        "2e-3",
        "--lr-warmup-iters",
        "2",
        "--log-interval",
        "1",
        "--eval-interval",
        "0",
        "--kd-ratio",
        "1.0",
    ]
    proc = check(run_cli(*prune_flags(data, base, save, *heal), timeout=300))
    assert "perplexity @ 32 tokens" in proc.stdout
    assert "layers: 1 (layer " in proc.stdout  # a count, then the id
    # the healing loss is a mix: the log says of what (here all KL), and the valid loss is labelled CE
    assert re.search(r"step +1/12  loss \d+\.\d{4} = 0 x CE \d+\.\d{4} \+ 1 x KL \d+\.\d{4}  lr", proc.stderr), (
        proc.stderr
    )
    train = [r for r in read_metrics(save / "metrics.jsonl") if r.get("split", "train") == "train"]
    assert all(abs(r["loss"] - r["kl"]) < 1e-5 and r["ce"] > 0 for r in train)

    report = json.loads((save / "prune_report.json").read_text())
    ppl = report["perplexity"]["data"][data["heldout"]]
    assert ppl["before"] < ppl["pruned"] and ppl["healed"] < ppl["pruned"], ppl  # pruning hurts, healing recovers
    assert report["params"]["after"] < report["params"]["before"] / 2
    assert len(report["removed"]["dropped_layers"]) == 1 and report["removed"]["hidden_channels_removed"] == 32
    assert report["heal"]["kd_teacher"] == str(find_checkpoint(base))

    healed = find_checkpoint(save)
    config = read_config(healed)
    assert config["training"]["kd_teacher"] == str(find_checkpoint(base)) and config["training"]["kd_ratio"] == 1.0
    assert (config["model"]["hidden_size"], config["model"]["num_layers"], config["model"]["num_heads"]) == (32, 3, 2)
    assert sorted(losses(save)) == list(range(1, 13))
    model, _ = load_model(save / "pruned", "cpu")  # the one-shot pruned model is kept beside the healing run
    assert model.config.intermediate_size == 64

    # the same command again continues the healing run (here: finished) and reuses the pruned model
    again = check(run_cli(*prune_flags(data, base, save, *heal), timeout=300))
    assert (
        "reusing the pruned model" in again.stderr
        and "nothing to do" in again.stderr
        and "raise --heal-steps" in again.stderr
    )
    # other settings into the same folder are refused
    from cookbook.errors import CookbookError
    from pruner.spec import PruneSpec
    from recipes.prune import PruneConfig, run

    overrides = {
        "checkpoint": {"load": str(base), "save": str(save)},
        "data": {"data_path": [data["train"]]},
        "training": {"device": "cpu"},
    }
    with pytest.raises(CookbookError, match="made with other settings"):
        run(None, overrides, PruneConfig(PruneSpec(hidden_size=32), importance="magnitude", heal_steps=12))


def test_the_pruned_checkpoint_trains_and_evaluates_like_any_other(tmp_path, data, base):
    pruned = tmp_path / "pruned"
    check(run_cli(*prune_flags(data, base, pruned, "--importance", "magnitude", "--layer-importance", "ppl")))
    report = json.loads((pruned / "prune_report.json").read_text())
    assert report["settings"]["importance"] == "magnitude" and len(report["calibration"]["layer_importance"]) == 4
    proc = check(
        run_cli("eval", "--load", str(pruned), "--data-path", data["heldout"], "--seq-length", "32", "--device", "cpu")
    )
    assert "perplexity" in proc.stdout
    flags = train_flags(data["train"], tmp_path / "tuned", 3)
    del flags[: len(TINY)]  # the shape comes from the checkpoint
    check(run_cli("pretrain", "--load", str(pruned), "--finetune", *flags, timeout=300))
    assert sorted(losses(tmp_path / "tuned")) == [1, 2, 3]


BAD = {
    "larger than the source": (dict(hidden_size=128), {}, "--hidden-size-remain 128 is larger than the model's 64"),
    "heads that do not split over the groups": (
        dict(num_heads=3),
        {},
        "does not split over the model's 2 query groups",
    ),
    "more heads per group than the groups hold": (
        dict(num_heads=4, num_kv_heads=1),
        {},
        "4 heads per group, but the model's groups hold 2",
    ),
    "every layer dropped": (dict(drop_layer_ids=[0, 1, 2, 3]), {}, "dropping 4 of the model's 4 layers leaves none"),
    "calibration ids beyond the vocabulary": ({}, {"calib_data": "wide"}, "holds token id"),
    "FFN tensor parallel cannot split": (
        dict(intermediate_size=98),
        {"tp": 4},
        "not divisible by --tensor-model-parallel-size 4",
    ),
    "unknown importance": ({}, {"importance": "taylor"}, "unknown --importance 'taylor'"),
    "no healing data": ({}, {"heal_steps": 3, "data_path": ["nowhere"]}, "nowhere.bin/.idx not found"),
    "no calibration data": ({}, {"calib_data": None}, "needs calibration data"),
    "--train-iters": ({}, {"train_iters": 3}, "drop --train-iters"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_refused_before_any_work(tmp_path, data, base, case):
    from cookbook.errors import CookbookError
    from pruner.spec import PruneSpec
    from recipes.prune import PruneConfig, run

    spec, other, message = BAD[case]
    opts = PruneConfig(
        PruneSpec(**{"hidden_size": 32, **spec}),
        calib_data=data["train"],
        calib_samples=8,
        importance=other.get("importance", "activation"),
        heal_steps=other.get("heal_steps", 0),
    )
    if "calib_data" in other:
        opts.calib_data = data.get(other["calib_data"])
    overrides = {
        "checkpoint": {"load": str(base), "save": str(tmp_path / "out")},
        "training": {"device": "cpu"},
        "parallel": {"tp": other.get("tp", 1)},
        "data": {"data_path": other.get("data_path", [])},
    }
    if "train_iters" in other:
        overrides["training"]["train_iters"] = other["train_iters"]
    with pytest.raises(CookbookError, match=message.replace("(", r"\(").replace(".", r"\.")):
        run(None, overrides, opts)
    assert not (tmp_path / "out").exists()


def test_bad_input_is_one_line(tmp_path, data, base):
    flags = [
        "prune",
        "--load",
        str(base),
        "--save",
        str(tmp_path / "out"),
        "--calib-data",
        data["wide"],
        "--device",
        "cpu",
    ]
    assert_one_line_error(
        run_cli(*flags, "--hidden-size-remain", "128"), "--hidden-size-remain 128 is larger than the model's 64"
    )
    assert_one_line_error(run_cli(*flags, "--hidden-size-remain", "32"), f"--calib-data {data['wide']} holds token id")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "script, shape, params",
    [
        ("prune-llama2-13b-to-7b.sh", "13.02B -> 6.74B parameters", "model 6.74B parameters"),
        ("prune-llama2-7b-to-3.4b.sh", "6.74B -> 3.37B parameters", "model 3.37B parameters"),
    ],
)
def test_the_real_recipes_validate_with_dry_run(script, shape, params):
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        LOAD="/nonexistent/ckpt",
    )
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / script), "--dry-run"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert f"dry run: the prune is valid: {shape}" in proc.stderr
    assert params in " ".join(proc.stderr.split()) and "dry run: the job is valid for 64 processes" in proc.stderr
    if "13b" in script:  # a tensor-parallel size the pruned heads and FFN do not split over: refused at the prune step
        proc = subprocess.run(
            ["bash", str(ROOT / "scripts" / script), "--dry-run"],
            env={**env, "TP": "3"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (
            proc.returncode == 2
            and "not divisible by --tensor-model-parallel-size 3" in proc.stderr.strip().splitlines()[-1]
        )
