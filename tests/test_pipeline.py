"""Pipeline parallel (1F1B, interleaved 1F1B, and with FSDP2 over dp) in real gloo processes equals one process.

``pp_train.py`` trains a tiny model (hidden 64, 4 heads, 2 kv heads, QKV bias, 4 layers, vocab 96, sequence 16)
for 10 clipped AdamW steps on a fixed global batch of 8 rows in 4 micro batches under a given layout; the same
script in one process (the Trainer's gradient accumulation) is the oracle. For each layout: the initial weights
are identical, the first step's gradients equal to fp32 rounding, every step's loss (from the last stage) and
global gradient norm (every stage's gradients) equal within 1e-5, as do the forward-only eval losses (mid-run
and at the end), and so do the weights at the end, gathered
from every stage by name.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_train import env

from cookbook.engine.pipeline import split_model, stage_ids, stage_layers
from cookbook.errors import CookbookError
from cookbook.model import ModelConfig, Transformer

SCRIPT = Path(__file__).with_name("pp_train.py")
LAYOUTS = {
    "1f1b": (2, "--pp", "2"),
    "interleaved": (2, "--pp", "2", "--chunks", "2", "--schedule", "Interleaved1F1B"),
    "1f1b_fsdp2": (4, "--pp", "2"),  # pp 2 x FSDP2 over 2 dp ranks
}


def run(out: Path, nproc: int, *args: str) -> dict:
    cmd = [sys.executable, str(SCRIPT), str(out), *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cmd[1:]]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-5000:]}"
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return run(tmp_path_factory.mktemp("pp") / "one.pt", 1)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert sorted(a) == sorted(b)
    return max(((x - b[k]).abs().max().item(), k) for k, x in a.items())


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_run_equals_one_process(tmp_path, one_process, layout):
    nproc, *args = LAYOUTS[layout]
    got, want = run(tmp_path / f"{layout}.pt", nproc, *args), one_process
    # every parameter of the model, once, under its global name, with its layout-independent initial value
    assert max_diff(want["initial"], got["initial"])[0] == 0.0
    for name, g in want["first_grads"].items():
        diff = (g - got["first_grads"][name]).abs().max().item()
        assert diff <= 1e-5 * g.abs().max().item() + 1e-12, (name, diff)
    assert want["losses"][-1] < want["losses"][0] - 0.3  # it learns
    for step, (a, b) in enumerate(zip(want["losses"], got["losses"], strict=True)):
        assert abs(a - b) <= 1e-5, (step, a, b)
    for step, (a, b) in enumerate(zip(want["grad_norms"], got["grad_norms"], strict=True)):
        assert a > 0.5 and math.isclose(a, b, rel_tol=1e-5), (step, a, b)  # > 0.5: the clip is active
    for a, b in zip(want["evals"], got["evals"], strict=True):  # forward-only eval mid-run and at the end
        assert abs(a - b) <= 1e-5, (a, b)
    diff, name = max_diff(want["final"], got["final"])
    assert diff <= 1e-5, (name, diff)


def test_stage_layers_split_evenly_in_pipeline_order():
    assert stage_layers(4, 2) == [[0, 1], [2, 3]]
    assert stage_layers(4, 2, 2) == [[0], [1], [2], [3]]
    assert stage_layers(8, 2, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert stage_layers(6, 1) == [list(range(6))]
    # interleaved: rank r holds stages r, r + pp, ... (Megatron-LM's model chunks)
    assert [stage_ids(r, 2, 2) for r in range(2)] == [[0, 2], [1, 3]]
    with pytest.raises(CookbookError, match=r"6 layers do not split evenly over 2 pipeline ranks x 2 virtual stages = 4"):
        stage_layers(6, 2, 2)
    with pytest.raises(CookbookError, match="at least 1"):
        stage_layers(4, 0)


def test_split_model_keeps_global_names():
    cfg = ModelConfig(vocab_size=96, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=128)
    with torch.device("meta"):
        model = Transformer(cfg)
    names = {n for n, _ in model.named_parameters()}
    chunks = {r: split_model(model, r, 2, 2) for r in range(2)}
    assert [list(c.layers) for c in chunks[0]] == [["0"], ["2"]]
    assert [list(c.layers) for c in chunks[1]] == [["1"], ["3"]]
    assert chunks[0][0].tok_embeddings is not None and chunks[0][0].output is None
    assert chunks[1][1].norm is not None and chunks[1][1].output is not None and chunks[1][1].tok_embeddings is None
    split = [n for r in range(2) for c in chunks[r] for n, _ in c.named_parameters()]
    assert len(split) == len(names) and set(split) == names  # each parameter once, under its global name
    assert len(list(model.layers)) == 4  # the model itself is untouched
    with pytest.raises(CookbookError, match="tied embeddings"):
        split_model(Transformer(cfg.replace(tie_embeddings=True, num_layers=2)), 0, 2)
