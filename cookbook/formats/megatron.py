"""Megatron-LM checkpoints (the legacy ``torch`` format) read and written one layer at a time, any TP/PP.

    SAVE/
      latest_checkpointed_iteration.txt          "1" (or "release")
      iter_0000001/
        mp_rank_00/model_optim_rng.pt            TP rank 00 (PP = 1)
        mp_rank_01_000/model_optim_rng.pt        TP rank 01, PP stage 000 (PP > 1)
      hf/                                        tokenizer (and config.json) carried for the way back

Each file holds ``{"args": Namespace, "checkpoint_version": 3.0, "iteration": N, "model": {...}}``
with Megatron-Core GPTModel names (below). We write no optimizer or RNG state: start Megatron-LM
from it with ``--finetune`` (or ``--no-load-optim --no-load-rng``).

How our tensors become Megatron's (REFERENCE.md):
- q, k, v are fused per query group: ``[groups, (heads/groups + 2) * head_dim, hidden]``, each block a
  group's query heads, then its key, then its value; tensor parallel gives each rank whole groups.
- gate and up are fused as ``linear_fc1``; rank r holds ``cat([gate_r, up_r])`` (each split in TP chunks).
- linear_proj and linear_fc2 split along their input (dim 1); embedding and output layer by vocabulary
  rows, padded to a multiple of ``make_vocab_size_divisible_by * tp`` with copies of the last row
  (as Megatron-LM's own converter pads); norms are replicated.
- pipeline stage s holds layers [s*L/PP, (s+1)*L/PP), numbered from 0 again; the embedding lives on the
  first stage, the final norm and output layer on the last (with tied embeddings and PP > 1 the last
  stage keeps its own copy of the embedding as ``output_layer.weight``, as GPTModel does).

Reading accepts the local spec's names, TransformerEngine's (norms fused into linear_qkv and linear_fc1)
and the legacy pre-mcore names (``language_model.encoder.layers.N.self_attention.query_key_value``, ...).
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import torch

from cookbook.data.tokenizer import padded_vocab_size
from cookbook.errors import CookbookError
from cookbook.formats import pickles
from cookbook.formats.stream import (
    Checkpoint,
    Tensors,
    expected_shapes,
    hf_side_files,
    layer_groups,
    tokenizer_files,
    tokenizer_path,
)
from cookbook.model.config import ModelConfig

TRACKER = "latest_checkpointed_iteration.txt"
FILE = "model_optim_rng.pt"
IMPLS = ("transformer_engine", "local")
CKPT_FORMATS = ("torch", "torch_dist")  # Megatron-LM's --ckpt-format values cookbook reads and writes
CHECKPOINT_VERSION = 3.0

# Per-layer tensors by role: the names we write first (local spec), then every name we read.
LAYER_KEYS = {
    "input_norm": ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight", "input_norm.weight"),
    "qkv": ("self_attention.linear_qkv.weight", "self_attention.query_key_value.weight"),
    "qkv_bias": ("self_attention.linear_qkv.bias", "self_attention.query_key_value.bias"),
    "proj": ("self_attention.linear_proj.weight", "self_attention.dense.weight"),
    "mlp_norm": (
        "pre_mlp_layernorm.weight",
        "mlp.linear_fc1.layer_norm_weight",
        "post_attention_norm.weight",
        "post_attention_layernorm.weight",
    ),
    "fc1": ("mlp.linear_fc1.weight", "mlp.dense_h_to_4h.weight"),
    "fc2": ("mlp.linear_fc2.weight", "mlp.dense_4h_to_h.weight"),
}
TOP_KEYS = {
    "embedding": ("embedding.word_embeddings.weight", "language_model.embedding.word_embeddings.weight"),
    "final_norm": (
        "decoder.final_layernorm.weight",
        "language_model.encoder.final_norm.weight",
        "language_model.encoder.final_layernorm.weight",
        "language_model.transformer.final_layernorm.weight",
    ),
    "output": ("output_layer.weight", "language_model.output_layer.weight", "word_embeddings_for_head.weight"),
}
# TransformerEngine's spec fuses the norms into the following linear layers
TE_NAMES = {"input_norm": "self_attention.linear_qkv.layer_norm_weight", "mlp_norm": "mlp.linear_fc1.layer_norm_weight"}
# modules with an ``_extra_state`` entry in GPTModel's state dict (None when there is nothing in it)
EXTRA_STATE = {
    "local": ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2"),
    "transformer_engine": (
        "self_attention.core_attention",
        "self_attention.linear_proj",
        "self_attention.linear_qkv",
        "mlp.linear_fc1",
        "mlp.linear_fc2",
    ),
}
# where each of our tensors comes from
SOURCE_ROLE = {
    "tok_embeddings.weight": "embedding",
    "norm.weight": "final_norm",
    "output.weight": "output",
    "attention_norm.weight": "input_norm",
    "attention.wq.weight": "qkv",
    "attention.wk.weight": "qkv",
    "attention.wv.weight": "qkv",
    "attention.wq.bias": "qkv_bias",
    "attention.wk.bias": "qkv_bias",
    "attention.wv.bias": "qkv_bias",
    "attention.wo.weight": "proj",
    "mlp_norm.weight": "mlp_norm",
    "mlp.w_gate.weight": "fc1",
    "mlp.w_up.weight": "fc1",
    "mlp.w_down.weight": "fc2",
}
LAYER_ROLES = {"input_norm", "qkv", "proj", "mlp_norm", "fc1", "fc2"}
LAYER_KEY = re.compile(r"(?:decoder|language_model\.encoder|language_model\.transformer)\.layers\.(\d+)\.(.+)")
IGNORED = re.compile(r".*(\._extra_state|rotary_pos_emb\.inv_freq)$")
RANK_DIR = re.compile(r"mp_rank_(\d{2})(?:_(\d{3}))?$")
DIST_MARKER = "metadata.json"  # megatron-core's distributed checkpoints: {"sharded_backend": "torch_dist", ...}
# Megatron-LM's Llama 3 RoPE scaling has these fixed (megatron.core RotaryEmbedding._apply_scaling)
MEGATRON_LLAMA3 = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def rank_dir(tp_rank: int, pp_rank: int, pp: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


# --------------------------------------------------------------------------- QKV and SwiGLU layouts


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """[q; k; v] (weights or biases) -> Megatron's per-group layout."""
    groups, d, per = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    rest = q.shape[1:]
    blocks = (q.reshape(groups, per * d, *rest), k.reshape(groups, d, *rest), v.reshape(groups, d, *rest))
    return torch.cat(blocks, dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, d, per = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    rest = qkv.shape[1:]
    x = qkv.reshape(groups, (per + 2) * d, *rest)
    q, k, v = x[:, : per * d], x[:, per * d : (per + 1) * d], x[:, (per + 1) * d :]
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def padded_shards(t: torch.Tensor, rows: int, tp: int) -> list[torch.Tensor]:
    """``t`` padded to ``rows`` rows with copies of its last row, in ``tp`` row shards (only a shard that
    reaches past ``t`` is copied)."""
    per, shards = rows // tp, []
    for r in range(tp):
        lo, hi = r * per, (r + 1) * per
        shard = t[lo:hi]
        if hi > t.shape[0]:
            shard = torch.cat([shard, t[-1:].expand(hi - max(lo, t.shape[0]), -1)])
        shards.append(shard)
    return shards


# --------------------------------------------------------------------------- args <-> ModelConfig


def check(cfg: ModelConfig, tp: int, pp: int) -> None:
    """Refuse a model Megatron-LM cannot hold in this TP/PP layout, before anything is written."""
    _rope_args(cfg)
    if tp < 1 or pp < 1:
        raise CookbookError(f"--tp and --pp must be at least 1, not {tp} and {pp}")
    if cfg.num_kv_heads % tp:
        raise CookbookError(
            f"--tp {tp} does not divide the model's {cfg.num_kv_heads} query groups (key/value heads); "
            f"choose a divisor of {cfg.num_kv_heads}"
        )
    if cfg.intermediate_size % tp:
        raise CookbookError(f"--tp {tp} does not divide the FFN size {cfg.intermediate_size}")
    if cfg.num_layers % pp:
        raise CookbookError(
            f"--pp {pp} does not divide the model's {cfg.num_layers} layers; choose a divisor of {cfg.num_layers}"
        )


def _rope_args(cfg: ModelConfig) -> dict:
    kind, scaling = cfg.rope_type, cfg.rope_scaling or {}
    if kind == "default":
        return {}
    if kind == "linear":
        return {"rotary_seq_len_interpolation_factor": scaling["factor"]}
    if kind == "llama3" and all(float(scaling.get(k, v)) == v for k, v in MEGATRON_LLAMA3.items()):
        return {"use_rope_scaling": True, "rope_scaling_factor": scaling["factor"]}
    raise CookbookError(
        f"rope_scaling {scaling} has no Megatron-LM equivalent (it has linear, and llama3 with "
        f"{MEGATRON_LLAMA3}); convert to hf or cookbook instead"
    )


def megatron_args(
    cfg: ModelConfig,
    tp: int,
    pp: int,
    divisible_by: int,
    impl: str,
    dtype: torch.dtype,
    iteration: int,
    tokenizer: Path | None,
    ckpt_format: str = "torch",
) -> argparse.Namespace:
    """The ``args`` Megatron-LM would have had training this model (its flag names)."""
    args = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_heads,
        num_query_groups=cfg.num_kv_heads,
        group_query_attention=cfg.num_kv_heads != cfg.num_heads,
        kv_channels=cfg.head_dim,
        max_position_embeddings=cfg.max_seq_len,
        seq_length=cfg.max_seq_len,
        position_embedding_type="rope",
        use_rotary_position_embeddings=True,
        add_position_embedding=True,
        rotary_base=int(cfg.rope_theta) if float(cfg.rope_theta).is_integer() else cfg.rope_theta,
        rotary_percent=1.0,
        rotary_interleaved=False,
        rotary_seq_len_interpolation_factor=None,
        use_rope_scaling=False,
        rope_scaling_factor=8.0,
        normalization="RMSNorm",
        norm_epsilon=cfg.norm_eps,
        apply_layernorm_1p=False,
        swiglu=True,
        add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias,
        untie_embeddings_and_output_weights=not cfg.tie_embeddings,
        init_method_std=cfg.init_std,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        num_experts=None,
        vocab_size=cfg.vocab_size,
        make_vocab_size_divisible_by=divisible_by,
        padded_vocab_size=padded_vocab_size(cfg.vocab_size, divisible_by, tp),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None,
        transformer_impl=impl,
        use_mcore_models=True,
        ckpt_format=ckpt_format,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        tokenizer_type=None
        if tokenizer is None
        else ("Llama2Tokenizer" if tokenizer.suffix == ".model" else "HuggingFaceTokenizer"),
        tokenizer_model=None if tokenizer is None else str(tokenizer),
        iteration=iteration,
        consumed_train_samples=0,
        consumed_valid_samples=0,
    )
    if ckpt_format == "torch_dist":  # and it holds no optimizer or RNG state (Megatron-LM then asks for neither)
        args.update(use_dist_ckpt=True, no_save_optim=True, no_save_rng=True)
    args.update(_rope_args(cfg))
    return argparse.Namespace(**args)


def _arg(args, name: str, default=None):
    """``args.name``, or ``default`` when absent or an inert placeholder (an enum we did not rebuild)."""
    value = getattr(args, name, default)
    return default if isinstance(value, pickles.Opaque) else value


def model_config(args, vocab: int, tensors_have_qkv_bias: bool, where: str) -> ModelConfig:
    """Our ModelConfig from Megatron-LM's args (``vocab``: the vocabulary before padding), refusing what our
    model cannot represent."""

    def arg(name, default=None):
        return _arg(args, name, default)

    if arg("num_experts"):
        raise CookbookError(
            f"{where} is a mixture-of-experts model (num_experts {arg('num_experts')}); cookbook converts dense Llama-family models only"
        )
    if arg("mtp_num_layers"):
        raise CookbookError(
            f"{where} has {arg('mtp_num_layers')} multi-token prediction layers, which cookbook's model does not have"
        )
    if not arg("swiglu", False):
        raise CookbookError(
            f"{where} was trained without --swiglu; cookbook converts Llama-family models (SwiGLU, RMSNorm, RoPE)"
        )
    if arg("normalization", "LayerNorm") != "RMSNorm":
        raise CookbookError(
            f"{where} uses {arg('normalization', 'LayerNorm')}; cookbook converts Llama-family models (RMSNorm)"
        )
    kind = arg("position_embedding_type")
    if kind not in (None, "rope", "learned_absolute"):
        raise CookbookError(
            f"{where} uses position_embedding_type {kind!r}; cookbook converts plain RoPE (with linear or Llama 3 scaling)"
        )
    if kind != "rope" and not arg("use_rotary_position_embeddings", False):
        raise CookbookError(
            f"{where} does not use rotary position embeddings; cookbook converts Llama-family models (RoPE)"
        )
    if arg("rotary_percent", 1.0) != 1.0 or arg("rotary_interleaved", False) or arg("apply_layernorm_1p", False):
        raise CookbookError(
            f"{where} uses partial/interleaved RoPE or layernorm-1p, which cookbook's model does not have"
        )
    if arg("add_bias_linear", False) or arg("qk_layernorm", False):
        raise CookbookError(
            f"{where} has {'biases on linear layers (add_bias_linear)' if arg('add_bias_linear', False) else 'q/k layernorms (qk_layernorm)'}, "
            "which cookbook's model does not have"
        )
    heads = args.num_attention_heads
    scaling = None
    if arg("use_rope_scaling", False):
        scaling = {"rope_type": "llama3", "factor": float(arg("rope_scaling_factor", 8.0)), **MEGATRON_LLAMA3}
    elif arg("rotary_seq_len_interpolation_factor"):
        scaling = {"rope_type": "linear", "factor": float(arg("rotary_seq_len_interpolation_factor"))}
    try:
        return ModelConfig(
            vocab_size=vocab,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            num_heads=heads,
            num_kv_heads=arg("num_query_groups") if arg("group_query_attention", False) else heads,
            intermediate_size=args.ffn_hidden_size,
            head_dim=arg("kv_channels"),
            max_seq_len=arg("max_position_embeddings") or arg("seq_length") or 4096,
            rope_theta=float(arg("rotary_base", 10000)),
            rope_scaling=scaling,
            norm_eps=float(arg("norm_epsilon", 1e-5)),
            tie_embeddings=not arg("untie_embeddings_and_output_weights", False),
            qkv_bias=bool(arg("add_qkv_bias", False)) or tensors_have_qkv_bias,
            init_std=float(arg("init_method_std", 0.02)),
        )
    except AttributeError as e:
        raise CookbookError(f"{where}: args lacks {e.name or e}; is it a Megatron-LM GPT checkpoint?") from None


def side_files(path: Path, args, notes: list[str]) -> tuple[dict[str, Path], Path | None]:
    """The Hugging Face side files a Megatron-LM checkpoint carries (its hf/ folder, written by cookbook convert)
    or names (args.tokenizer_model), and the tokenizer among them."""
    if (path / "hf").is_dir() and hf_side_files(path / "hf"):
        files = hf_side_files(path / "hf")
        return files, tokenizer_path(path / "hf", files)
    named = _arg(args, "tokenizer_model")
    files = tokenizer_files(Path(named)) if isinstance(named, str) and named else {}
    if not files:
        notes.append(f"no tokenizer found ({path / 'hf'} or args.tokenizer_model); the output carries none")
    return files, Path(named) if files else None


def left_behind(where: str, optimizer: list, others: set[str]) -> list[str]:
    """The note that says what a checkpoint holds besides the model's weights: a conversion leaves it behind.
    ``optimizer``: its optimizer tensors (or their metadata: anything with ``numel`` and ``element_size``)."""
    size = sum(t.numel() * t.element_size() for t in optimizer)
    parts = ([f"optimizer state ({len(optimizer)} tensors, {size / 1e9:,.2f} GB)"] if optimizer else []) + sorted(
        others
    )
    return (
        [f"{where} also holds {', '.join(parts)}: left behind, only the model's weights are converted"] if parts else []
    )


def vocabulary(args, rows: int, tokenizer: Path | None, where: str, notes: list[str]) -> int:
    """The vocabulary before Megatron-LM padded it to ``rows``: args.vocab_size when recorded (cookbook writes it;
    Megatron-LM's --vocab-size), else the run's tokenizer's size as Megatron-LM counts it, else all ``rows``."""
    vocab = _arg(args, "vocab_size")
    source = "args.vocab_size"
    if not vocab and tokenizer is not None:
        from cookbook.data.tokenizer import load_tokenizer

        kind = _arg(args, "tokenizer_type")
        try:
            vocab = load_tokenizer(
                tokenizer,
                kind if isinstance(kind, str) else None,
                backend="reference",
                vocab_file=_arg(args, "vocab_file"),
                merge_file=_arg(args, "merge_file"),
            ).vocab_size
            source = f"the size of its tokenizer {tokenizer}"
        except (CookbookError, OSError, ValueError, RuntimeError):
            vocab = None
    if not vocab:
        notes.append(
            f"{where} records no vocabulary size (args.vocab_size) and no readable tokenizer; "
            f"the {rows} padded rows are kept"
        )
        return rows
    if vocab > rows:
        raise CookbookError(
            f"{where}: the vocabulary ({vocab}, {source}) is larger than the embedding's {rows} rows; "
            "the args do not match the weights"
        )
    if vocab < rows and source != "args.vocab_size":
        notes.append(
            f"{where} records no args.vocab_size; the vocabulary is {vocab}, {source}, "
            f"and the {rows - vocab} padded rows are dropped"
        )
    return vocab


# --------------------------------------------------------------------------- reading


def iteration_dir(path: Path) -> tuple[Path, int]:
    """The iteration folder ``path`` names (a run folder's latest_checkpointed_iteration.txt, or one iter_* /
    release folder of either format) and its iteration."""
    if not path.is_dir():
        raise CookbookError(f"{path} does not exist or is not a folder")
    tracker = path / TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        if text == "release":
            it_dir, iteration = path / "release", 0
        elif not text.isdigit():
            raise CookbookError(f"{tracker} holds {text!r}, not an iteration number or 'release'")
        else:
            it_dir, iteration = path / f"iter_{int(text):07d}", int(text)
        if not it_dir.is_dir():
            raise CookbookError(f"{tracker} names {it_dir.name}, which is missing")
        return it_dir, iteration
    m = re.fullmatch(r"iter_(\d+)|release", path.name)
    if m and (is_dist(path) or any(RANK_DIR.match(p.name) for p in path.iterdir())):
        return path, int(m.group(1) or 0)
    raise CookbookError(
        f"{path} holds no Megatron-LM checkpoint (no {TRACKER}, no mp_rank_* folders and no {DIST_MARKER})"
    )


def is_dist(it_dir: Path) -> bool:
    """Whether an iteration folder holds a distributed (``torch_dist``) checkpoint rather than mp_rank_* files."""
    return (it_dir / DIST_MARKER).is_file()


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _roles(model: dict, where: str) -> tuple[dict, dict[int, dict]]:
    """A rank's state dict -> ({top role: tensor}, {local layer: {role: tensor}})."""
    top_names = {n: role for role, names in TOP_KEYS.items() for n in names}
    layer_names = {n: role for role, names in LAYER_KEYS.items() for n in names}
    top, layers = {}, {}
    for key, value in _flatten(model).items():
        if IGNORED.match(key):
            continue
        m = LAYER_KEY.fullmatch(key)
        if key in top_names:
            top[top_names[key]] = value
        elif m and m.group(2) in layer_names:
            layers.setdefault(int(m.group(1)), {})[layer_names[m.group(2)]] = value
        elif ".experts." in key or ".router." in key:
            raise CookbookError(
                f"{where} holds {key}: a mixture-of-experts model; cookbook converts dense Llama-family models only"
            )
        elif key.endswith(".bias"):
            raise CookbookError(f"{where} holds {key}: biases on linear layers, which cookbook's model does not have")
        else:
            raise CookbookError(f"{where} holds {key}, which is not part of a Llama-family GPT model")
    return top, layers


def _open(it_dir: Path) -> tuple[dict[tuple[int, int], Path], dict[tuple[int, int], dict]]:
    """({(tp rank, pp rank): file}, {(tp rank, pp rank): its structure}) of a legacy iteration folder."""
    ranks = {}
    for p in it_dir.iterdir():
        m = RANK_DIR.match(p.name)
        if m:
            ranks[int(m.group(1)), int(m.group(2) or 0)] = p / FILE
    if (0, 0) not in ranks or not ranks[0, 0].is_file():
        raise CookbookError(f"{it_dir} has no mp_rank_00*/{FILE}; the checkpoint is incomplete")
    first = pickles.load_structure(ranks[0, 0])[0]
    if not isinstance(first, dict) or "args" not in first:
        raise CookbookError(f"{ranks[0, 0]} is not a Megatron-LM checkpoint (no 'args')")
    if "model" not in first:
        chunks = [k for k in first if str(k).startswith("model")]
        raise CookbookError(
            f"{ranks[0, 0]} holds {chunks}: virtual pipeline stages are not supported"
            if chunks
            else f"{ranks[0, 0]} holds no model"
        )
    if float(first.get("checkpoint_version", 0)) < 2.0:
        raise CookbookError(
            f"{ranks[0, 0]} has checkpoint_version {first.get('checkpoint_version', 0)}; "
            "versions before 2.0 order QKV differently and are not supported"
        )
    # the layout the args name (the folders' when they do not say)
    tp = getattr(first["args"], "tensor_model_parallel_size", None) or 1 + max(t for t, _ in ranks)
    pp = getattr(first["args"], "pipeline_model_parallel_size", None) or 1 + max(s for _, s in ranks)
    for t in range(tp):
        for s in range(pp):
            if (t, s) not in ranks or not ranks[t, s].is_file():
                raise CookbookError(f"{it_dir} lacks {rank_dir(t, s, pp)}/{FILE}; the checkpoint is incomplete")
    ranks = {(t, s): ranks[t, s] for t in range(tp) for s in range(pp)}
    return ranks, {key: first if key == (0, 0) else pickles.load_structure(p)[0] for key, p in ranks.items()}


def read(path: Path) -> Checkpoint:
    """A Megatron-LM checkpoint of the ``torch`` format (mp_rank_* files); megatron_dist reads ``torch_dist``."""
    path = Path(path)
    it_dir, iteration = iteration_dir(path)
    ranks, files = _open(it_dir)
    args = files[0, 0]["args"]
    notes = left_behind(
        str(it_dir),
        [t for f in files.values() for t in pickles.tensors_in(f.get("optimizer"))],
        {"RNG state" for f in files.values() if f.get("rng_state") is not None}
        | {
            "distributed optimizer state (distrib_optim.pt)"
            for p in ranks.values()
            if (p.parent / "distrib_optim.pt").exists()
        },
    )
    tp, pp = 1 + max(t for t, _ in ranks), 1 + max(s for _, s in ranks)
    # stages[s][t] = ({top role: meta tensor}, {local layer: {role: meta tensor}})
    stages = [[_roles(files[t, s]["model"], str(ranks[t, s])) for t in range(tp)] for s in range(pp)]
    counts = [len(stage[0][1]) for stage in stages]  # layers per stage (uneven stages read too)
    embedding = [stages[0][t][0].get("embedding") for t in range(tp)]
    if any(e is None for e in embedding):
        raise CookbookError(f"{ranks[0, 0]} holds no word embeddings")
    qkv_bias = any("qkv_bias" in layer for layer in stages[0][0][1].values())
    hf_files, tokenizer = side_files(path, args, notes)
    vocab = vocabulary(args, sum(e.shape[0] for e in embedding), tokenizer, str(it_dir), notes)
    cfg = model_config(args, vocab, qkv_bias, str(it_dir))
    if sum(counts) != cfg.num_layers:
        raise CookbookError(f"{it_dir} holds {sum(counts)} layers but args.num_layers is {cfg.num_layers}")
    last = stages[-1][0][0]
    if "final_norm" not in last or (not cfg.tie_embeddings and "output" not in last):
        raise CookbookError(f"{ranks[0, pp - 1]} lacks the final norm or output layer; the checkpoint is incomplete")
    if cfg.num_kv_heads % tp:
        raise CookbookError(f"{it_dir} has TP {tp}, which does not divide its {cfg.num_kv_heads} query groups")
    roles = {}  # each role's dtype, and a check of every rank's shapes and layers
    for s, stage in enumerate(stages):
        for t, (top, layers) in enumerate(stage):
            _check_shapes((top, layers), cfg, tp, str(ranks[t, s]))
            if sorted(layers) != list(range(counts[s])):
                raise CookbookError(f"{ranks[t, s]} holds layers {sorted(layers)}, not 0..{counts[s] - 1}")
            for local, layer in layers.items():
                if not LAYER_ROLES | ({"qkv_bias"} if cfg.qkv_bias else set()) <= layer.keys():
                    raise CookbookError(f"{ranks[t, s]} lacks tensors of layer {local}; the checkpoint is incomplete")
            for layer in [top, *layers.values()]:
                roles.update({role: tensor.dtype for role, tensor in layer.items()})
    dtypes = {
        name: roles[SOURCE_ROLE[name.split(".", 2)[2] if name.startswith("layers.") else name]]
        for name in expected_shapes(cfg)
    }

    def tensors() -> Tensors:
        layer = 0
        for s, stage in enumerate(stages):
            handles = [open(ranks[t, s], "rb") for t in range(tp)]
            try:
                yield from _stage_tensors(stage, handles, cfg, layer, first=s == 0, last=s == pp - 1)
            finally:
                for h in handles:
                    h.close()
            layer += counts[s]

    return Checkpoint(
        cfg,
        tensors,
        dtypes,
        iteration=iteration,
        hf_files=hf_files,
        notes=notes,
        description=f"Megatron-LM iteration {iteration} (TP {tp}, PP {pp})",
    )


def _stage_tensors(
    stage: list[tuple[dict, dict]], handles: list, cfg: ModelConfig, offset: int, first: bool, last: bool
) -> Tensors:
    """Our tensors from one pipeline stage's TP ranks (open files ``handles``), layers numbered from ``offset``."""
    tops = [top for top, _ in stage]

    def get(parts: list[dict], role: str) -> list[torch.Tensor]:
        return [pickles.materialize(part[role], h) for part, h in zip(parts, handles)]

    def vocabulary(role: str) -> torch.Tensor:  # the TP shards' rows up to the vocabulary size, read in place
        shards = [top[role] for top in tops]
        out = torch.empty(cfg.vocab_size, shards[0].shape[1], dtype=shards[0].dtype)
        for shard, h, lo in zip(shards, handles, range(0, cfg.vocab_size, shards[0].shape[0])):
            pickles.read_rows(shard, h, out[lo : lo + shard.shape[0]])
        return out

    if first:
        yield "tok_embeddings.weight", vocabulary("embedding")
    for local in range(len(stage[0][1])):
        yield from _layer_tensors(offset + local, [layers[local] for _, layers in stage], get, cfg)
    if last:
        yield "norm.weight", get(tops[:1], "final_norm")[0]
        if not cfg.tie_embeddings:
            yield "output.weight", vocabulary("output")


def _check_shapes(rank: tuple[dict, dict], cfg: ModelConfig, tp: int, where: str) -> None:
    """Each tensor of a rank has the shape the args imply for TP ``tp`` (vocabulary rows: at least the vocabulary)."""
    h, d, ffn = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * d // tp
    shapes = {
        "input_norm": (h,),
        "mlp_norm": (h,),
        "final_norm": (h,),
        "qkv": (qkv, h),
        "qkv_bias": (qkv,),
        "proj": (h, cfg.num_heads * d // tp),
        "fc1": (2 * ffn // tp, h),
        "fc2": (h, ffn // tp),
    }
    top, layers = rank
    for role, tensor in [*top.items(), *(item for layer in layers.values() for item in layer.items())]:
        if role in ("embedding", "output"):
            ok = tensor.ndim == 2 and tensor.shape[1] == h and tensor.shape[0] * tp >= cfg.vocab_size
        else:
            ok = tuple(tensor.shape) == shapes[role]
        if not ok:
            raise CookbookError(
                f"{where}: a {role} tensor has shape {tuple(tensor.shape)}, which does not match the "
                f"args (hidden {h}, heads {cfg.num_heads}, groups {cfg.num_kv_heads}, FFN {ffn}, TP {tp})"
            )


def _layer_tensors(i: int, parts: list[dict], get, cfg: ModelConfig) -> Tensors:
    p = f"layers.{i}."
    ffn = cfg.intermediate_size // len(parts)
    qkv = torch.cat(get(parts, "qkv"))
    q, k, v = split_qkv(qkv, cfg)
    bias = split_qkv(torch.cat(get(parts, "qkv_bias")), cfg) if cfg.qkv_bias else None
    yield p + "attention_norm.weight", get(parts[:1], "input_norm")[0]
    for j, (name, w) in enumerate((("wq", q), ("wk", k), ("wv", v))):
        yield p + f"attention.{name}.weight", w.contiguous()
        if bias is not None:
            yield p + f"attention.{name}.bias", bias[j].contiguous()
    del qkv, q, k, v
    yield p + "attention.wo.weight", torch.cat(get(parts, "proj"), dim=1)
    yield p + "mlp_norm.weight", get(parts[:1], "mlp_norm")[0]
    fc1 = get(parts, "fc1")
    yield p + "mlp.w_gate.weight", torch.cat([r[:ffn] for r in fc1])
    yield p + "mlp.w_up.weight", torch.cat([r[ffn:] for r in fc1])
    del fc1
    yield p + "mlp.w_down.weight", torch.cat(get(parts, "fc2"), dim=1)


# --------------------------------------------------------------------------- writing


def arguments(
    final: Path,
    ckpt: Checkpoint,
    dtypes: dict[str, torch.dtype],
    tp: int = 1,
    pp: int = 1,
    divisible_by: int = 128,
    impl: str = "transformer_engine",
    ckpt_format: str = "torch",
) -> argparse.Namespace:
    """The checks and Megatron-LM's ``args`` of a checkpoint to write to ``final`` in ``ckpt_format``: ``torch``
    (rank files, ``write`` here) or ``torch_dist`` (``megatron_dist.write``); ``finish`` completes either."""
    cfg = ckpt.config
    check(cfg, tp, pp)
    if impl not in IMPLS:
        raise CookbookError(f"unknown --transformer-impl {impl!r}; use {' or '.join(IMPLS)}")
    if ckpt_format not in CKPT_FORMATS:
        raise CookbookError(f"unknown --ckpt-format {ckpt_format!r}; use {' or '.join(CKPT_FORMATS)}")
    iteration = max(ckpt.iteration, 1)  # Megatron-LM refuses iteration 0 (it is not 'release')
    tokenizer = tokenizer_path((final / "hf").absolute(), ckpt.hf_files)
    return megatron_args(
        cfg, tp, pp, divisible_by, impl, dtypes["tok_embeddings.weight"], iteration, tokenizer, ckpt_format
    )


def write(it_dir: Path, cfg: ModelConfig, args: argparse.Namespace, tensors: Tensors, tp: int) -> list[Path]:
    """An iteration folder of the ``torch`` format: one mp_rank_* file per TP and PP rank (``args`` from
    ``arguments``)."""
    pp, impl, iteration = args.pipeline_model_parallel_size, args.transformer_impl, args.iteration
    paths = {(t, s): it_dir / rank_dir(t, s, pp) / FILE for t in range(tp) for s in range(pp)}
    writers, models = {}, {key: {} for key in paths}
    names = {role: candidates[0] for role, candidates in LAYER_KEYS.items()}  # the local spec's
    if impl == "transformer_engine":
        names.update(TE_NAMES)
    per_stage = cfg.num_layers // pp
    rows = args.padded_vocab_size

    def put(stage: int, name: str, shards) -> None:
        """Store on each TP rank of ``stage``: a list of shards (one per rank), a replicated tensor, or None."""
        for t in range(tp):
            shard = shards if shards is None or isinstance(shards, torch.Tensor) else shards[t]
            models[t, stage][name] = None if shard is None else writers[t, stage].add(shard)

    try:
        for key, p in paths.items():
            p.parent.mkdir(parents=True)
            writers[key] = pickles.TorchFileWriter(p)
        for key, group in layer_groups(tensors):
            if key == "tok_embeddings.weight":
                shards = padded_shards(group[key], rows, tp)
                put(0, "embedding.word_embeddings.weight", shards)
                if cfg.tie_embeddings and pp > 1:  # the last stage's copy for the output layer
                    put(pp - 1, "output_layer.weight", shards)
                del shards
            elif key == "norm.weight":
                put(pp - 1, "decoder.final_layernorm.weight", group[key])
            elif key == "output.weight":
                put(pp - 1, "output_layer.weight", padded_shards(group[key], rows, tp))
            else:
                stage, local = divmod(key, per_stage)
                _write_layer(put, stage, f"decoder.layers.{local}.", group, names, cfg, tp, impl)
            del group  # before the next layer is read: one layer in memory, not two
        for key, model in models.items():
            if key[1] == pp - 1:
                model["output_layer._extra_state"] = None
            writers.pop(key).close(
                {"args": args, "checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration, "model": model}
            )
    finally:
        writers.clear()  # after a failure: drop the open files (the caller removes the folder)
    return list(paths.values())


def finish(folder: Path, iteration: int, ckpt: Checkpoint) -> None:
    """What both formats write beside the iteration folder: the tracker file and hf/ (tokenizer, config.json)."""
    (folder / TRACKER).write_text(f"{iteration}\n")
    if ckpt.hf_files:
        (folder / "hf").mkdir()
        for name, path in ckpt.hf_files.items():
            shutil.copyfile(path, folder / "hf" / name)


def _write_layer(put, stage: int, prefix: str, group: dict, names: dict, cfg: ModelConfig, tp: int, impl: str) -> None:
    put(stage, prefix + names["input_norm"], group["attention_norm.weight"])
    qkv = fuse_qkv(group["attention.wq.weight"], group["attention.wk.weight"], group["attention.wv.weight"], cfg)
    put(stage, prefix + names["qkv"], qkv.chunk(tp))
    if cfg.qkv_bias:
        bias = fuse_qkv(group["attention.wq.bias"], group["attention.wk.bias"], group["attention.wv.bias"], cfg)
        put(stage, prefix + names["qkv_bias"], bias.chunk(tp))
    put(stage, prefix + names["proj"], group["attention.wo.weight"].chunk(tp, dim=1))
    put(stage, prefix + names["mlp_norm"], group["mlp_norm.weight"])
    gates, ups = group["mlp.w_gate.weight"].chunk(tp), group["mlp.w_up.weight"].chunk(tp)
    put(stage, prefix + names["fc1"], [torch.cat([g, u]) for g, u in zip(gates, ups)])
    put(stage, prefix + names["fc2"], group["mlp.w_down.weight"].chunk(tp, dim=1))
    for module in EXTRA_STATE[impl]:
        put(stage, prefix + module + "._extra_state", None)
