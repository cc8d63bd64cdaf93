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

from pathlib import Path

import pytest
import torch
from helpers_train import assert_same_run, run_script

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
    return run_script(SCRIPT, out, nproc, *args)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return run(tmp_path_factory.mktemp("pp") / "one.pt", 1)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_pipeline_run_equals_one_process(tmp_path, one_process, layout):
    """On plain rows, and on rows packed from documents (Megatron-LM's three document flags: positions and
    document ids reach every stage, the masked targets the last)."""
    nproc, *args = LAYOUTS[layout]
    runs = run(tmp_path / f"{layout}.pt", nproc, *args)
    for variant, got in runs.items():
        want = one_process[variant]
        assert_same_run(want, got)  # every parameter once, under its global name
        for a, b in zip(want["evals"], got["evals"], strict=True):  # forward-only eval mid-run and at the end
            assert abs(a - b) <= 1e-5, (variant, a, b)
    assert sorted(runs) == ["docs", "plain"]


def test_stage_layers_split_evenly_in_pipeline_order():
    assert stage_layers(4, 2) == [[0, 1], [2, 3]]
    assert stage_layers(4, 2, 2) == [[0], [1], [2], [3]]
    assert stage_layers(8, 2, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert stage_layers(6, 1) == [list(range(6))]
    # interleaved: rank r holds stages r, r + pp, ... (Megatron-LM's model chunks)
    assert [stage_ids(r, 2, 2) for r in range(2)] == [[0, 2], [1, 3]]
    with pytest.raises(
        CookbookError, match=r"6 layers do not split evenly over 2 pipeline ranks x 2 virtual stages = 4"
    ):
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
