"""A Llama-family decoder, top to bottom.

    x = embed(tokens)
    for each block:   h = x + Attention(RMSNorm(x))          grouped-query attention with RoPE
                      x = h + MLP(RMSNorm(h))                 SwiGLU: down(silu(gate(x)) * up(x))
    logits = output(RMSNorm(x))                               output tied to embed, optionally

RoPE rotates query/key channel pairs (i, i + head_dim/2) ("rotate half", as HF and Megatron-LM do)
by angle position * inv_freq[i], inv_freq[i] = theta^(-2i/head_dim). Context extension rescales
inv_freq (linear = Position Interpolation, dynamic NTK, YaRN, Llama 3) with HF transformers'
``rope_scaling`` formulas. Weights are initialised N(0, init_std), the two projections that write
into the residual stream (attention output, MLP down) with init_std / sqrt(2 * num_layers), as
Megatron-LM does. Nothing here knows about parallelism: cookbook.engine applies it from outside.

Attention is causal over the whole row unless a ``mask`` comes in from outside: packed training samples then
attend only within their own document (Megatron-LM's ``--reset-attention-mask``), and the mask carries the
kernel that runs it (SDPA, FlexAttention or flash-attn: cookbook/engine/attention.py prepares it once per forward).

For generation only, an optional ``KVCache`` keeps each layer's keys and values so that a forward over
new tokens attends over everything before them; training never passes one and never pays for it.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cookbook.model.config import ModelConfig

# --------------------------------------------------------------------------- RoPE


def rope_frequencies(cfg: ModelConfig, seq_len: int, device=None) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2], attention scaling of cos/sin) for a forward over ``seq_len`` positions."""
    dim, base = cfg.head_dim, cfg.rope_theta
    scaling = cfg.rope_scaling or {}
    kind = cfg.rope_type
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim

    if kind == "dynamic" and seq_len > cfg.max_seq_len:  # NTK: grow the base with the sequence
        factor = scaling["factor"]
        base = base * ((factor * seq_len / cfg.max_seq_len) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base**exponents)

    if kind == "linear":  # Position Interpolation: positions divided by the factor
        return inv_freq / scaling["factor"], 1.0

    if kind == "llama3":  # long wavelengths interpolated, short kept, a smooth ramp between
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling.get("original_max_position_embeddings", cfg.max_seq_len)
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0

    if kind == "yarn":  # NTK-by-parts: interpolate low frequencies, keep high ones; temperature
        factor = scaling["factor"]
        old_len = scaling.get("original_max_position_embeddings", cfg.max_seq_len)
        attention = scaling.get("attention_factor")
        if attention is None:
            mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")

            def get_mscale(s, m=1.0):
                return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

            attention = (
                get_mscale(factor, mscale) / get_mscale(factor, mscale_all)
                if mscale and mscale_all
                else get_mscale(factor)
            )
        beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

        def correction_dim(rotations):
            return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device=device) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
        return inv_freq, float(attention)

    return inv_freq, 1.0


def rope_cos_sin(cfg: ModelConfig, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [..., seq, head_dim] for integer ``positions`` [..., seq]."""
    inv_freq, scale = rope_frequencies(cfg, int(positions.max()) + 1, positions.device)
    angles = positions[..., None].float() * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return (angles.cos() * scale).to(dtype), (angles.sin() * scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [batch, heads, seq, head_dim]; cos/sin [batch or 1, seq, head_dim]."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


# --------------------------------------------------------------------------- KV cache (generation only)


class KVCache:
    """Keys and values of the tokens seen so far (LitGPT / gpt-fast style): per layer, two preallocated buffers
    [batch, kv_heads, max_len, head_dim], kv heads as they are (not repeated for GQA). Slot p of a row holds that
    row's token at position p, so rows may stand at different positions (prompts of different lengths)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, *, device=None, dtype=None):
        shape, where = (batch, cfg.num_kv_heads, max_len, cfg.head_dim), dict(device=device, dtype=dtype)
        self.buffers = {
            str(i): (torch.zeros(shape, **where), torch.zeros(shape, **where)) for i in range(cfg.num_layers)
        }
        self.batch, self.max_len = batch, max_len

    def at(self, positions: torch.Tensor) -> dict[str, LayerCache]:
        """Each layer's view for a forward over tokens at ``positions`` [batch or 1, seq]. A query sees the slots
        at or before its own position: the causal mask, which also hides stale slots beyond it (a right-padded
        prompt's padding is overwritten by its generated tokens before any query could see it)."""
        end = int(positions.max()) + 1  # no query looks past the furthest position: attend over slots 0..end-1 only
        slots = torch.arange(end, device=positions.device)
        mask = (slots <= positions[..., None]).unsqueeze(1)  # [batch or 1, 1, seq, end]
        rows = torch.arange(self.batch, device=positions.device)[:, None]
        return {name: LayerCache(k, v, rows, positions, mask, end) for name, (k, v) in self.buffers.items()}


@dataclass
class LayerCache:
    """One layer's buffers, and where the tokens of this forward go in them."""

    k: torch.Tensor  # [batch, kv_heads, max_len, head_dim]
    v: torch.Tensor
    rows: torch.Tensor  # [batch, 1]
    positions: torch.Tensor  # [batch or 1, seq]
    mask: torch.Tensor  # [batch or 1, 1, seq, end], True where a query may look
    end: int  # slots in use: 0 .. end-1

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store k, v [batch, kv_heads, seq, head_dim]; return the keys and values of the slots in use and the
        mask over them."""
        # indexed by [rows, :, positions], the buffer reads [batch, seq, kv_heads, head_dim]
        self.k[self.rows, :, self.positions] = k.transpose(1, 2).to(self.k.dtype)
        self.v[self.rows, :, self.positions] = v.transpose(1, 2).to(self.v.dtype)
        return self.k[:, :, : self.end], self.v[:, :, : self.end], self.mask


# --------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32, scale in the input dtype (as HF's LlamaRMSNorm)
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
        return self.weight * y


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, cache: LayerCache | None = None, mask=None
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, -1, self.head_dim).transpose(1, 2)  # [b, heads, s, d]
        k = self.wk(x).view(b, s, -1, self.head_dim).transpose(1, 2)  # [b, kv_heads, s, d]
        v = self.wv(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = self.attend(q, k, v, cache, mask)
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache | None = None, mask=None
    ) -> torch.Tensor:
        """Causal attention of q [b, heads, s, d] over k, v [b, kv_heads, s, d] -> [b, heads, s, d]. A ``mask``
        from outside (``cookbook.engine.attention.AttentionMask``) narrows it to each token's own document and runs
        it with its kernel."""
        if mask is not None:
            return mask.attend(q, k, v)
        seen = None  # generation: which cached keys each query sees
        if cache is not None:  # generation: keep these keys/values, attend over every cached one it may see
            k, v, seen = cache.update(k, v)
            if q.shape[2] == 1:  # a decode step: SDPA reads the kv heads in place (no copy of the cache per step)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=seen, enable_gqa=k.shape[1] != q.shape[1])
        # longer forwards repeat the kv heads, so that every SDPA kernel (flash, memory-efficient) applies
        k, v = repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=seen, is_causal=seen is None)


def repeat_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped-query attention: each of x's kv heads [b, kv_heads, s, d] serves heads / kv_heads query heads."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w_up = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w_down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, cache: LayerCache | None = None, mask=None
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, cache=cache, mask=mask)
        return h + self.mlp(self.mlp_norm(h))


# --------------------------------------------------------------------------- the model


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # a dict, not a list: pipeline stages delete the layers they do not own and keep the names
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.num_layers)})
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        """With ``tie_embeddings``, the output layer uses the embedding's weight (again, after anything
        that replaced parameters, such as materialising from the meta device)."""
        if self.config.tie_embeddings and self.output is not None and self.tok_embeddings is not None:
            self.output.weight = self.tok_embeddings.weight

    def init_weights(self, seed: int | None = None) -> None:
        """Every parameter to ``initial_value`` (a seed drawn from torch's global RNG when None)."""
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (), device="cpu").item())
        with torch.no_grad():
            for name, param in self.named_parameters():
                if not param.is_meta:
                    param.copy_(self.initial_value(name, param.shape, param.device, seed))

    def initial_value(self, name: str, shape: torch.Size, device: torch.device, seed: int) -> torch.Tensor:
        """The initial value of parameter ``name``: norms 1, biases 0, weights N(0, init_std), the two
        projections into the residual stream N(0, init_std / sqrt(2 * layers)). Each weight has its own
        generator seeded by (seed, name), so the values do not depend on the order or the parallel
        layout in which parameters are materialised."""
        if name.endswith("norm.weight"):
            return torch.ones(shape, device=device)
        if name.endswith(".bias"):
            return torch.zeros(shape, device=device)
        std = self.config.init_std
        if name.endswith(("attention.wo.weight", "mlp.w_down.weight")):
            std = std / math.sqrt(2 * self.config.num_layers)
        generator = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.normal(0.0, std, tuple(shape), generator=generator, device=device)

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last: torch.Tensor | None = None,
        mask=None,
    ) -> torch.Tensor:
        """tokens [batch, seq] -> logits [batch, seq, vocab]; ``positions`` [batch or 1, seq] default to 0..seq-1
        (packed documents restart them at each document: Megatron-LM's ``--reset-position-ids``); ``mask`` keeps
        attention within documents (``Attention.attend``).
        With a ``cache`` (generation), the tokens' keys and values are stored at their positions and attention
        reads every cached position at or before each token's: a prompt, then one token at a time. ``last``
        [batch] (a prompt's prefill) keeps only position ``last[i]`` of row i: logits [batch, 1, vocab]."""
        x = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
        cos, sin = rope_cos_sin(self.config, positions, x.dtype)
        caches = cache.at(positions) if cache is not None else {}
        for name, layer in self.layers.items():
            x = layer(x, cos, sin, cache=caches.get(name), mask=mask)
        if last is not None:
            x = x[torch.arange(x.shape[0], device=x.device), last][:, None]
        x = self.norm(x) if self.norm is not None else x
        return self.output(x) if self.output is not None else x
