"""Helpers for the conversion tests: tiny Hugging Face models saved by transformers itself, reading
safetensors folders, and reassembling Megatron-LM shards the way REFERENCE.md describes them."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

VOCAB = 100  # not a multiple of 128: Megatron pads it

# model kinds, as transformers' config classes take them
KINDS = {
    "llama-gqa": ("llama", dict(num_key_value_heads=2)),
    "llama-mha-tied": ("llama", dict(tie_word_embeddings=True)),
    "llama3-rope": (
        "llama",
        dict(
            num_key_value_heads=2,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            max_position_embeddings=16384,
        ),
    ),
    "linear-rope": ("llama", dict(num_key_value_heads=4, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen2-bias": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "mistral": ("mistral", dict(num_key_value_heads=2, sliding_window=None)),
}
SHAPES = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=96,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)


def make_hf(folder: Path, kind: str, tokenizer: Path | None = None, seed: int = 0, **overrides) -> Path:
    """A tiny random model of ``kind`` saved by transformers' save_pretrained, with tokenizer files copied in.
    Norm weights and q/k/v biases are random too, so a swapped tensor cannot go unnoticed."""
    import transformers

    model_type, extra = KINDS[kind]
    conf_cls = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
    }[model_type]
    model_cls = {
        "llama": transformers.LlamaForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
        "mistral": transformers.MistralForCausalLM,
    }[model_type]
    torch.manual_seed(seed)
    model = model_cls(conf_cls(**{**SHAPES, **extra, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "bias")):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    if tokenizer is not None:
        for f in tokenizer.iterdir() if tokenizer.is_dir() else [tokenizer]:
            shutil.copyfile(f, folder / ("tokenizer.model" if f.suffix == ".model" else f.name))
    return Path(folder)


def hf_model(folder: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    out = {}
    for f in files:
        out.update(load_file(folder / f))
    return out


def side_files(folder: Path) -> dict[str, bytes]:
    """Every non-weight file's bytes (config.json, tokenizer files, generation_config.json)."""
    return {
        p.name: p.read_bytes()
        for p in folder.iterdir()
        if p.is_file() and not p.name.endswith(".safetensors") and p.name != "model.safetensors.index.json"
    }


# --------------------------------------------------------------------------- Megatron-LM files


def load_megatron(path: Path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, weights_only=True)


def megatron_files(root: Path) -> dict[tuple[int, int], dict]:
    """{(tp rank, pp rank): the loaded model_optim_rng.pt} of the iteration ``latest`` names."""
    it = int((root / "latest_checkpointed_iteration.txt").read_text())
    out = {}
    for d in (root / f"iter_{it:07d}").iterdir():
        parts = d.name.split("_")
        out[int(parts[2]), int(parts[3]) if len(parts) > 3 else 0] = load_megatron(d / "model_optim_rng.pt")
    return out


def reassemble(files: dict[tuple[int, int], dict], ffn: int) -> dict[str, torch.Tensor]:
    """TP/PP shards -> the TP=1, PP=1 state dict (global layer numbers), per REFERENCE.md: QKV and the
    embedding/output by rows, linear_proj/linear_fc2 by columns, linear_fc1 as cat([gate_r, up_r]) per
    rank, norms replicated (and checked to be equal), layers renumbered from each stage's offset."""
    tp = 1 + max(t for t, _ in files)
    pp = 1 + max(s for _, s in files)
    layers_per_stage = [
        len({k.split(".")[2] for k in files[0, s]["model"] if k.startswith("decoder.layers.")}) for s in range(pp)
    ]
    out = {}
    for s in range(pp):
        offset = sum(layers_per_stage[:s])
        for key in files[0, s]["model"]:
            shards = [files[t, s]["model"][key] for t in range(tp)]
            name = key
            if key.startswith("decoder.layers."):
                parts = key.split(".")
                parts[2] = str(int(parts[2]) + offset)
                name = ".".join(parts)
            if shards[0] is None:
                out[name] = None
            elif key.endswith(("linear_proj.weight", "linear_fc2.weight")):
                out[name] = torch.cat(shards, dim=1)
            elif key.endswith("linear_fc1.weight"):
                half = ffn // tp
                out[name] = torch.cat([r[:half] for r in shards] + [r[half:] for r in shards])
            elif key.endswith(
                ("linear_qkv.weight", "linear_qkv.bias", "word_embeddings.weight", "output_layer.weight")
            ):
                out[name] = torch.cat(shards)
            else:  # norms: replicated
                assert all(torch.equal(shards[0], x) for x in shards), key
                out[name] = shards[0]
            if (
                name == "output_layer.weight"
                and s > 0
                and "embedding.word_embeddings.weight" in out
                and not files[0, 0]["args"].untie_embeddings_and_output_weights
            ):
                assert torch.equal(out[name], out["embedding.word_embeddings.weight"])  # the last stage's tied copy
                del out[name]
    return out


def dist_dir(root: Path) -> Path:
    """The iteration folder of a torch_dist checkpoint that ``latest_checkpointed_iteration.txt`` names."""
    return root / f"iter_{int((root / 'latest_checkpointed_iteration.txt').read_text()):07d}"


def dist_tensors(root: Path) -> dict[str, torch.Tensor]:
    """Every model tensor of a torch_dist checkpoint, global and whole (optimizer state left out)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    it_dir = dist_dir(root)
    metadata = dcp.FileSystemReader(str(it_dir)).read_metadata().state_dict_metadata
    out = {
        k: torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for k, md in metadata.items()
        if isinstance(md, TensorStorageMetadata) and not k.startswith("optimizer.")
    }
    dcp.load(out, checkpoint_id=str(it_dir), no_dist=True)
    return out


def dist_objects(root: Path) -> set[str]:
    """The keys of a torch_dist checkpoint's pickled objects (TransformerEngine extra state, RNG state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = dcp.FileSystemReader(str(dist_dir(root))).read_metadata().state_dict_metadata
    return {k for k, md in metadata.items() if isinstance(md, BytesStorageMetadata)}


def dist_common(root: Path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(dist_dir(root) / "common.pt", weights_only=True)
