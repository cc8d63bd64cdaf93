"""Model configuration, presets, parameter counts and FLOPs per token."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from cookbook.checks import check_number, check_types
from cookbook.errors import CookbookError
from cookbook.flags import flag

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")


@dataclass
class ModelConfig:
    """A Llama-family decoder. Field names follow HF transformers' LlamaConfig where one exists."""

    vocab_size: int = field(
        default=32000,
        metadata=flag("--vocab-size", help="Vocabulary size (default: the tokenizer's, padded).", panel="Model"),
    )
    hidden_size: int = field(default=4096, metadata=flag("--hidden-size", help="Hidden size.", panel="Model"))
    num_layers: int = field(default=32, metadata=flag("--num-layers", help="Transformer layers.", panel="Model"))
    num_heads: int = field(default=32, metadata=flag("--num-attention-heads", help="Attention heads.", panel="Model"))
    num_kv_heads: int | None = field(  # query groups (GQA); None = num_heads (MHA)
        default=None,
        metadata=flag("--num-query-groups", help="Key/value heads (grouped-query attention).", panel="Model"),
    )
    intermediate_size: int = field(
        default=11008, metadata=flag("--ffn-hidden-size", help="SwiGLU hidden size.", panel="Model")
    )
    head_dim: int | None = None  # None = hidden_size // num_heads
    max_seq_len: int = field(  # HF max_position_embeddings: the context the model was trained for
        default=4096,
        metadata=flag("--max-position-embeddings", help="The context the model is trained for.", panel="Model"),
    )
    rope_theta: float = field(default=10000.0, metadata=flag("--rotary-base", help="RoPE base theta.", panel="Model"))
    # HF's rope_scaling dict: {"rope_type": "linear", "factor": 2.0}, or dynamic / yarn / llama3 with
    # their fields (yarn: beta_fast, beta_slow, attention_factor, original_max_position_embeddings;
    # llama3: low_freq_factor, high_freq_factor, original_max_position_embeddings). None = plain RoPE.
    rope_scaling: dict | None = None
    norm_eps: float = field(default=1e-5, metadata=flag("--norm-epsilon", help="RMSNorm epsilon.", panel="Model"))
    tie_embeddings: bool = field(
        default=False,
        metadata=flag(
            "--tie-embeddings/--untie-embeddings-and-output-weights",
            help="Share the embedding and output weights.",
            panel="Model",
        ),
    )
    qkv_bias: bool = field(
        default=False,
        metadata=flag("--add-qkv-bias/--no-qkv-bias", help="Bias on q, k, v (Qwen2 style).", panel="Model"),
    )
    init_std: float = field(
        default=0.02, metadata=flag("--init-method-std", help="Std of the normal initialisation.", panel="Model")
    )

    def __post_init__(self) -> None:
        check_types(self, "[model]")
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "intermediate_size",
            "head_dim",
            "max_seq_len",
        ):
            check_number(f"[model] {name}", getattr(self, name), low=1)
        for name in ("rope_theta", "norm_eps", "init_std"):
            check_number(f"[model] {name}", getattr(self, name), low=0, low_open=True)
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise CookbookError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise CookbookError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise CookbookError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in ROPE_TYPES:
                raise CookbookError(f"unknown rope type {rope_type!r}; choose one of {', '.join(ROPE_TYPES)}")
            if rope_type != "default" and not self.rope_scaling.get("factor", 0) > 0:
                raise CookbookError(f"rope_scaling {self.rope_scaling} needs a positive factor")

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ sizes

    def num_params(self, embeddings: bool = True) -> int:
        """Parameters of the model (the output layer counted once when tied)."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.qkv_bias else 0)
        mlp = 3 * h * self.intermediate_size
        per_layer = attn + mlp + 2 * h  # two RMSNorm weights
        n = self.num_layers * per_layer + h  # final norm
        if embeddings:
            n += self.vocab_size * h * (1 if self.tie_embeddings else 2)
        else:
            n += self.vocab_size * h  # the output layer is a matmul: it counts as compute
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) from the exact matmul count:
        ``6 * (matmul weights, output layer included, embedding lookup excluded) + 12 * L * s * q``,
        the second term being attention's QK^T and AV without a causal discount (q = heads x head_dim).
        This is the count MFU is measured against."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        matmul = self.num_layers * (h * (q + 2 * kv) + q * h + 3 * h * self.intermediate_size) + self.vocab_size * h
        return 6.0 * matmul + 12.0 * self.num_layers * seq_len * q


def megatron_flops_per_iteration(
    cfg: ModelConfig, global_batch: int, seq_len: int, padded_vocab: int | None = None
) -> float:
    """FLOPs per iteration as the Megatron Cookbook reported TFLOP/s (no causal discount):
    ``60 B s L h^2 (1 + g/(5a) + s/(5h) + V/(10 L h))`` with g query groups, a heads, V padded vocab.
    It assumes Llama's FFN of 8h/3 (4h for the two SwiGLU inputs' share); use it to compare with the cookbook."""
    h, L, a, g = cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads
    V = padded_vocab or cfg.vocab_size
    return 60.0 * global_batch * seq_len * L * h * h * (1 + g / (5 * a) + seq_len / (5 * h) + V / (10 * L * h))


# --------------------------------------------------------------------------- presets
# Llama 2 / Llama 3 shapes are Meta's published configs. The Megatron Cookbook's 31B/65B/108B/132B
# configs are not public in a form we could check; the shapes below are ours, chosen in the Llama
# family's proportions (head_dim 128, FFN ~ 8h/3 rounded to a multiple of 256, MHA as the cookbook
# trained them) to land on those sizes with a 32,000-token vocabulary. num_params() gives the exact count.

PRESET_FIELDS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=8000,
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=688,
        max_seq_len=256,
    ),
    "llama2-7b": dict(
        vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, intermediate_size=11008, max_seq_len=4096
    ),
    "llama2-13b": dict(
        vocab_size=32000, hidden_size=5120, num_layers=40, num_heads=40, intermediate_size=13824, max_seq_len=4096
    ),
    "llama3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=14336,
        max_seq_len=8192,
        rope_theta=500000.0,
    ),
    "llama-31b": dict(
        vocab_size=32000, hidden_size=6656, num_layers=58, num_heads=52, intermediate_size=17920, max_seq_len=4096
    ),
    "llama-65b": dict(
        vocab_size=32000, hidden_size=8192, num_layers=80, num_heads=64, intermediate_size=22016, max_seq_len=4096
    ),
    "llama-108b": dict(
        vocab_size=32000, hidden_size=10240, num_layers=85, num_heads=80, intermediate_size=27392, max_seq_len=4096
    ),
    "llama-132b": dict(
        vocab_size=32000, hidden_size=11264, num_layers=86, num_heads=88, intermediate_size=30208, max_seq_len=4096
    ),
}


PRESETS: dict[str, ModelConfig] = {name: ModelConfig(**fields) for name, fields in PRESET_FIELDS.items()}


def preset(name: str, **overrides) -> ModelConfig:
    """A preset with some fields changed. What the preset leaves to be derived (head_dim, MHA's query groups) is
    derived again from the changed fields: ``tiny`` with ``hidden_size=64, num_heads=4`` has head_dim 16."""
    if name not in PRESETS:
        raise CookbookError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESET_FIELDS[name], **overrides})


def describe(cfg: ModelConfig) -> str:
    n = cfg.num_params()
    return f"{n / 1e9:.2f}B parameters" if n >= 1e9 else f"{n / 1e6:.2f}M parameters"


__all__ = ["ModelConfig", "PRESETS", "preset", "megatron_flops_per_iteration", "describe"]
