"""Hugging Face Llama/Mistral/Qwen2 folders: names, config.json, and safetensors read and written one tensor at a time.

    FOLDER/
      config.json                       LlamaForCausalLM (Qwen2ForCausalLM when q/k/v have biases)
      model.safetensors                 or model-00001-of-0000N.safetensors + model.safetensors.index.json
      tokenizer.json, tokenizer_config.json, tokenizer.model, generation_config.json, ...   carried as they are

Our RoPE is HF's "rotate half", so q and k weights need no permutation: the mapping is names only.
A safetensors file is an 8-byte header length, a JSON header (name -> dtype, shape, byte range) and
the bytes; reading seeks to one tensor's bytes, writing lays out the headers from the config first
and then writes each tensor as it arrives, so neither holds more than one tensor.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

import torch

from cookbook.errors import CookbookError
from cookbook.formats import pickles
from cookbook.formats.hf_tokenizer import write_tokenizer_files
from cookbook.formats.stream import Checkpoint, Tensors, expected_shapes, hf_side_files
from cookbook.model.config import ModelConfig

_LAYER = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wq.bias": "self_attn.q_proj.bias",
    "attention.wk.bias": "self_attn.k_proj.bias",
    "attention.wv.bias": "self_attn.v_proj.bias",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.w_gate.weight": "mlp.gate_proj.weight",
    "mlp.w_up.weight": "mlp.up_proj.weight",
    "mlp.w_down.weight": "mlp.down_proj.weight",
}
_TOP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float64: "float64"}
DEFAULT_SHARD_BYTES = 5 * 1024**3  # save_pretrained's classic max_shard_size


def hf_name(name: str) -> str:
    """Our parameter name -> transformers' (LlamaForCausalLM / Qwen2ForCausalLM)."""
    if name in _TOP:
        return _TOP[name]
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if not m or m.group(2) not in _LAYER:
        raise KeyError(f"no Hugging Face name for {name}")
    return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}"


def hf_config(cfg: ModelConfig) -> dict:
    """config.json for transformers: LlamaForCausalLM, or Qwen2ForCausalLM when q/k/v have biases."""
    out = {
        "architectures": ["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"],
        "model_type": "qwen2" if cfg.qkv_bias else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "intermediate_size": cfg.intermediate_size,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu",
        "initializer_range": cfg.init_std,
        "attention_bias": False,
        "mlp_bias": False,
    }
    if cfg.rope_scaling:
        out["rope_scaling"] = dict(cfg.rope_scaling)
    return out


# --------------------------------------------------------------------------- config.json <-> ModelConfig


def rope_from_config(conf: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling or None) from transformers 4's rope_theta/rope_scaling or 5's rope_parameters."""
    params = conf.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", conf.get("rope_theta", 10000.0))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta, scaling = conf.get("rope_theta", 10000.0), conf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(theta), (dict(scaling) if scaling else None)


HF_INTEGERS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "head_dim",
    "max_position_embeddings",
)
HF_NUMBERS = ("rope_theta", "rms_norm_eps", "initializer_range")


def model_config(conf: dict, where: str) -> tuple[ModelConfig, list[str]]:
    """Our ModelConfig from a config.json, refusing what the model cannot represent; (config, notes)."""
    model_type = conf.get("model_type")
    if any(conf.get(k) for k in MOE_KEYS):
        raise CookbookError(
            f"{where} is a mixture-of-experts model ({model_type}); cookbook converts dense Llama-family models only"
        )
    if model_type not in ARCHITECTURES:
        raise CookbookError(
            f"{where} holds a {model_type!r} model; cookbook converts Llama-family models ({', '.join(ARCHITECTURES)})"
        )
    if conf.get("hidden_act", "silu") != "silu":
        raise CookbookError(f"{where} uses hidden_act {conf['hidden_act']!r}; cookbook's MLP is SwiGLU (silu)")
    if conf.get("mlp_bias") or (model_type != "qwen2" and conf.get("attention_bias")):
        raise CookbookError(
            f"{where} has biases on linear layers (attention_bias/mlp_bias); cookbook supports q/k/v biases only (Qwen2)"
        )
    notes = []
    window = conf.get("sliding_window") if (model_type == "mistral" or conf.get("use_sliding_window")) else None
    if window and window < conf.get("max_position_embeddings", 0):
        notes.append(
            f"{where} uses sliding-window attention ({window} tokens); cookbook attends over the whole context, "
            f"so outputs agree up to {window} tokens"
        )
    for key in HF_INTEGERS + HF_NUMBERS:
        value = conf.get(key)
        integer = key in HF_INTEGERS
        if value is not None and (isinstance(value, bool) or not isinstance(value, int if integer else (int, float))):
            raise CookbookError(f"{where}: {key} is {value!r}, not {'an integer' if integer else 'a number'}")
    for key in ("rope_scaling", "rope_parameters"):
        if conf.get(key) is not None and not isinstance(conf[key], dict):
            raise CookbookError(f"{where}: {key} is {conf[key]!r}, not an object")
    theta, scaling = rope_from_config(conf)
    try:
        cfg = ModelConfig(
            vocab_size=conf["vocab_size"],
            hidden_size=conf["hidden_size"],
            num_layers=conf["num_hidden_layers"],
            num_heads=conf["num_attention_heads"],
            num_kv_heads=conf.get("num_key_value_heads") or conf["num_attention_heads"],
            intermediate_size=conf["intermediate_size"],
            head_dim=conf.get("head_dim") or None,
            max_seq_len=conf.get("max_position_embeddings", 4096),
            rope_theta=theta,
            rope_scaling=scaling,
            norm_eps=conf.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(conf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2",
            init_std=conf.get("initializer_range", 0.02),
        )
    except KeyError as e:
        raise CookbookError(f"{where} lacks {e.args[0]!r}; is it a transformers config.json?") from None
    except CookbookError as e:
        raise CookbookError(f"{where}: {e}") from None
    return cfg, notes


def _no_none(d: dict | None) -> dict:
    return {k: v for k, v in (d or {}).items() if v is not None}


def config_json(cfg: ModelConfig, carried: dict | None, dtype: torch.dtype | None) -> dict:
    """config.json for ``cfg``: the carried one (from the Hugging Face source) with the fields the weights
    and our model define brought up to date, or a fresh one."""
    fresh = hf_config(cfg)
    if carried is None or (carried.get("model_type") == "qwen2") != cfg.qkv_bias:  # none, or another architecture's
        out = fresh
    else:
        out = dict(carried)
        for key in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "max_position_embeddings",
            "rms_norm_eps",
            "tie_word_embeddings",
        ):
            out[key] = fresh[key]
        if "head_dim" in out or cfg.head_dim * cfg.num_heads != cfg.hidden_size:
            out["head_dim"] = cfg.head_dim
        theta, scaling = rope_from_config(carried)
        if theta != cfg.rope_theta or _no_none(scaling) != _no_none(cfg.rope_scaling):
            if "rope_parameters" in out:
                out["rope_parameters"] = {
                    "rope_theta": cfg.rope_theta,
                    **(cfg.rope_scaling or {"rope_type": "default"}),
                }
            else:
                out["rope_theta"] = cfg.rope_theta
                out["rope_scaling"] = dict(cfg.rope_scaling) if cfg.rope_scaling else None
    if dtype in DTYPE_NAMES:
        keys = [k for k in ("torch_dtype", "dtype") if k in out] or ["torch_dtype"]
        for key in keys:
            out[key] = DTYPE_NAMES[dtype]
    return out


# --------------------------------------------------------------------------- safetensors


def read_header(path: Path) -> tuple[dict, int]:
    """(header without __metadata__, byte offset of the data), every entry checked against the file's size."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"its header length {n:,} exceeds the file's {size:,} bytes")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        header.pop("__metadata__", None)
        for name, entry in header.items():
            _check_entry(name, entry, size - 8 - n)
    except (OSError, struct.error, ValueError) as e:
        raise CookbookError(f"{path} is not a safetensors file, or is damaged ({e})") from e
    return header, 8 + n


def _counts(values) -> bool:
    return isinstance(values, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)


def _check_entry(name: str, entry, data_bytes: int) -> None:
    """A header entry names a known dtype, a shape and byte offsets that fit the shape and lie within the file."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise ValueError(f"the entry of {name} is not a tensor's")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not _counts(shape) or not _counts(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise ValueError(f"the entry of {name} has a bad shape or offsets")
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is not None and (offsets[1] - offsets[0]) != math.prod(shape) * torch.empty(0, dtype=dtype).element_size():
        raise ValueError(f"{name}'s bytes do not match its shape {shape} and dtype {entry['dtype']}")
    if offsets[1] > data_bytes:
        raise ValueError(f"{name} ends at byte {offsets[1]:,} of {data_bytes:,}: the file is truncated")


def read_tensor(f, entry: dict, data_start: int) -> torch.Tensor:
    begin, end = entry["data_offsets"]
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise CookbookError(f"{f.name} holds a tensor of dtype {entry['dtype']}, which cookbook does not convert")
    buf = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(data_start + begin)
    if f.readinto(buf.numpy()) != end - begin:
        raise CookbookError(f"{f.name} is truncated")
    return buf.view(dtype).reshape(entry["shape"])


def _safetensors_dtype(dtype: torch.dtype) -> str:
    return {v: k for k, v in SAFETENSORS_DTYPES.items()}[dtype]


class _SafetensorsFile:
    """One shard written in order: the header first (from the plan), then each tensor's bytes."""

    def __init__(self, path: Path, plan: list[tuple[str, tuple[int, ...], torch.dtype]]):
        header, offset = {}, 0
        for name, shape, dtype in plan:
            size = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
            header[name] = {
                "dtype": _safetensors_dtype(dtype),
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        header["__metadata__"] = {"format": "pt"}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(text)) + text)
        self.size = offset

    def write(self, tensor: torch.Tensor) -> None:
        self.f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)

    def close(self) -> None:
        self.f.close()


# --------------------------------------------------------------------------- reader and writer


def _weights(folder: Path) -> dict[str, Path]:
    """Tensor name -> the file holding it."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CookbookError(f"{index} is not a weight index ({e})") from e
            files = {name: folder / file for name, file in weight_map.items()}
            for path in set(files.values()):
                if not path.is_file():
                    raise CookbookError(f"{index} names {path.name}, which is missing")
            return files
    if (folder / "model.safetensors").is_file():
        return {name: folder / "model.safetensors" for name in read_header(folder / "model.safetensors")[0]}
    if (folder / "pytorch_model.bin").is_file():
        obj, _ = pickles.load_structure(folder / "pytorch_model.bin")
        return {name: folder / "pytorch_model.bin" for name in obj}
    raise CookbookError(f"{folder} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


class _Files:
    """Open weight files, read one tensor at a time (safetensors or torch pickles)."""

    def __init__(self):
        self.open: dict[Path, tuple] = {}

    def meta(self, path: Path) -> tuple:
        if path not in self.open:
            if path.suffix == ".safetensors":
                header, start = read_header(path)
                self.open[path] = ("safetensors", header, start, open(path, "rb"))
            else:
                obj, lazy = pickles.load_structure(path)
                self.open[path] = ("pickle", obj, lazy, open(path, "rb"))
        return self.open[path]

    def dtype(self, path: Path, name: str) -> torch.dtype:
        kind, table, *_ = self.meta(path)
        return SAFETENSORS_DTYPES.get(table[name]["dtype"], torch.uint8) if kind == "safetensors" else table[name].dtype

    def read(self, path: Path, name: str) -> torch.Tensor:
        kind, table, extra, f = self.meta(path)
        return read_tensor(f, table[name], extra) if kind == "safetensors" else pickles.materialize(table[name], f)

    def close(self) -> None:
        for *_, f in self.open.values():
            f.close()
        self.open.clear()


IGNORED = re.compile(r".*rotary_emb\.inv_freq$")


def read_config_json(folder: Path) -> dict:
    """A Hugging Face folder's config.json, refused in one line when it is missing or not a JSON object."""
    if not (folder / "config.json").is_file():
        raise CookbookError(f"{folder} has no config.json; --from hf needs a Hugging Face model folder")
    try:
        conf = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CookbookError(f"{folder / 'config.json'} is not valid JSON ({e})") from e
    if not isinstance(conf, dict):
        raise CookbookError(
            f"{folder / 'config.json'} holds a JSON {type(conf).__name__}, not an object; is it a transformers config.json?"
        )
    return conf


def read(folder: Path) -> Checkpoint:
    folder = Path(folder)
    conf = read_config_json(folder)
    cfg, notes = model_config(conf, str(folder / "config.json"))
    files = _weights(folder)
    names = {name: hf_name(name) for name in expected_shapes(cfg)}
    wanted = set(names.values()) | ({"lm_head.weight"} if cfg.tie_embeddings else set())
    unexpected = sorted(n for n in files if n not in wanted and not IGNORED.match(n))
    if unexpected:
        raise CookbookError(
            f"{folder} holds tensor {unexpected[0]}, which a {conf.get('model_type')} model with this config.json does not have"
        )
    missing = [n for n in names.values() if n not in files]
    if missing:
        raise CookbookError(
            f"{folder} has no tensor {missing[0]}; the checkpoint is incomplete or config.json does not match it"
        )
    reader = _Files()
    try:
        dtypes = {ours: reader.dtype(files[theirs], theirs) for ours, theirs in names.items()}
    finally:
        reader.close()

    def tensors() -> Tensors:
        opened = _Files()
        try:
            for ours, theirs in names.items():
                yield ours, opened.read(files[theirs], theirs)
        finally:
            opened.close()

    return Checkpoint(
        cfg,
        tensors,
        dtypes,
        hf_files=hf_side_files(folder),
        notes=notes,
        description=f"Hugging Face {conf.get('architectures', [conf['model_type']])[0]}",
    )


def write(
    folder: Path,
    ckpt: Checkpoint,
    tensors: Tensors,
    dtypes: dict[str, torch.dtype],
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> list[Path]:
    """Write a transformers-loadable folder; ``dtypes`` gives each tensor's dtype ahead of its bytes."""
    cfg = ckpt.config
    plan, shards, size = [], [[]], 0
    for name, shape in expected_shapes(cfg).items():
        nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtypes[name]).element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((hf_name(name), shape, dtypes[name]))
        plan.append(name)
        size += nbytes
    files = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    stream = iter(tensors)
    total = 0
    for file, shard in zip(files, shards):
        out = _SafetensorsFile(folder / file, shard)
        try:
            for theirs, shape, dtype in shard:
                name, tensor = next(stream)
                if hf_name(name) != theirs or tensor.dtype != dtype:
                    raise CookbookError(
                        f"internal error: {name} ({tensor.dtype}) arrived where {theirs} ({dtype}) was planned"
                    )
                out.write(tensor)
                del tensor  # before the next one is read
        finally:
            out.close()
        total += out.size
    if len(files) > 1:
        weight_map = {theirs: file for file, shard in zip(files, shards) for theirs, _, _ in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_side_files(folder, ckpt, dtypes["tok_embeddings.weight"])
    return [folder / f for f in files]


def write_side_files(folder: Path, ckpt: Checkpoint, dtype: torch.dtype) -> None:
    """config.json (the carried one, brought up to date), every other carried file byte for byte, and the
    tokenizer files transformers needs that were not carried (``hf_tokenizer.write_tokenizer_files``)."""
    carried = None
    if "config.json" in ckpt.hf_files:
        raw = ckpt.hf_files["config.json"].read_bytes()
        carried = json.loads(raw)
    conf = config_json(ckpt.config, carried, dtype)
    if carried is not None and conf == carried:
        (folder / "config.json").write_bytes(raw)
    else:
        (folder / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    for name, path in ckpt.hf_files.items():
        if name != "config.json":
            (folder / name).write_bytes(path.read_bytes())
    # what AutoTokenizer needs beside them: tokenizer.json and its config for a SentencePiece tokenizer.model
    ckpt.notes += write_tokenizer_files(folder, ckpt.hf_files, ckpt.tokenizer_type, ckpt.config.max_seq_len)
