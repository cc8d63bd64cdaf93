"""The one intermediate every conversion goes through: a stream of (cookbook name, tensor).

Every reader yields our parameter names (``tok_embeddings.weight``, ``layers.N.attention.wq.weight``,
... ``output.weight``) in one canonical order, one tensor at a time; every writer consumes that
stream. N formats need N readers and N writers, and a conversion holds at most one layer in memory
(writers that must see a whole layer at once, as Megatron's fused QKV does, group it with
``layer_groups``).

The canonical order is the model's own: the embedding, then each layer (attention norm, q, k, v and
their biases, attention output, MLP norm, gate, up, down), the final norm, and the output layer
unless it is tied to the embedding (a tied model's stream has no ``output.weight``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cookbook.errors import CookbookError
from cookbook.model.config import ModelConfig

Tensors = Iterator[tuple[str, torch.Tensor]]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# files a checkpoint carries for the Hugging Face side (tokenizer, config.json, generation config, chat
# template): everything in a Hugging Face folder except weights
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class Checkpoint:
    """What a reader found: the model's config, its tensors (a fresh stream per call) and what travels with it."""

    config: ModelConfig
    tensors: Callable[[], Tensors]  # a fresh stream in the canonical order
    dtypes: dict[str, torch.dtype]  # each tensor's dtype, known before its bytes are read
    iteration: int = 0  # training step / iteration of the source (0 when unknown)
    # Hugging Face side files to carry (name -> path): tokenizer files, and config.json when the source was HF
    hf_files: dict[str, Path] = field(default_factory=dict)
    tokenizer_type: str | None = None  # how the tokenizer was used (Megatron's --tokenizer-type), when recorded
    notes: list[str] = field(default_factory=list)  # what the user should know (printed, not fatal)
    description: str = ""


def layer_names(cfg: ModelConfig, i: int) -> list[str]:
    p = f"layers.{i}."
    names = [p + "attention_norm.weight", p + "attention.wq.weight"]
    names += [p + "attention.wq.bias"] if cfg.qkv_bias else []
    names += [p + "attention.wk.weight"] + ([p + "attention.wk.bias"] if cfg.qkv_bias else [])
    names += [p + "attention.wv.weight"] + ([p + "attention.wv.bias"] if cfg.qkv_bias else [])
    return names + [
        p + "attention.wo.weight",
        p + "mlp_norm.weight",
        p + "mlp.w_gate.weight",
        p + "mlp.w_up.weight",
        p + "mlp.w_down.weight",
    ]


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the stream, in its order, with its shape."""
    h, d, ffn = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    per_layer = {
        "attention_norm.weight": (h,),
        "attention.wq.weight": (q, h),
        "attention.wq.bias": (q,),
        "attention.wk.weight": (kv, h),
        "attention.wk.bias": (kv,),
        "attention.wv.weight": (kv, h),
        "attention.wv.bias": (kv,),
        "attention.wo.weight": (h, q),
        "mlp_norm.weight": (h,),
        "mlp.w_gate.weight": (ffn, h),
        "mlp.w_up.weight": (ffn, h),
        "mlp.w_down.weight": (h, ffn),
    }
    shapes = {"tok_embeddings.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        for name in layer_names(cfg, i):
            shapes[name] = per_layer[name.split(".", 2)[2]]
    shapes["norm.weight"] = (h,)
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, h)
    return shapes


def checked(tensors: Tensors, cfg: ModelConfig, source: str) -> Tensors:
    """Pass the stream through, refusing a tensor that is missing, extra, out of order or of the wrong shape."""
    expected = iter(expected_shapes(cfg).items())
    for name, tensor in tensors:
        want, shape = next(expected, (None, None))
        if name != want:
            raise CookbookError(
                f"{source} gave tensor {name} where {want or 'the end'} was expected; is it a plain Llama-family checkpoint?"
            )
        if tuple(tensor.shape) != shape:
            raise CookbookError(
                f"{source}: {name} has shape {tuple(tensor.shape)} but the config implies {shape}; the config does not match the weights"
            )
        if not tensor.is_floating_point():
            raise CookbookError(f"{source}: {name} holds {tensor.dtype}, not floating-point weights")
        yield name, tensor
    missing = next(expected, None)
    if missing:
        raise CookbookError(f"{source} has no tensor {missing[0]}; the checkpoint is incomplete")


def cast(tensors: Tensors, dtype: torch.dtype | None) -> Tensors:
    for name, tensor in tensors:
        yield name, tensor if dtype is None else tensor.to(dtype)


LAYER = re.compile(r"layers\.(\d+)\.(.+)")


def layer_groups(tensors: Tensors) -> Iterator[tuple[int | str, dict[str, torch.Tensor]]]:
    """Group the stream by layer: (layer index, {name within the layer: tensor}); the tensors outside
    layers come one by one as (their name, {their name: tensor})."""
    index, group = None, {}
    for name, tensor in tensors:
        m = LAYER.fullmatch(name)
        if m and int(m.group(1)) == index:
            group[m.group(2)] = tensor
            continue
        if group:
            yield index, group
        index, group = (int(m.group(1)), {m.group(2): tensor}) if m else (None, {})
        if not m:
            yield name, {name: tensor}
    if group:
        yield index, group


def hf_side_files(folder: Path) -> dict[str, Path]:
    """The non-weight files of a Hugging Face folder (tokenizer, config.json, generation_config.json, ...)."""
    return {
        p.name: p
        for p in sorted(folder.iterdir())
        if p.is_file()
        and not p.name.startswith(".")
        and not p.name.endswith(WEIGHT_SUFFIXES)
        and p.name not in WEIGHT_INDEXES
    }


def tokenizer_files(path: Path | None) -> dict[str, Path]:
    """The files of a tokenizer a checkpoint names: a SentencePiece .model or a Hugging Face tokenizer folder."""
    if path is None or not path.exists():
        return {}
    if path.is_file():
        return {"tokenizer.model" if path.suffix == ".model" else path.name: path}
    return {k: v for k, v in hf_side_files(path).items() if k != "config.json"}


def tokenizer_path(folder: Path, files, tokenizer_type: str | None = None) -> Path | None:
    """What --tokenizer-model should name for the tokenizer carried in ``folder`` (``files``: the names there): the
    Hugging Face tokenizer when there is one, unless the recorded type says the model was trained on the
    SentencePiece file beside it."""
    sentencepiece = tokenizer_type in ("Llama2Tokenizer", "SentencePieceTokenizer")
    if "tokenizer.json" in files and not (sentencepiece and "tokenizer.model" in files):
        return folder
    if "tokenizer.model" in files:
        return folder / "tokenizer.model"
    return None
