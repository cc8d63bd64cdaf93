"""Writing a pruned model as a normal cookbook save (what ``cookbook pretrain --load X --finetune``, ``cookbook eval``,
``cookbook convert`` and ``checkpoint.load_model`` read):

    SAVE/
      latest                  "step_000000"
      step_000000/
        .metadata, *.distcp   {"model": the pruned state dict} in torch.distributed.checkpoint, one process
        config.toml           [model] the pruned shape (head_dim explicit), [data] the source's (its tokenizer)
        hf/                   the source's tokenizer (and Hugging Face side files), as every save carries it
        train_state.json      step 0, and the checkpoint it was pruned from

Written as ``.step_000000.tmp`` and renamed; ``latest`` last. No optimizer state: train from it with ``--finetune``.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch import nn

from cookbook.engine.checkpoint import step_name, store_tokenizer
from cookbook.engine.config import dumps_toml
from cookbook.errors import CookbookError
from cookbook.fileio import write_text_atomic


def write_checkpoint(save: str | Path, model: nn.Module, sections: dict[str, dict], train_state: dict) -> Path:
    """Save ``model`` (a plain ``Transformer``) with ``sections``' [data] and the model's own [model] config into
    ``save``; refuses a folder that already holds a run. Returns the step directory."""
    save = Path(save)
    if (save / "latest").exists():
        raise CookbookError(f"--save {save} already holds a run; choose another --save")
    save.mkdir(parents=True, exist_ok=True)
    final, tmp = save / step_name(0), save / f".{step_name(0)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    state = {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": state}, checkpoint_id=str(tmp), no_dist=True)
    model_section = {k: v for k, v in model.config.to_dict().items() if v is not None}
    config = {"model": model_section, "data": store_tokenizer(tmp, sections.get("data", {}))}
    write_text_atomic(tmp / "config.toml", dumps_toml(config))
    write_text_atomic(tmp / "train_state.json", json.dumps({"step": 0, "consumed_samples": 0, **train_state}, indent=1))
    if final.exists():  # a stale save without ``latest`` (a run killed between rename and latest)
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(save / "latest", final.name + "\n")
    return final


def param_count(model: nn.Module) -> int:
    """Parameters, a tied output layer counted once."""
    seen = {id(p): p.numel() for p in model.parameters()}
    return sum(seen.values())


__all__ = ["write_checkpoint", "param_count"]
