"""Tensor parallel (+ sequence parallel, + FSDP2) and HSDP in real gloo processes equal one process.

``tp_train.py`` trains a tiny model (hidden 64, 4 heads, 2 kv heads, QKV bias, 2 layers, vocab 96,
sequence 16) for 12 clipped AdamW steps on a fixed global batch under a given layout; the same script in one
process is the oracle (also for rows packed from documents under Megatron-LM's three document flags). For each
layout: the initial weights are identical, the first step's gradients equal to
fp32 rounding, every step's loss and gradient norm equal within 1e-5, and so do the weights at the end.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers_train import assert_same_run, run_script

from cookbook.engine.config import ParallelDims
from cookbook.engine.parallelize import check_tp
from cookbook.errors import CookbookError
from cookbook.model import ModelConfig

SCRIPT = Path(__file__).with_name("tp_train.py")


def run(out: Path, nproc: int, *args: str) -> dict:
    return run_script(SCRIPT, out, nproc, *args)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return run(tmp_path_factory.mktemp("tp") / "one.pt", 1, "--variants", "base,tied,docs")


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    """2 processes, TP=2: without and with sequence parallel, tied embeddings (with SP), packed documents (with SP)."""
    return run(tmp_path_factory.mktemp("tp") / "tp2.pt", 2, "--tp", "2", "--variants", "base,sp,tied,docs")


@pytest.fixture(scope="module")
def fsdp2_tp2(tmp_path_factory):
    """4 processes: FSDP2 over 2 data-parallel ranks x TP=2 (2-D parameters on the (dp_shard, tp) mesh)."""
    return run(tmp_path_factory.mktemp("tp") / "fsdp2_tp2.pt", 4, "--tp", "2", "--variants", "base,sp,docs")


@pytest.fixture(scope="module")
def hsdp(tmp_path_factory):
    """4 processes, HSDP: FSDP2 sharding over 2 ranks, replicated twice (the 2-D (dp_replicate, dp_shard) mesh)."""
    return run(tmp_path_factory.mktemp("tp") / "hsdp.pt", 4, "--dp-replicate", "2", "--variants", "base,tied,docs")


@pytest.mark.parametrize(
    "layout, variant",
    [
        ("tp2", "base"),
        ("tp2", "sp"),
        ("tp2", "tied"),
        ("fsdp2_tp2", "base"),
        ("fsdp2_tp2", "sp"),
        ("hsdp", "base"),
        ("hsdp", "tied"),
        ("tp2", "docs"),
        ("fsdp2_tp2", "docs"),
        ("hsdp", "docs"),
    ],
)
def test_tensor_parallel_run_equals_one_process(request, one_process, layout, variant):
    """``docs``: rows packed from documents, Megatron-LM's three document flags, sequence parallel where tp > 1."""
    got = request.getfixturevalue(layout)[variant]
    want = one_process[variant if variant in ("tied", "docs") else "base"]
    assert_same_run(want, got)  # initial weights: each rank's shard of the layout-independent value


def test_sequence_parallel_refuses_a_sequence_the_ranks_cannot_split(tp2):
    message = tp2["sp"]["uneven_sequence_error"]
    assert "3 tokens" in message and "--seq-length divisible by 2" in message, message


def test_tensor_parallel_needs_whole_heads_per_rank():
    cfg = ModelConfig(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
    check_tp(cfg, 2)
    with pytest.raises(
        CookbookError, match=r"tensor parallel size 4 must divide num_kv_heads \(--num-query-groups\) = 2"
    ):
        check_tp(cfg, 4)
    with pytest.raises(CookbookError, match=r"must divide num_heads \(--num-attention-heads\) = 6"):
        check_tp(cfg.replace(num_heads=6, num_kv_heads=6, hidden_size=96), 4)


def test_parallel_dims_with_tensor_parallel():
    dims = ParallelDims(tp=2, sequence_parallel=True).resolve(8)
    assert (dims.dp_shard, dims.tp, dims.dp, dims.sequence_parallel) == (4, 2, 4, True)
    assert (
        ParallelDims(tp=1, sequence_parallel=True).resolve(2).sequence_parallel is False
    )  # as Megatron-LM: off at tp 1
    with pytest.raises(CookbookError, match="not divisible"):
        ParallelDims(tp=3).resolve(4)
    assert ParallelDims(pp=2, layers_per_virtual_stage=1).resolve(4).layers_per_virtual_stage == 1
    assert ParallelDims(layers_per_virtual_stage=1).resolve(4).layers_per_virtual_stage is None  # no pipeline: ignored
