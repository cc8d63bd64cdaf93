"""cookbook checkpoints: one directory per save, complete or absent.

    SAVE/
      latest                  the name of the newest complete save ("step_000100")
      step_000100/
        .metadata, *.distcp   torch.distributed.checkpoint shards: model and optimizer state,
                              keyed by parameter name, so a save loads under any parallel layout
        config.toml           the resolved job config (model, data, optimizer, training, ...)
        train_state.json      step, consumed samples (the data position), RNG state

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

STEP_DIR = re.compile(r"^step_(\d+)$")


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
    return read_toml(ckpt / "config.toml")


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
        if is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".step_*.tmp"):  # a save cut short by a crash
                shutil.rmtree(stale, ignore_errors=True)
        barrier()

    def saves(self) -> list[Path]:
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found)]

    def save(self, step: int, model, optimizer, config: dict[str, dict], train_state: dict) -> Path:
        final = self.root / step_name(step)
        tmp = self.root / f".{step_name(step)}.tmp"
        state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
        dcp.save(state, checkpoint_id=str(tmp))
        barrier()
        if self.is_main:
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
    """(model in eval mode, the checkpoint's config sections) for inference in this process."""
    from cookbook.engine.config import build_config
    from cookbook.engine.distributed import pick_device
    from cookbook.engine.parallelize import DTYPES
    from cookbook.model import Transformer

    ckpt = find_checkpoint(path)
    if ckpt is None:
        raise CookbookError(f"{path} holds no cookbook checkpoint (no 'latest' file and no .metadata/config.toml)")
    if dtype not in DTYPES:
        raise CookbookError(f"unknown dtype {dtype!r}; use {' or '.join(DTYPES)}")
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
    return model.to(DTYPES[dtype]).eval(), sections
