"""`cookbook plan`'s memory arithmetic: hand-computed cases and allocator measurements on CPU."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from rich.console import Console
from test_recompute import make, memory_profile

from cookbook.engine.plan import GIB, GPUS, HEADROOM, estimate, forward_held_bytes, layer_activation_bytes, stage_params
from cookbook.engine.recompute import apply_activation_checkpointing
from cookbook.errors import CookbookError
from cookbook.model import ModelConfig
from cookbook.model.config import PRESETS
from recipes.plan import render, run

A100 = GPUS["A100-80GB"]


def test_llama2_7b_state_on_8_gpus_by_hand():
    cfg = PRESETS["llama2-7b"]
    assert cfg.num_params() == 6_738_415_616
    x = estimate(cfg, 4096, 1024, A100, 8, 8, tp=1, pp=1, mode="none", micro_batch=1)
    # 16 B per parameter (fp32 master 4 + fp32 grad 4 + Adam m, v 8) sharded over 8 ranks: 13.48e9 B = 12.55 GiB
    assert x.params_gib + x.grads_gib + x.optimizer_gib == pytest.approx(16 * 6_738_415_616 / 8 / GIB)
    assert x.params_gib == pytest.approx(3.1378, abs=1e-3)
    assert x.optimizer_gib == pytest.approx(6.2756, abs=1e-3)
    # tp=2 halves each rank's share again (norms replicated: a few KiB off)
    y = estimate(cfg, 4096, 1024, A100, 8, 8, tp=2, pp=1, mode="none", micro_batch=1)
    assert y.dp == 4 and y.params_gib == pytest.approx(x.params_gib, rel=1e-3)  # P/(tp dp) is the same
    assert y.micro_batches == 1024 // 4


def test_pipeline_stages_split_the_layers_and_place_embedding_and_output():
    cfg = PRESETS["llama2-13b"]
    assert stage_params(cfg, 1, 0) == cfg.num_params()
    assert stage_params(cfg, 2, 0) + stage_params(cfg, 2, 1) == cfg.num_params()
    vh = cfg.vocab_size * cfg.hidden_size
    blocks = [stage_params(cfg, 4, s) for s in range(4)]
    assert sum(blocks) == cfg.num_params()
    assert blocks[0] - blocks[1] == vh and blocks[3] - blocks[1] == vh + cfg.hidden_size
    tied = PRESETS["tiny"].replace(tie_embeddings=True)
    assert stage_params(tied, 1, 0) == tied.num_params()


def test_activation_bytes_per_token_by_hand():
    cfg = PRESETS["llama2-7b"]  # h = q = 4096, f = 11008, 32 heads, MHA
    h, f, n = 4096, 11008, 32
    # none: two norms (fp32 copy 4h + rstd 4 + bf16 normalised 2h + bf16 output 2h), q k v out 4 x 2h,
    # logsumexp 4 B per head, SwiGLU 4 x 2f
    assert layer_activation_bytes(cfg, "none") == 2 * (8 * h + 4) + 8 * h + 4 * n + 8 * f == 186_504
    # selective: wq wk wv outputs, SDPA output + logsumexp, wo, gate, up, down outputs, block output
    assert layer_activation_bytes(cfg, "selective") == 2 * (4 * h + 2 * f + 3 * h) + 4 * n == 101_504
    assert layer_activation_bytes(cfg, "full") == 2 * h
    # tp=8 with sequence parallel: the all-gathered norm outputs (2h each) and the row-parallel partial sums stay whole
    assert layer_activation_bytes(cfg, "none", tp=8) == 2 * ((6 * h + 4) / 8 + 2 * h) + (8 * h + 4 * n + 8 * f) / 8
    assert layer_activation_bytes(cfg, "selective", tp=8) == (2 * (4 * h + 2 * f) + 4 * n) / 8 + 4 * h + 2 * h / 8
    assert layer_activation_bytes(cfg, "full", tp=8) == 2 * h / 8
    gqa = PRESETS["llama3-8b"]  # 8 kv heads: selective keeps wk/wv outputs a quarter of q's size
    assert layer_activation_bytes(gqa, "selective") == 2 * (2 * 4096 + 2 * 1024 + 2 * 14336 + 3 * 4096) + 4 * 32


MEASURED = ModelConfig(
    vocab_size=96, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=352, max_seq_len=256
)


@pytest.fixture(scope="module")
def measured():
    """Bytes held when the forward ends (allocator events), per dtype and mode, for a 4-layer model, micro batch 2 x 256."""
    plain, batch = make(MEASURED)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):  # bf16 weights: what FSDP2's param_dtype=bf16 computes with
        model = plain.to(dtype) if dtype != torch.float32 else plain
        for mode in ("none", "selective", "full"):
            m = copy.deepcopy(model)
            apply_activation_checkpointing(m, mode)
            out[(dtype, mode)] = memory_profile(m, batch)[0]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_activation_formula_matches_measured_memory(measured, dtype, mode):
    p = 4 if dtype == torch.float32 else 2
    want = forward_held_bytes(MEASURED, 2, 256, mode, p)
    got = measured[(dtype, mode)]
    print(f"{dtype} {mode}: measured {got / 2**20:.3f} MiB, formula {want / 2**20:.3f} MiB")
    assert got == pytest.approx(want, rel=0.10)


@pytest.mark.parametrize("vocab", [96, 8000])
def test_planned_activations_cover_the_measured_peak(vocab):
    """The planner's activation memory (held + the backward's working set + the loss's) covers the measured peak
    over forward + backward of a bf16 model, less its bf16 gradients (within 5%: the kernels' workspaces differ from
    CPU to CPU). How far above the peak the plan lies depends on those kernels too, so that ratio is a benchmark
    (bench/plan.py), not a test."""
    cfg = MEASURED.replace(vocab_size=vocab)
    plain, batch = make(cfg)
    plain = plain.to(torch.bfloat16)
    grads = 2 * sum(p.numel() for p in plain.parameters())
    for mode in ("none", "selective", "full"):
        m = copy.deepcopy(plain)
        apply_activation_checkpointing(m, mode)
        peak = memory_profile(m, batch)[1] - grads
        planned = estimate(cfg, 256, 2, A100, 1, 8, tp=1, pp=1, mode=mode, micro_batch=2).activations_gib * GIB
        print(f"vocab {vocab} {mode}: measured peak {peak / 2**20:.2f} MiB, planned {planned / 2**20:.2f} MiB")
        assert peak <= 1.05 * planned


def test_every_preset_gets_a_recommendation():
    for name, gpus in [
        ("tiny", 8),
        ("llama2-7b", 8),
        ("llama2-13b", 16),
        ("llama3-8b", 16),
        ("llama-31b", 64),
        ("llama-65b", 128),
        ("llama-108b", 128),
        ("llama-132b", 128),
    ]:
        r = run(name, 4096, 1024, "A100-80GB", gpus)
        best = r.recommended
        assert best.fits and best.total_gib <= HEADROOM * 80
        assert best.step_seconds <= 1.01 * min(x.step_seconds for x in r.fitting)
        assert best.tp * best.pp * best.dp == gpus and best.tp <= 8
        assert 0 < best.mfu <= 0.5
        assert [x.step_seconds for x in r.layouts] == sorted(x.step_seconds for x in r.layouts)
        assert "recommended: " in r.recommendation()
        json.dumps(r.to_dict())
    console = Console(width=200, record=True)
    console.print(render(r))
    assert "132.16B parameters" in console.export_text()


def test_a_model_too_big_for_its_gpus_and_bad_input_raise_one_sentence():
    with pytest.raises(CookbookError, match="no layout fits"):
        run("llama-132b", 4096, 1024, "A100-80GB", 8)
    with pytest.raises(CookbookError, match="unknown GPU"):
        run("llama2-7b", 4096, 1024, "V100", 8)
    with pytest.raises(CookbookError, match="unknown preset"):
        run("llama-7b", 4096, 1024, "A100-80GB", 8)
    with pytest.raises(CookbookError, match="not a multiple"):
        run("llama2-7b", 4096, 1001, "A100-80GB", 8, micro_batch_sizes=(2,))
    with pytest.raises(CookbookError, match="no layout of 8 GPUs"):
        run("llama2-7b", 4096, 3, "A100-80GB", 8, max_tp=4, max_pp=1)
    with pytest.raises(CookbookError, match="whole number of nodes"):
        run("llama2-7b", 4096, 1024, "A100-80GB", 12)
    with pytest.raises(CookbookError, match="name a --preset"):
        run(None, 4096, 1024, "A100-80GB", 8)


def test_shapes_instead_of_a_preset_and_layout_limits():
    r = run(
        None,
        2048,
        64,
        "H100-80GB",
        8,
        num_layers=8,
        hidden_size=1024,
        num_heads=8,
        num_kv_heads=8,
        intermediate_size=2816,
        vocab_size=32000,
    )
    assert r.model["hidden_size"] == 1024 and r.seq_length == 2048
    assert {x.tp for x in r.layouts} == {1, 2, 4, 8}
    r = run("llama2-7b", 4096, 1024, "A100-80GB", 16, max_tp=2, max_pp=1)
    assert {x.tp for x in r.layouts} <= {1, 2} and {x.pp for x in r.layouts} == {1}
    # tp must divide the kv heads: llama3-8b's 8 kv heads allow 1, 2, 4, 8; a 6-head model only 1 and 2
    r = run(
        None,
        1024,
        64,
        "A100-80GB",
        8,
        num_layers=2,
        hidden_size=384,
        num_heads=6,
        intermediate_size=1024,
        vocab_size=1000,
    )
    assert {x.tp for x in r.layouts} == {1, 2}


def test_plan_command(tmp_path):
    import json

    from helpers_data import assert_one_line_error, run_cli

    proc = run_cli("plan", "--preset", "llama2-7b", "--seq-length", "4096", "--num-gpus", "16", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["recommended"] is not None
    assert_one_line_error(run_cli("plan", "--preset", "llama2-7b", "--gpu", "Z80"), "Z80")


def test_the_recommendation_says_its_rule():
    """llama-65b on 128 A100s: the fastest layout fits (pp 16), a pp 1 layout is within 1% of it: the recommendation
    is the simpler one and says so; where nothing is that close, the fastest is recommended as the fastest."""
    r = run("llama-65b", 4096, 1024, "A100-80GB", 128)
    fastest = r.fitting[0]
    assert r.recommended is not fastest and r.recommended.pp < fastest.pp
    assert (
        f"within 1% of the fastest that fits ({fastest.name}, {fastest.step_seconds:.2f} s) and simpler: pipeline "
        f"parallel {r.recommended.pp} instead of {fastest.pp}" in r.recommendation()
    )
    r = run("llama2-7b", 4096, 1024, "A100-80GB", 8)
    assert r.recommended is r.fitting[0] and "the fastest layout that fits" in r.recommendation()


def test_the_table_fits_80_columns():
    from rich.console import Console

    r = run("llama-65b", 4096, 1024, "A100-80GB", 128)
    for wide, width in ((False, 80), (True, 120)):
        console = Console(width=width, record=True, color_system=None)
        console.print(render(r, wide=wide))
        text = console.export_text()
        assert "…" not in text and "recompute" in text and "step s" in text, text
        assert ("transient" in text) == wide
