"""cookbook convert on bad input: one actionable line (exit code 2 from the CLI), nothing half-written."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from helpers_convert import make_hf
from helpers_data import assert_one_line_error, run_cli

from cookbook.errors import CookbookError
from recipes.convert import ConvertConfig, run

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A Llama with 2 query groups and 4 layers."""
    return make_hf(tmp_path_factory.mktemp("errors") / "hf", "llama-gqa")


def nothing_written(save: Path) -> bool:
    return not save.exists() and not list(save.parent.glob(f".{save.name}.*"))


def refused(match: str, source: str, target: str, load: Path, save: Path, **kw) -> None:
    with pytest.raises(CookbookError, match=match) as e:
        run(ConvertConfig(source, target, str(load), str(save), **kw), show_progress=False)
    assert "\n" not in str(e.value)
    assert nothing_written(save) or kw.get("overwrite")


def edited_copy(src: Path, dst: Path, **config) -> Path:
    shutil.copytree(src, dst)
    conf = json.loads((dst / "config.json").read_text())
    conf.update(config)
    (dst / "config.json").write_text(json.dumps(conf))
    return dst


def test_cli_errors_are_one_line(src, tmp_path):
    proc = run_cli("convert", "--help")
    assert proc.returncode == 0 and all(
        f in proc.stdout
        for f in (
            "--from",
            "--to",
            "--load-dir",
            "--save-dir",
            "--tp",
            "--pp",
            "--dtype",
            "--make-vocab-size-divisible-by",
            "--overwrite",
            "--ckpt-format",
        )
    )
    proc = run_cli("convert", "--from", "gguf", "--to", "hf", "--load-dir", src, "--save-dir", tmp_path / "x")
    assert_one_line_error(proc, "--from 'gguf' is not a format", "hf, cookbook, megatron")
    proc = run_cli(
        "convert", "--from", "hf", "--to", "megatron", "--load-dir", src, "--save-dir", tmp_path / "x", "--tp", "4"
    )
    assert_one_line_error(proc, "--tp 4 does not divide the model's 2 query groups")
    assert nothing_written(tmp_path / "x")


def test_existing_target_is_refused_unless_overwrite(src, tmp_path):
    save = tmp_path / "out"
    save.mkdir()
    (save / "keep.txt").write_text("mine")
    proc = run_cli("convert", "--from", "hf", "--to", "cookbook", "--load-dir", src, "--save-dir", save)
    assert_one_line_error(proc, f"--save-dir {save} already exists", "--overwrite")
    assert [p.name for p in save.iterdir()] == ["keep.txt"]
    # a failing conversion with --overwrite leaves the old folder as it was
    refused("does not divide", "hf", "megatron", src, save, tp=4, overwrite=True)
    assert [p.name for p in save.iterdir()] == ["keep.txt"]
    run(ConvertConfig("hf", "cookbook", str(src), str(save), overwrite=True), show_progress=False)
    assert (save / "latest").is_file() and not (save / "keep.txt").exists()
    refused("is or lies inside --load-dir", "hf", "hf", src, src / "sub")


def test_bad_flags(src, tmp_path):
    refused("--tp and --pp split a Megatron-LM checkpoint", "hf", "hf", src, tmp_path / "o", tp=2)
    refused("unknown --dtype 'fp8'", "hf", "cookbook", src, tmp_path / "o", dtype="fp8")
    refused("does not exist", "hf", "cookbook", tmp_path / "nowhere", tmp_path / "o")
    refused("does not divide the model's 4 layers", "hf", "megatron", src, tmp_path / "o", pp=3)
    refused("unknown --transformer-impl", "hf", "megatron", src, tmp_path / "o", transformer_impl="apex")
    refused("not a size", "hf", "hf", src, tmp_path / "o", max_shard_size="big")


def test_unsupported_architectures(src, tmp_path):
    refused(
        "mixture-of-experts",
        "hf",
        "cookbook",
        edited_copy(src, tmp_path / "moe", model_type="mixtral", num_local_experts=8),
        tmp_path / "o",
    )
    refused(
        "'gpt2' model; cookbook converts Llama-family models",
        "hf",
        "cookbook",
        edited_copy(src, tmp_path / "gpt2", model_type="gpt2"),
        tmp_path / "o",
    )
    refused(
        "hidden_act 'gelu'", "hf", "cookbook", edited_copy(src, tmp_path / "gelu", hidden_act="gelu"), tmp_path / "o"
    )
    refused(
        "biases on linear layers",
        "hf",
        "cookbook",
        edited_copy(src, tmp_path / "bias", attention_bias=True),
        tmp_path / "o",
    )
    yarn = edited_copy(
        src,
        tmp_path / "yarn",
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "rope_theta": 10000.0,
            "original_max_position_embeddings": 32,
        },
    )
    refused("has no Megatron-LM equivalent", "hf", "megatron", yarn, tmp_path / "o")


def test_missing_files_and_mismatches(src, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    refused("has no config.json", "hf", "cookbook", empty, tmp_path / "o")
    refused("holds no cookbook checkpoint", "cookbook", "hf", empty, tmp_path / "o")
    refused("holds no Megatron-LM checkpoint", "megatron", "hf", empty, tmp_path / "o")
    no_weights = edited_copy(src, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    refused("holds no model.safetensors", "hf", "cookbook", no_weights, tmp_path / "o")
    refused("implies", "hf", "cookbook", edited_copy(src, tmp_path / "wide", intermediate_size=128), tmp_path / "o")
    refused(
        "has no tensor model.layers.4",
        "hf",
        "cookbook",
        edited_copy(src, tmp_path / "deep", num_hidden_layers=5),
        tmp_path / "o",
    )
    refused(
        "holds tensor model.layers.3",
        "hf",
        "cookbook",
        edited_copy(src, tmp_path / "shallow", num_hidden_layers=3),
        tmp_path / "o",
    )
    run(ConvertConfig("hf", "megatron", str(src), str(tmp_path / "mg"), tp=2), show_progress=False)
    shutil.rmtree(tmp_path / "mg" / "iter_0000001" / "mp_rank_01")
    refused("lacks mp_rank_01/model_optim_rng.pt", "megatron", "hf", tmp_path / "mg", tmp_path / "o")


def test_a_failure_midway_leaves_nothing(src, tmp_path):
    """A file cut short is found only when its last tensor is read, after the output has been started:
    the error names it and no output (nor temporary folder) remains."""
    bad = edited_copy(src, tmp_path / "truncated")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:-100])
    assert struct.unpack("<Q", data[:8])[0] > 0
    for target in ("hf", "cookbook", "megatron"):
        refused("is truncated", "hf", target, bad, tmp_path / target)


def dist_copy(src: Path, dst: Path, **args) -> Path:
    """A copy of a torch_dist checkpoint with ``args`` changed in its common.pt."""
    import argparse

    import torch

    shutil.copytree(src, dst)
    common_pt = next(dst.glob("iter_*")) / "common.pt"
    with torch.serialization.safe_globals([argparse.Namespace]):
        common = torch.load(common_pt, weights_only=True)
    vars(common["args"]).update(args)
    torch.save(common, common_pt)
    return dst


def test_bad_torch_dist_checkpoints(src, tmp_path):
    """A torch_dist checkpoint cut short, without common.pt or its index, of another backend, whose args disagree
    with its tensors, or of a model cookbook cannot hold (mixture of experts, LayerNorm, no SwiGLU, linear biases):
    one line, nothing at --save-dir; a chunk that reads as garbage fails midway and leaves nothing either."""
    import torch
    import torch.distributed.checkpoint as dcp
    from helpers_convert import dist_tensors

    good = tmp_path / "good"
    run(ConvertConfig("hf", "megatron", str(src), str(good), tp=2, ckpt_format="torch_dist"), show_progress=False)
    it = "iter_0000001"
    out = tmp_path / "o"

    cut = dist_copy(good, tmp_path / "cut")
    layer_file = cut / it / "__0_2.distcp"
    layer_file.write_bytes(layer_file.read_bytes()[:-1000])
    refused("__0_2.distcp is truncated", "megatron", "hf", cut, out)
    proc = run_cli("convert", "--from", "megatron", "--to", "hf", "--load-dir", cut, "--save-dir", out)
    assert_one_line_error(proc, "is truncated")
    assert nothing_written(out)

    garbage = dist_copy(good, tmp_path / "garbage")
    data = bytearray((garbage / it / "__0_3.distcp").read_bytes())
    data[: len(data) // 2] = b"\x00" * (len(data) // 2)
    (garbage / it / "__0_3.distcp").write_bytes(bytes(data))
    for target in ("hf", "cookbook", "megatron"):
        refused("cannot read decoder.layers", "megatron", target, garbage, out)

    for name in ("common.pt", ".metadata"):
        missing = dist_copy(good, tmp_path / f"no{name}")
        (missing / it / name).unlink()
        refused(f"has no {name}; the checkpoint is incomplete", "megatron", "hf", missing, out)
    zarr = dist_copy(good, tmp_path / "zarr")
    (zarr / it / "metadata.json").write_text('{"sharded_backend": "zarr", "sharded_backend_version": 1}')
    refused("names the 'zarr' backend", "megatron", "hf", zarr, out)

    refused(
        r"has shape \(256, 64\), which does not match the args \(hidden 128.*the args do not match the weights",
        "megatron",
        "hf",
        dist_copy(good, tmp_path / "wide", hidden_size=128),
        out,
    )
    refused("not \\[3 layers", "megatron", "hf", dist_copy(good, tmp_path / "deep", num_layers=3), out)
    refused(
        "holds output_layer.weight but its args tie the embeddings",
        "megatron",
        "hf",
        dist_copy(good, tmp_path / "tied", untie_embeddings_and_output_weights=False),
        out,
    )
    refused(
        "vocabulary \\(300, args.vocab_size\\) is larger than the embedding's 256 rows",
        "megatron",
        "hf",
        dist_copy(good, tmp_path / "vocab", vocab_size=300),
        out,
    )
    refused("mixture-of-experts", "megatron", "hf", dist_copy(good, tmp_path / "moe", num_experts=8), out)
    refused("uses LayerNorm", "megatron", "hf", dist_copy(good, tmp_path / "layernorm", normalization="LayerNorm"), out)
    refused("without --swiglu", "megatron", "hf", dist_copy(good, tmp_path / "gelu", swiglu=False), out)
    refused("biases on linear layers", "megatron", "hf", dist_copy(good, tmp_path / "bias", add_bias_linear=True), out)

    experts = dist_copy(good, tmp_path / "experts")  # the tensors of a mixture-of-experts layer
    tensors = dist_tensors(good)
    tensors["decoder.layers.mlp.experts.linear_fc1.weight"] = torch.zeros(4, 8, 192, 64)
    shutil.rmtree(experts / it)
    dcp.save(tensors, checkpoint_id=str(experts / it), no_dist=True)
    for name in ("common.pt", "metadata.json"):
        shutil.copyfile(good / it / name, experts / it / name)
    refused("mixture-of-experts model", "megatron", "hf", experts, out)

    refused(
        "--ckpt-format chooses the Megatron-LM format written; --to hf takes none",
        "hf",
        "hf",
        src,
        out,
        ckpt_format="torch_dist",
    )
    refused("unknown --ckpt-format 'zarr'", "hf", "megatron", src, out, ckpt_format="zarr")
