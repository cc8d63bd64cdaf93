"""cookbook checkpoints (DCP) read and written one layer at a time, for conversion.

A converted checkpoint is a save like the Trainer's, without optimizer state::

    SAVE/
      latest                  "step_000000" (the source's step or iteration)
      step_000000/
        .metadata, *.distcp   {"model": {our parameter names}} in torch.distributed.checkpoint, one
                              file per tensor
        config.toml           [model] and [data] (tokenizer_model: the tokenizer in hf/ below, relative)
        train_state.json      step, and where the weights came from
        hf/                   the Hugging Face side files: tokenizer, and config.json /
                              generation_config.json when the source was a Hugging Face model;
                              cookbook -> hf writes them back

``cookbook pretrain --load SAVE --finetune`` trains from it; eval and generate load it as they are. A run
started from it names ``hf/`` as its tokenizer, so its saves convert back with the same side files
(config.json brought up to date: an extended model's ``rope_scaling``, a pruned model's shapes).

Reading loads one layer's tensors per ``dcp.load`` call (DCP reads only the requested byte ranges).
Writing calls ``dcp.save`` once with meta tensors for the plan and a planner whose ``resolve_data``
pulls each tensor from the stream when DCP writes it, in the stream's order, one file per tensor (DCP's
writer holds every tensor of a file until the file is closed): one layer in memory.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from cookbook.engine.checkpoint import (
    SIDE_DIR,
    commit_save,
    find_checkpoint,
    read_config,
    read_metadata,
    read_state,
    save_paths,
    side_files,
    write_save_files,
)
from cookbook.engine.config import build_config
from cookbook.errors import CookbookError
from cookbook.formats.stream import (
    Checkpoint,
    Tensors,
    expected_shapes,
    hf_side_files,
    layer_names,
    tokenizer_path,
)
from cookbook.model.config import ModelConfig

HF_DIR = SIDE_DIR


def _groups(cfg: ModelConfig) -> list[list[str]]:
    """The stream's names in the batches read together: the embedding, each layer, the rest."""
    names = list(expected_shapes(cfg))
    layers = [layer_names(cfg, i) for i in range(cfg.num_layers)]
    inside = {n for group in layers for n in group}
    return [[names[0]]] + layers + [[n for n in names[1:] if n not in inside]]


def read(path: Path) -> Checkpoint:
    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise CookbookError(f"{path} holds no cookbook checkpoint (no 'latest' file and no .metadata/config.toml)")
    sections = read_config(ckpt)
    if "model" not in sections:
        raise CookbookError(f"{ckpt / 'config.toml'} has no [model] section")
    cfg = build_config({"model": sections["model"]}).model
    metadata = read_metadata(ckpt).state_dict_metadata
    shapes = expected_shapes(cfg)
    dtypes = {}
    for name, shape in shapes.items():
        md = metadata.get("model." + name)
        if md is None:
            raise CookbookError(f"{ckpt} has no tensor {name}; the checkpoint does not match its config.toml")
        if tuple(md.size) != shape:
            raise CookbookError(f"{ckpt}: {name} has shape {tuple(md.size)} but config.toml implies {shape}")
        dtypes[name] = md.properties.dtype
    step = 0
    if (ckpt / "train_state.json").is_file():
        step = int(json.loads((ckpt / "train_state.json").read_text()).get("step", 0))
    if (ckpt / HF_DIR).is_dir():
        hf_files = hf_side_files(ckpt / HF_DIR)
    else:  # a save of an earlier version: the tokenizer it names, where that is here
        hf_files = side_files(sections.get("data", {}).get("tokenizer_model"))
    notes = [] if hf_files else [f"{ckpt} names no tokenizer that exists here; the output carries none"]

    def tensors() -> Tensors:
        for group in _groups(cfg):
            state = {"model": {n: torch.empty(shapes[n], dtype=dtypes[n]) for n in group}}
            read_state(state, ckpt, single_process=True)
            yield from state["model"].items()

    return Checkpoint(
        cfg,
        tensors,
        dtypes,
        iteration=step,
        hf_files=hf_files,
        notes=notes,
        tokenizer_type=sections.get("data", {}).get("tokenizer_type"),
        description=f"cookbook {ckpt.name}",
    )


class _StreamPlanner(DefaultSavePlanner):
    """Hands DCP each tensor from the stream when DCP writes it. Tensors that arrive before they are
    asked for wait in ``pending`` (none do when the plan follows the stream's order)."""

    def __init__(self, tensors: Tensors, aliases: dict[str, str]):
        super().__init__()
        self.stream, self.aliases = iter(tensors), aliases
        self.pending: dict[str, torch.Tensor] = {}
        self.uses: dict[str, int] = {}
        self.error: BaseException | None = None

    def resolve_data(self, write_item):
        try:
            name = write_item.index.fqn.removeprefix("model.")
            name = self.aliases.get(name, name)
            while name not in self.pending:
                arrived, tensor = next(self.stream)
                self.pending[arrived] = tensor
                self.uses[arrived] = 1 + sum(1 for v in self.aliases.values() if v == arrived)
            self.uses[name] -= 1
            return self.pending[name] if self.uses[name] else self.pending.pop(name)
        except BaseException as e:
            self.error = e
            raise


def write(folder: Path, final: Path, ckpt: Checkpoint, tensors: Tensors, dtypes: dict[str, torch.dtype]) -> Path:
    """A save under ``folder`` (renamed to ``final`` by the caller): DCP shards, config.toml, train_state.json, hf/."""
    cfg, step = ckpt.config, ckpt.iteration
    tmp, step_dir = save_paths(folder, step)
    plan = {}
    for name, shape in expected_shapes(cfg).items():
        plan[name] = torch.empty(shape, dtype=dtypes[name], device="meta")
        if name == "tok_embeddings.weight" and cfg.tie_embeddings:  # the Trainer's saves hold both names
            plan["output.weight"] = plan[name]
    planner = _StreamPlanner(tensors, {"output.weight": "tok_embeddings.weight"} if cfg.tie_embeddings else {})
    # one file per tensor: DCP's writer keeps every tensor of a file alive until the file is complete
    writer = dcp.FileSystemWriter(str(tmp), single_file_per_rank=False, thread_count=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.save({"model": plan}, storage_writer=writer, planner=planner, no_dist=True)
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if planner.error is not None and planner.error is not e:
            raise planner.error from None
        raise
    if planner.pending:
        raise CookbookError(f"internal error: tensors {sorted(planner.pending)[:3]} were never written")
    files = {name: path.read_bytes() for name, path in ckpt.hf_files.items()}
    tok = tokenizer_path(Path(HF_DIR), files, ckpt.tokenizer_type)
    data = {}
    if tok is not None:  # the type it was trained with, else the one its file says
        sentencepiece = ckpt.tokenizer_type in ("Llama2Tokenizer", "SentencePieceTokenizer")
        data["tokenizer_type"] = (
            (ckpt.tokenizer_type if sentencepiece else "Llama2Tokenizer")
            if tok.suffix == ".model"
            else "HuggingFaceTokenizer"
        )
    model = {k: v for k, v in cfg.to_dict().items() if v is not None}
    state = {"step": step, "consumed_samples": 0, "converted_from": ckpt.description}
    write_save_files(tmp, {"model": model, "data": data}, state, files)
    return commit_save(tmp, step_dir)
