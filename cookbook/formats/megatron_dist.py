"""Megatron-LM's distributed checkpoints (``--ckpt-format torch_dist``) read and written one layer at a time.

    SAVE/
      latest_checkpointed_iteration.txt       "1"
      iter_0000001/
        metadata.json        {"sharded_backend": "torch_dist", ...}: marks the folder as megatron-core's
        common.pt            torch.save of what is not sharded: args, checkpoint_version, iteration, ...
        .metadata            torch.distributed.checkpoint's index: each global tensor's shape, dtype and chunks
        __0_0.distcp, ...    the chunks, each a torch.save record at an offset of a file
      hf/                    tokenizer (and config.json) carried for the way back

Whatever TP/PP (or virtual stages) the run used, megatron-core stores *global* tensors: every rank saved
its shard as one chunk at its offset. The keys are those of ``GPTModel.sharded_state_dict()``:

- per-layer tensors stacked along a leading layer axis: ``decoder.layers.self_attention.linear_qkv.weight``
  is [num_layers, (heads + 2 groups) * head_dim, hidden], chunk (layer, TP shard); runs with
  non-homogeneous layers (or ``singleton_local_shards``) store one key per layer, ``decoder.layers.N.…``;
- the norms under TransformerEngine's names (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``)
  for both layer specs (the local spec maps its own names to them), so both read and write alike;
- ``linear_fc1`` is [gate; up] globally: megatron-core's SwiGLU factory stores TP rank r's gate_r at chunk r
  and its up_r at chunk TP + r (or gate and up as ``linear_fc1.weight_w`` / ``_v`` with singleton_local_shards);
- embedding and output layer padded as Megatron-LM pads the vocabulary (it loads them with any padding);
- ``*._extra_state/shard_L_N`` (pickled module state), ``rng_state`` and ``optimizer.*``: not the model's
  weights; read past (the pickles are never unpickled) and reported.

Reading asks DCP for one layer's regions at a time (a layer of each stacked tensor, the vocabulary's rows of the
embedding), so memory stays at about one layer. Writing lays out each layer's chunks as Megatron-LM would have
saved them at TP ``--tp`` (a run at that TP reads exactly its chunk), one file per layer, and the index last.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import re
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import filesystem
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from cookbook.errors import CookbookError
from cookbook.formats import megatron, pickles
from cookbook.formats.stream import Checkpoint, Tensors, expected_shapes, layer_groups
from cookbook.model.config import ModelConfig

CONFIG = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
COMMON = "common.pt"
INDEX = ".metadata"
LAYERS = "decoder.layers."
# what we write for each role (both layer specs' sharded names); every name megatron.LAYER_KEYS lists is read
NAMES = {role: megatron.TE_NAMES.get(role, names[0]) for role, names in megatron.LAYER_KEYS.items()}
# modules whose _extra_state GPTModel.sharded_state_dict() holds, one object per layer, for both layer specs
EXTRA_STATE = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2")
# megatron-core's sharded_state_dict flags (content_metadata) that give the layout we write
CONTENT = {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
PER_LAYER = re.compile(r"(\d+)\.(.+)")


@dataclasses.dataclass
class Region:
    """Part of a global tensor: ``layer`` along a stacked tensor's leading axis (None for unstacked), then
    ``rows`` of the first of the remaining dimensions (None: all)."""

    fqn: str
    shape: tuple[int, ...]  # without the layer axis
    layer: int | None = None
    rows: tuple[int, int] | None = None

    def chunk(self) -> ChunkStorageMetadata:
        lo, hi = self.rows or (0, self.shape[0])
        offsets, sizes = (lo, *[0] * (len(self.shape) - 1)), (hi - lo, *self.shape[1:])
        if self.layer is not None:
            offsets, sizes = (self.layer, *offsets), (1, *sizes)
        return ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))


# --------------------------------------------------------------------------- reading


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CookbookError(f"cannot read {path}: {e}") from e


def _common(it_dir: Path) -> dict:
    path = it_dir / COMMON
    if not path.is_file():
        raise CookbookError(
            f"{it_dir} has no {COMMON}; the checkpoint is incomplete (or not a Megatron-LM torch_dist checkpoint)"
        )
    common = pickles.load_structure(path)[0]
    if not isinstance(common, dict) or "args" not in common:
        raise CookbookError(f"{path} holds no 'args'; it is not a Megatron-LM checkpoint")
    if float(common.get("checkpoint_version", 3.0)) < 2.0:
        raise CookbookError(
            f"{path} has checkpoint_version {common['checkpoint_version']}; versions before 2.0 are not supported"
        )
    return common


def _roles(
    metadata: Metadata, num_layers: int, where: str
) -> tuple[dict[str, Region], dict[int, dict[str, Region]], list[str]]:
    """The checkpoint's keys -> ({top role: region}, {layer: {role: region}}, the note on what is not the model)."""
    top_names = {n: role for role, names in megatron.TOP_KEYS.items() for n in names}
    layer_names = {n: role for role, names in megatron.LAYER_KEYS.items() for n in names}
    layer_names.update({megatron.LAYER_KEYS["fc1"][0] + "_w": "gate", megatron.LAYER_KEYS["fc1"][0] + "_v": "up"})
    top, layers, optimizer, objects = {}, {}, [], set()
    for key, md in metadata.state_dict_metadata.items():
        if key.startswith("optimizer"):
            if isinstance(md, TensorStorageMetadata):
                optimizer.append(torch.empty(md.size, dtype=md.properties.dtype, device="meta"))
            continue
        if isinstance(md, BytesStorageMetadata):  # pickled objects: TE extra state, RNG state, ...
            if "._extra_state" not in key:
                objects.add({"rng_state": "RNG state"}.get(key.split("/")[0], key.split("/")[0]))
            continue
        shape = tuple(md.size)
        if key in top_names:
            top[top_names[key]] = Region(key, shape)
            continue
        name = key[len(LAYERS) :] if key.startswith(LAYERS) else None
        m = PER_LAYER.fullmatch(name or "")
        role = layer_names.get(m.group(2) if m else name)
        if role is not None and m:
            layers.setdefault(int(m.group(1)), {})[role] = Region(key, shape)
        elif role is not None:  # stacked along the layer axis
            if len(shape) < 2 or shape[0] != num_layers:
                raise CookbookError(
                    f"{where}: {key} has shape {shape}, not [{num_layers} layers, ...] as args.num_layers says; "
                    "the args do not match the weights"
                )
            for i in range(num_layers):
                layers.setdefault(i, {})[role] = Region(key, shape[1:], layer=i)
        elif ".experts." in key or ".router." in key or "shared_expert" in key:
            raise CookbookError(
                f"{where} holds {key}: a mixture-of-experts model; cookbook converts dense Llama-family models only"
            )
        elif key.endswith(".bias"):
            raise CookbookError(f"{where} holds {key}: biases on linear layers, which cookbook's model does not have")
        else:
            raise CookbookError(f"{where} holds {key}, which is not part of a Llama-family GPT model")
    for i, layer in layers.items():  # [gate; up] -> two regions, so reading never concatenates
        if "fc1" in layer:
            fc1 = layer.pop("fc1")
            half = fc1.shape[0] // 2
            layer["gate"] = dataclasses.replace(fc1, rows=(0, half))
            layer["up"] = dataclasses.replace(fc1, rows=(half, 2 * half))
    return top, layers, megatron.left_behind(where, optimizer, objects)


def _check(top: dict[str, Region], layers: dict[int, dict[str, Region]], cfg: ModelConfig, where: str) -> None:
    """Every tensor the model needs is there with the shape the args imply."""
    h, d, ffn = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * d
    shapes = {
        "input_norm": (h,),
        "mlp_norm": (h,),
        "final_norm": (h,),
        "qkv": (qkv, h),
        "qkv_bias": (qkv,),
        "proj": (h, cfg.num_heads * d),
        "gate": (ffn, h),
        "up": (ffn, h),
        "fc2": (h, ffn),
    }
    if sorted(layers) != list(range(cfg.num_layers)):
        raise CookbookError(
            f"{where} holds layers {sorted(layers)[:3]}...{sorted(layers)[-1:]} but args.num_layers is {cfg.num_layers}"
            if layers
            else f"{where} holds no transformer layers"
        )
    needed = {"input_norm", "qkv", "proj", "mlp_norm", "gate", "up", "fc2"} | ({"qkv_bias"} if cfg.qkv_bias else set())
    for i, layer in layers.items():
        if not needed <= layer.keys():
            raise CookbookError(
                f"{where} lacks {', '.join(sorted(needed - layer.keys()))} of layer {i}; the checkpoint is incomplete"
            )
    for role in ("embedding", "final_norm") + (() if cfg.tie_embeddings else ("output",)):
        if role not in top:
            raise CookbookError(f"{where} has no {megatron.TOP_KEYS[role][0]}; the checkpoint is incomplete")
    for role, region in [*top.items(), *(item for layer in layers.values() for item in layer.items())]:
        shape = region.shape if region.rows is None else (region.rows[1] - region.rows[0], *region.shape[1:])
        ok = (len(shape) == 2 and shape[1] == h) if role in ("embedding", "output") else shape == shapes[role]
        if not ok:
            raise CookbookError(
                f"{where}: {region.fqn} has shape {shape}, which does not match the args (hidden {h}, heads "
                f"{cfg.num_heads}, groups {cfg.num_kv_heads}, head_dim {d}, FFN {ffn}); the args do not match the weights"
            )


def _check_files(it_dir: Path, metadata: Metadata) -> None:
    """Every record the index names lies inside its file: a missing or truncated .distcp is refused before anything
    is written (whichever part it cuts short: a copy cut short is not to be trusted)."""
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        path = it_dir / name
        if not path.is_file():
            raise CookbookError(f"{it_dir} lacks {name}; the checkpoint is incomplete")
        if path.stat().st_size < end:
            raise CookbookError(f"{path} is truncated ({path.stat().st_size} of {end} bytes)")


class _Reader(filesystem.FileSystemReader):
    """DCP's file reader with the index we unpickled safely (``pickles.read_dcp_metadata``)."""

    def __init__(self, path: Path, metadata: Metadata):
        super().__init__(str(path))
        self.metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        return self.metadata


class _RegionPlanner(DefaultLoadPlanner):
    """Loads rectangular regions of global tensors (DCP reads the overlapping part of each stored chunk)."""

    def __init__(self, regions: dict[str, Region]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.regions = regions

    def create_local_plan(self) -> LoadPlan:
        items = []
        for name, region in self.regions.items():
            stored = self.metadata.state_dict_metadata[region.fqn]
            for item in create_read_items_for_chunk_list(region.fqn, stored, [region.chunk()]):
                items.append(dataclasses.replace(item, dest_index=MetadataIndex(name)))
        return LoadPlan(items)

    def resolve_tensor(self, read_item):
        tensor = self.state_dict[read_item.dest_index.fqn]
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            tensor = tensor.narrow(dim, offset, length)
        return tensor


def _load(it_dir: Path, metadata: Metadata, regions: dict[str, Region]) -> dict[str, torch.Tensor]:
    out = {}
    for name, region in regions.items():
        chunk = region.chunk()
        out[name] = torch.empty(tuple(chunk.sizes), dtype=metadata.state_dict_metadata[region.fqn].properties.dtype)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(out, storage_reader=_Reader(it_dir, metadata), planner=_RegionPlanner(regions), no_dist=True)
    except (CheckpointException, RuntimeError, OSError, ValueError, EOFError) as e:
        first = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise CookbookError(
            f"cannot read {', '.join(sorted({r.fqn for r in regions.values()}))[:200]} from {it_dir}: {first}"
        ) from e
    return {name: t[0] if regions[name].layer is not None else t for name, t in out.items()}


def read(path: Path, it_dir: Path, iteration: int) -> Checkpoint:
    """The model in a torch_dist iteration folder (``path``: what --load-dir named, for its hf/ folder)."""
    config = _json(it_dir / megatron.DIST_MARKER)
    if config.get("sharded_backend") != "torch_dist":
        raise CookbookError(
            f"{it_dir / megatron.DIST_MARKER} names the {config.get('sharded_backend')!r} backend; "
            "cookbook reads torch_dist (Megatron-LM's --ckpt-format torch_dist)"
        )
    common = _common(it_dir)
    args, where = common["args"], str(it_dir)
    if not (it_dir / INDEX).is_file():
        raise CookbookError(f"{it_dir} has no {INDEX}; the checkpoint is incomplete")
    metadata = pickles.read_dcp_metadata(it_dir / INDEX)
    num_layers = megatron._arg(args, "num_layers")
    if not isinstance(num_layers, int):
        raise CookbookError(f"{it_dir / COMMON}: args lacks num_layers; is it a Megatron-LM GPT checkpoint?")
    top, layers, notes = _roles(metadata, num_layers, where)
    if "embedding" not in top:
        raise CookbookError(
            f"{where} has no {megatron.TOP_KEYS['embedding'][0]}; the checkpoint is incomplete or not a GPT model"
        )
    hf_files, tokenizer = megatron.side_files(path, args, notes)
    vocab = megatron.vocabulary(args, top["embedding"].shape[0], tokenizer, where, notes)
    cfg = megatron.model_config(args, vocab, any("qkv_bias" in layer for layer in layers.values()), where)
    _check(top, layers, cfg, where)
    for role in ("embedding", "output"):
        if role in top:
            top[role].rows = (0, cfg.vocab_size)
    if cfg.tie_embeddings and "output" in top:
        raise CookbookError(
            f"{where} holds {top['output'].fqn} but its args tie the embeddings to the output layer; "
            "the args do not match the weights"
        )
    _check_files(it_dir, metadata)
    dtype = {
        fqn: md.properties.dtype
        for fqn, md in metadata.state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata)
    }
    role_dtypes = {role: dtype[region.fqn] for role, region in [*top.items(), *layers[0].items()]}
    role_dtypes["fc1"] = role_dtypes["gate"]
    dtypes = {
        name: role_dtypes[megatron.SOURCE_ROLE[name.split(".", 2)[2] if name.startswith("layers.") else name]]
        for name in expected_shapes(cfg)
    }

    def tensors() -> Tensors:
        yield "tok_embeddings.weight", _load(it_dir, metadata, {"x": top["embedding"]})["x"]
        for i in range(cfg.num_layers):
            yield from _layer_tensors(i, _load(it_dir, metadata, layers[i]), cfg)
        yield "norm.weight", _load(it_dir, metadata, {"x": top["final_norm"]})["x"]
        if not cfg.tie_embeddings:
            yield "output.weight", _load(it_dir, metadata, {"x": top["output"]})["x"]

    tp, pp = (megatron._arg(args, k) or 1 for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size"))
    return Checkpoint(
        cfg,
        tensors,
        dtypes,
        iteration=iteration,
        hf_files=hf_files,
        notes=notes,
        description=f"Megatron-LM torch_dist iteration {iteration} (saved at TP {tp}, PP {pp})",
    )


def _layer_tensors(i: int, got: dict[str, torch.Tensor], cfg: ModelConfig) -> Tensors:
    p = f"layers.{i}."
    q, k, v = megatron.split_qkv(got.pop("qkv"), cfg)
    bias = megatron.split_qkv(got.pop("qkv_bias"), cfg) if cfg.qkv_bias else None
    yield p + "attention_norm.weight", got.pop("input_norm")
    for j, (name, w) in enumerate((("wq", q), ("wk", k), ("wv", v))):
        yield p + f"attention.{name}.weight", w.contiguous()
        if bias is not None:
            yield p + f"attention.{name}.bias", bias[j].contiguous()
    del q, k, v
    yield p + "attention.wo.weight", got.pop("proj")
    yield p + "mlp_norm.weight", got.pop("mlp_norm")
    yield p + "mlp.w_gate.weight", got.pop("gate")
    yield p + "mlp.w_up.weight", got.pop("up")
    yield p + "mlp.w_down.weight", got.pop("fc2")


# --------------------------------------------------------------------------- writing


class _ChunkWriter:
    """Chunks of global tensors written as DCP writes them (each a torch.save record at an offset of a
    ``__0_N.distcp`` file), and the ``.metadata`` index that names them, written last."""

    def __init__(self, folder: Path):
        self.folder, self.count, self.f, self.name = folder, 0, None, ""
        self.index: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
        self.storage: dict[MetadataIndex, filesystem._StorageInfo] = {}
        self.files: list[Path] = []

    def next_file(self) -> None:
        self.close_file()
        self.name = f"__0_{self.count}.distcp"
        self.count += 1
        self.files.append(self.folder / self.name)
        self.f = open(self.files[-1], "wb")

    def close_file(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None

    def _record(self, key: MetadataIndex, save) -> None:
        start = self.f.tell()
        save(self.f)
        self.storage[key] = filesystem._StorageInfo(self.name, start, self.f.tell() - start)

    def tensor(self, fqn: str, size: tuple[int, ...], offsets: tuple[int, ...], chunk: torch.Tensor) -> None:
        """One chunk of the global tensor ``fqn`` (of ``size``) at ``offsets``."""
        if chunk.untyped_storage().nbytes() != chunk.nbytes:  # torch.save writes a view's whole storage
            chunk = chunk.clone()
        md = self.index.setdefault(
            fqn, TensorStorageMetadata(TensorProperties(dtype=chunk.dtype), torch.Size(size), [])
        )
        md.chunks.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=chunk.shape))
        self._record(MetadataIndex(fqn, torch.Size(offsets)), lambda f: torch.save(chunk, f))

    def rows(
        self,
        fqn: str,
        size: tuple[int, ...],
        shards: list[torch.Tensor],
        dim: int,
        layer: int | None = None,
        start: int = 0,
    ) -> None:
        """TP shards of ``fqn`` split along ``dim`` (from ``start``), stacked at ``layer`` when given."""
        lead = () if layer is None else (layer,)
        for shard in shards:
            offsets = lead + tuple(start if d == dim else 0 for d in range(shard.ndim))
            self.tensor(fqn, size, offsets, shard if layer is None else shard.unsqueeze(0))
            start += shard.shape[dim]

    def obj(self, fqn: str, value) -> None:
        """A pickled object (a ShardedObject's data, as megatron-core saves it: torch.save of a one-item list)."""
        self.index[fqn] = BytesStorageMetadata()
        buf = io.BytesIO()
        torch.save([value], buf)
        self._record(MetadataIndex(fqn), lambda f: f.write(buf.getvalue()))

    def close(self) -> None:
        self.close_file()
        metadata = Metadata(state_dict_metadata=self.index, storage_data=self.storage)
        if hasattr(metadata, "version") and hasattr(filesystem, "CURRENT_DCP_VERSION"):
            metadata.version = filesystem.CURRENT_DCP_VERSION
        with open(self.folder / INDEX, "wb") as f:
            pickle.dump(metadata, f)


def write(it_dir: Path, cfg: ModelConfig, args, tensors: Tensors, tp: int) -> list[Path]:
    """An iteration folder Megatron-LM loads with --ckpt-format torch_dist, chunks cut for TP ``tp``."""
    it_dir.mkdir(parents=True)
    h, rows = cfg.hidden_size, args.padded_vocab_size
    out = _ChunkWriter(it_dir)
    try:
        for key, group in layer_groups(tensors):
            out.next_file()
            if key == "tok_embeddings.weight":
                out.rows(megatron.TOP_KEYS["embedding"][0], (rows, h), megatron.padded_shards(group[key], rows, tp), 0)
            elif key == "norm.weight":
                out.tensor(megatron.TOP_KEYS["final_norm"][0], (h,), (0,), group[key])
            elif key == "output.weight":
                out.rows(megatron.TOP_KEYS["output"][0], (rows, h), megatron.padded_shards(group[key], rows, tp), 0)
            else:
                _write_layer(out, key, group, cfg, tp)
            del group  # before the next layer is read: one layer in memory, not two
        out.close()
    finally:
        out.close_file()
    common = {
        "args": args,
        "checkpoint_version": megatron.CHECKPOINT_VERSION,
        "iteration": args.iteration,
        "num_floating_point_operations_so_far": 0,
        "content_metadata": dict(CONTENT),
    }
    torch.save(common, it_dir / COMMON)
    (it_dir / megatron.DIST_MARKER).write_text(json.dumps(CONFIG))
    return out.files


def _write_layer(out: _ChunkWriter, i: int, group: dict, cfg: ModelConfig, tp: int) -> None:
    """Layer ``i``'s chunks at its index along the stacked tensors, TP shards as GPTModel saves them."""
    h, L, ffn = cfg.hidden_size, cfg.num_layers, cfg.intermediate_size
    q = cfg.num_heads * cfg.head_dim

    def name(role: str) -> str:
        return LAYERS + NAMES[role]

    out.tensor(name("input_norm"), (L, h), (i, 0), group["attention_norm.weight"][None])
    qkv = megatron.fuse_qkv(
        group["attention.wq.weight"], group["attention.wk.weight"], group["attention.wv.weight"], cfg
    )
    out.rows(name("qkv"), (L, *qkv.shape), list(qkv.chunk(tp)), 0, layer=i)
    if cfg.qkv_bias:
        bias = megatron.fuse_qkv(
            group["attention.wq.bias"], group["attention.wk.bias"], group["attention.wv.bias"], cfg
        )
        out.rows(name("qkv_bias"), (L, *bias.shape), list(bias.chunk(tp)), 0, layer=i)
    del qkv
    out.rows(name("proj"), (L, h, q), list(group["attention.wo.weight"].chunk(tp, dim=1)), 1, layer=i)
    out.tensor(name("mlp_norm"), (L, h), (i, 0), group["mlp_norm.weight"][None])
    fc1 = (L, 2 * ffn, h)  # [gate; up]: TP rank r's gate at chunk r, its up at chunk TP + r
    out.rows(name("fc1"), fc1, list(group["mlp.w_gate.weight"].chunk(tp)), 0, layer=i)
    out.rows(name("fc1"), fc1, list(group["mlp.w_up.weight"].chunk(tp)), 0, layer=i, start=ffn)
    out.rows(name("fc2"), (L, h, ffn), list(group["mlp.w_down.weight"].chunk(tp, dim=1)), 1, layer=i)
    for module in EXTRA_STATE:
        out.obj(f"{LAYERS}{module}._extra_state/shard_{i}_{L}", None)
