"""Tensor parallel (+ sequence parallel, + FSDP2) in real gloo processes equals one process.

``tp_train.py`` trains a tiny model (hidden 64, 4 heads, 2 kv heads, QKV bias, 2 layers, vocab 96,
sequence 16) for 12 clipped AdamW steps on a fixed global batch under a given layout; the same script in one
process is the oracle. For each layout: the initial weights are identical, the first step's gradients equal to
fp32 rounding, every step's loss and gradient norm equal within 1e-5, and so do the weights at the end.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_train import env

from cookbook.engine.distributed import ParallelDims
from cookbook.engine.parallelize import check_tp
from cookbook.errors import CookbookError
from cookbook.model import ModelConfig

SCRIPT = Path(__file__).with_name("tp_train.py")


def run(out: Path, nproc: int, *args: str) -> dict:
    cmd = [sys.executable, str(SCRIPT), str(out), *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cmd[1:]]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-5000:]}"
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return run(tmp_path_factory.mktemp("tp") / "one.pt", 1, "--variants", "base,tied")


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    """2 processes, TP=2: without and with sequence parallel, and tied embeddings (with SP)."""
    return run(tmp_path_factory.mktemp("tp") / "tp2.pt", 2, "--tp", "2", "--variants", "base,sp,tied")


@pytest.fixture(scope="module")
def fsdp2_tp2(tmp_path_factory):
    """4 processes: FSDP2 over 2 data-parallel ranks x TP=2 (2-D parameters on the (dp_shard, tp) mesh)."""
    return run(tmp_path_factory.mktemp("tp") / "fsdp2_tp2.pt", 4, "--tp", "2", "--variants", "base,sp")


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert sorted(a) == sorted(b)
    return max(((x - b[k]).abs().max().item(), k) for k, x in a.items())


@pytest.mark.parametrize("layout, variant", [
    ("tp2", "base"), ("tp2", "sp"), ("tp2", "tied"), ("fsdp2_tp2", "base"), ("fsdp2_tp2", "sp"),
])
def test_tensor_parallel_run_equals_one_process(request, one_process, layout, variant):
    got = request.getfixturevalue(layout)[variant]
    want = one_process["tied" if variant == "tied" else "base"]
    # the same initial weights: each rank's shard of the layout-independent value
    assert max_diff(want["initial"], got["initial"])[0] == 0.0
    # the same gradients, to fp32 rounding (relative to each tensor's largest entry)
    for name, g in want["first_grads"].items():
        diff = (g - got["first_grads"][name]).abs().max().item()
        assert diff <= 1e-5 * g.abs().max().item() + 1e-12, (name, diff)
    assert want["losses"][-1] < want["losses"][0] - 0.3  # it learns
    for step, (a, b) in enumerate(zip(want["losses"], got["losses"], strict=True)):
        assert abs(a - b) <= 1e-5, (step, a, b)
    for step, (a, b) in enumerate(zip(want["grad_norms"], got["grad_norms"], strict=True)):
        assert a > 0.5 and math.isclose(a, b, rel_tol=1e-5), (step, a, b)  # > 0.5: the clip is active
    diff, name = max_diff(want["final"], got["final"])
    assert diff <= 1e-5, (name, diff)


def test_sequence_parallel_refuses_a_sequence_the_ranks_cannot_split(tp2):
    message = tp2["sp"]["uneven_sequence_error"]
    assert "3 tokens" in message and "--seq-length divisible by 2" in message, message


def test_tensor_parallel_needs_whole_heads_per_rank():
    cfg = ModelConfig(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
    check_tp(cfg, 2)
    with pytest.raises(CookbookError, match=r"tensor parallel size 4 must divide num_kv_heads \(--num-query-groups\) = 2"):
        check_tp(cfg, 4)
    with pytest.raises(CookbookError, match=r"must divide num_heads \(--num-attention-heads\) = 6"):
        check_tp(cfg.replace(num_heads=6, num_kv_heads=6, hidden_size=96), 4)


def test_parallel_dims_with_tensor_parallel():
    dims = ParallelDims(tp=2, sequence_parallel=True).resolve(8)
    assert (dims.dp_shard, dims.tp, dims.dp, dims.sequence_parallel) == (4, 2, 4, True)
    assert ParallelDims(tp=1, sequence_parallel=True).resolve(2).sequence_parallel is False  # as Megatron-LM: off at tp 1
    with pytest.raises(CookbookError, match="not divisible"):
        ParallelDims(tp=3).resolve(4)
    with pytest.raises(CookbookError, match="pipeline and context parallel are not available yet"):
        ParallelDims(pp=2).resolve(2)
