"""cookbook checkpoints: one directory per save, complete or absent.

    SAVE/
      latest                  the name of the newest complete save ("step_000100")
      step_000100/
        .metadata, *.distcp   torch.distributed.checkpoint shards: model and optimizer state,
                              keyed by parameter name, so a save loads under any parallel layout
        config.toml           the resolved job config (model, data, optimizer, training, ...); its
                              [data] tokenizer_model names the tokenizer in hf/, relative to the save
        train_state.json      step, consumed samples (the data position), RNG state
        hf/                   the tokenizer the run was trained with (a SentencePiece tokenizer.model,
                              or Hugging Face tokenizer files), and the Hugging Face side files of a
                              model converted from one (config.json, ...): a save is self-contained and
                              works wherever it is copied

A save is written as ``.step_000100.tmp`` by every rank, completed by rank 0 (config, train
state), then renamed; ``latest`` is replaced atomically after the rename, and only then are saves
beyond ``keep_last`` removed. A run killed at any moment leaves the previous saves intact; the
stale temporary directory is removed at the next start.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from cookbook.engine.config import dumps_toml, read_toml
from cookbook.engine.distributed import barrier
from cookbook.errors import CookbookError
from cookbook.fileio import write_text_atomic
from cookbook.formats.stream import hf_side_files, tokenizer_files, tokenizer_path

STEP_DIR = re.compile(r"^step_(\d+)$")
SIDE_DIR = "hf"  # inside every save: its tokenizer and Hugging Face side files


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def is_checkpoint(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / "config.toml").is_file()


def find_checkpoint(path: str | Path) -> Path | None:
    """The save ``path`` names: a save directory itself, or the one a run folder's ``latest`` names."""
    path = Path(path)
    if is_checkpoint(path):
        return path
    latest = path / "latest"
    if latest.is_file():
        target = path / latest.read_text().strip()
        if not is_checkpoint(target):
            raise CookbookError(f"{latest} names {target.name}, which is not a complete checkpoint")
        return target
    return None


def read_train_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "train_state.json").read_text())


def read_config(ckpt: Path) -> dict[str, dict]:
    """A save's config sections, its tokenizer named by a path that works from here (see ``saved_tokenizer``)."""
    sections = read_toml(ckpt / "config.toml")
    data = sections.get("data")
    if isinstance(data, dict) and data.get("tokenizer_model"):
        data["tokenizer_model"] = saved_tokenizer(ckpt, data["tokenizer_model"])
    return sections


def saved_tokenizer(ckpt: Path, recorded: str) -> str:
    """The tokenizer a save records, as a path that exists here: inside the save (saves record it relative to
    themselves), else as recorded (saves of earlier versions: relative to the folder training ran in, or
    absolute); else the recorded path unchanged, so that loading it fails with one line naming --tokenizer-model."""
    for candidate in (ckpt / recorded, Path(recorded)):
        if candidate.exists():
            return str(candidate.absolute())
    return recorded


def side_files(tokenizer: str | Path | None) -> dict[str, Path]:
    """The files a save carries in hf/ for a tokenizer: a SentencePiece .model, or a Hugging Face tokenizer file
    or folder; a converted model's hf/ folder comes whole (config.json too, so convert --to hf can restore it)."""
    if not tokenizer:
        return {}
    path = Path(tokenizer)
    if path.is_dir() and path.name == SIDE_DIR and (path / "config.json").is_file():
        return hf_side_files(path)
    return tokenizer_files(path)


def store_tokenizer(step_dir: Path, data: dict, files: dict[str, bytes] | None = None) -> dict:
    """Copy the tokenizer ``data`` names (or ``files``: name -> bytes, read earlier) into ``step_dir/hf``; returns
    ``data`` naming it there, relative to the save."""
    if files is None:
        files = {name: path.read_bytes() for name, path in side_files(data.get("tokenizer_model")).items()}
    inside = tokenizer_path(Path(SIDE_DIR), files)
    if not files or inside is None:
        return dict(data)
    (step_dir / SIDE_DIR).mkdir(exist_ok=True)
    for name, blob in files.items():
        (step_dir / SIDE_DIR / name).write_bytes(blob)
    return {**data, "tokenizer_model": str(inside)}


def rng_state() -> dict:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = base64.b64encode(torch.cuda.get_rng_state().numpy().tobytes()).decode()
    return state


def set_rng_state(state: dict) -> None:
    def tensor(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensor(state["cuda"]))


class Checkpointer:
    """Saves into ``root``; every rank calls ``save`` (DCP writes each rank's shards)."""

    def __init__(self, root: str | Path, keep_last: int, is_main: bool):
        self.root, self.keep_last, self.is_main = Path(root), keep_last, is_main
        self._tokenizer: tuple[str, dict[str, bytes]] | None = None  # (path, its files), read at the first save
        if is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".step_*.tmp"):  # a save cut short by a crash
                shutil.rmtree(stale, ignore_errors=True)
        barrier()

    def saves(self) -> list[Path]:
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def _tokenizer_files(self, config: dict[str, dict]) -> dict[str, bytes]:
        """The tokenizer's files, read once: a run continued from a save names the tokenizer inside that save,
        which a later save may remove (--keep-last)."""
        path = config.get("data", {}).get("tokenizer_model")
        if not path:
            return {}
        if self._tokenizer is None or self._tokenizer[0] != path:
            self._tokenizer = path, {name: p.read_bytes() for name, p in side_files(path).items()}
        return self._tokenizer[1]

    def save(self, step: int, model, optimizer, config: dict[str, dict], train_state: dict) -> Path:
        final = self.root / step_name(step)
        tmp = self.root / f".{step_name(step)}.tmp"
        state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.save(state, checkpoint_id=str(tmp))
        barrier()
        if self.is_main:
            config = {**config, "data": store_tokenizer(tmp, config.get("data", {}), self._tokenizer_files(config))}
            write_text_atomic(tmp / "config.toml", dumps_toml(config))
            write_text_atomic(tmp / "train_state.json", json.dumps(train_state, indent=1))
            if final.exists():  # the same step saved again (a resumed run): swap, never lose both
                old = self.root / f".{step_name(step)}.old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
            write_text_atomic(self.root / "latest", final.name + "\n")
            if self.keep_last > 0:
                for old in self.saves()[: -self.keep_last]:
                    if old != final:
                        shutil.rmtree(old, ignore_errors=True)
        barrier()
        return final


def load(ckpt: Path, model, optimizer=None) -> None:
    """Load model (and optimizer) state from a save into a model of any parallel layout."""
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        saved = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
        if not any(key.startswith("optimizer") for key in saved):
            raise CookbookError(f"{ckpt} holds weights only, no optimizer state (a converted or pruned checkpoint); "
                                "start a run from it with --finetune")
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(ckpt))
    except (Exception, CheckpointException) as e:  # missing keys, shape mismatches (CheckpointException is a BaseException)
        raise CookbookError(f"cannot load {ckpt}: {str(e).splitlines()[0][:300]}") from e
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def load_model(path: str | Path, device: str = "auto", dtype: str = "fp32"):
    """(model in eval mode, the checkpoint's config sections) for inference in this process; ``dtype`` auto, bf16
    or fp32 (cookbook/engine/precision.py)."""
    from cookbook.engine.config import build_config
    from cookbook.engine.distributed import pick_device
    from cookbook.engine.precision import check_dtype, load_in_dtype
    from cookbook.model import Transformer

    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise CookbookError(f"{path} holds no cookbook checkpoint (no 'latest' file and no .metadata/config.toml)")
    check_dtype(dtype)
    sections = read_config(ckpt)
    cfg = build_config({"model": sections["model"]}).model
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=pick_device(device, 0))
    model.tie_weights()
    state = {"model": model.state_dict()}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=str(ckpt), no_dist=not dist.is_initialized())
    except Exception as e:
        raise CookbookError(f"cannot load {ckpt}: {str(e).splitlines()[0][:300]}") from e
    model.load_state_dict(state["model"])
    return load_in_dtype(model, dtype).eval(), sections
