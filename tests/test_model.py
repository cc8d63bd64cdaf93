"""The model equals HF transformers' LlamaForCausalLM / Qwen2ForCausalLM with the same weights."""

from __future__ import annotations

import pytest
import torch

from cookbook.errors import CookbookError
from cookbook.formats.hf import hf_config, hf_name
from cookbook.model import ModelConfig, Transformer, megatron_flops_per_iteration, preset
from cookbook.model.config import PRESETS

transformers = pytest.importorskip("transformers")

BASE = dict(vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=160, max_seq_len=32)

CASES = {
    "mha": dict(),
    "gqa": dict(num_kv_heads=2),
    "gqa-tied": dict(num_kv_heads=2, tie_embeddings=True),
    "mqa": dict(num_kv_heads=1),
    "qkv-bias": dict(num_kv_heads=2, qkv_bias=True),
    "rope-linear": dict(num_kv_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "rope-dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "rope-yarn": dict(
        num_kv_heads=2, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    ),
    "rope-yarn-mscale": dict(
        rope_scaling={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "mscale": 0.707,
            "mscale_all_dim": 0.707,
            "beta_fast": 16,
            "beta_slow": 2,
        }
    ),
    "rope-llama3": dict(
        num_kv_heads=2,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
}


def hf_model(cfg: ModelConfig, ours: Transformer):
    conf = hf_config(cfg)
    cls = transformers.Qwen2Config if cfg.qkv_bias else transformers.LlamaConfig
    model_cls = transformers.Qwen2ForCausalLM if cfg.qkv_bias else transformers.LlamaForCausalLM
    conf.pop("architectures"), conf.pop("model_type")
    hf = model_cls(cls(**conf, attn_implementation="eager")).eval()
    state = {hf_name(k): v for k, v in ours.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    return hf


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers(case):
    torch.manual_seed(0)
    cfg = ModelConfig(**BASE, **CASES[case])
    ours = Transformer(cfg).eval()
    hf = hf_model(cfg, ours)
    # beyond max_seq_len too, where dynamic NTK and the extension types matter
    for seq in (16, 48):
        tokens = torch.randint(0, cfg.vocab_size, (2, seq))
        with torch.no_grad():
            a = ours(tokens)
            b = hf(tokens).logits
        assert (a - b).abs().max().item() < 1e-5, f"{case} at {seq}: {(a - b).abs().max().item()}"


def test_parameter_count_matches_the_module_and_transformers():
    for case in ("mha", "gqa-tied", "qkv-bias"):
        cfg = ModelConfig(**BASE, **CASES[case])
        ours = Transformer(cfg)
        assert cfg.num_params() == sum(p.numel() for p in ours.parameters())
        assert cfg.num_params() == hf_model(cfg, ours).num_parameters()


def test_presets_have_the_published_sizes():
    assert preset("llama2-7b").num_params() == 6_738_415_616  # Llama-2-7b-hf
    assert preset("llama2-13b").num_params() == 13_015_864_320
    assert preset("llama3-8b").num_params() == 8_030_261_248
    for name, billions in (("llama-31b", 31), ("llama-65b", 65), ("llama-108b", 108), ("llama-132b", 132)):
        assert abs(PRESETS[name].num_params() / 1e9 - billions) < 1.0, name


def test_flops_formulas_by_hand():
    cfg = ModelConfig(vocab_size=16, hidden_size=4, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=8)
    # matmul weights per layer: q 4x4 + k,v 4x2 each + o 4x4 + mlp 3x4x8 = 16+16+16+96 = 144; output 16x4
    assert cfg.flops_per_token(seq_len=8) == 6 * (2 * 144 + 64) + 12 * 2 * 8 * 4
    # Megatron's formula: 60 B s L h^2 (1 + g/(5a) + s/(5h) + V/(10Lh)), here B=1, s=8
    assert megatron_flops_per_iteration(cfg, 1, 8) == pytest.approx(60 * 8 * 2 * 16 * (1 + 1 / 10 + 8 / 20 + 16 / 80))


@pytest.mark.parametrize(
    "bad",
    [
        dict(hidden_size=63),
        dict(num_kv_heads=3),
        dict(rope_scaling={"rope_type": "ntk-by-magic", "factor": 2.0}),
        dict(rope_scaling={"rope_type": "linear", "factor": 0}),
    ],
)
def test_bad_configs_are_clear_errors(bad):
    with pytest.raises(CookbookError):
        ModelConfig(**{**BASE, **bad})


def test_unknown_preset():
    with pytest.raises(CookbookError, match="unknown preset"):
        preset("llama-1t")


def test_backward_runs_and_tied_weights_share_storage():
    cfg = ModelConfig(**BASE, num_kv_heads=2, tie_embeddings=True)
    model = Transformer(cfg)
    assert model.output.weight is model.tok_embeddings.weight
    tokens = torch.randint(0, cfg.vocab_size, (2, 9))
    logits = model(tokens[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
