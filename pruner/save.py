"""Writing a pruned model as a normal cookbook save (what ``cookbook pretrain --load X --finetune``, ``cookbook eval``,
``cookbook convert`` and ``cookbook.inference.load.load_model`` read):

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

import shutil
import warnings
from pathlib import Path

import torch.distributed.checkpoint as dcp
from torch import nn

from cookbook.engine.checkpoint import commit_save, save_paths, write_save_files
from cookbook.errors import CookbookError


def write_checkpoint(save: str | Path, model: nn.Module, sections: dict[str, dict], train_state: dict) -> Path:
    """Save ``model`` (a plain ``Transformer``) with ``sections``' [data] and the model's own [model] config into
    ``save``; refuses a folder that already holds a run. Returns the step directory."""
    save = Path(save)
    if (save / "latest").exists():
        raise CookbookError(f"--save {save} already holds a run; choose another --save")
    save.mkdir(parents=True, exist_ok=True)
    tmp, final = save_paths(save, 0)
    shutil.rmtree(tmp, ignore_errors=True)
    state = {name: t.detach().to("cpu", copy=True) for name, t in model.state_dict().items()}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": state}, checkpoint_id=str(tmp), no_dist=True)
    model_section = {k: v for k, v in model.config.to_dict().items() if v is not None}
    write_save_files(
        tmp,
        {"model": model_section, "data": sections.get("data", {})},
        {"step": 0, "consumed_samples": 0, **train_state},
    )
    return commit_save(tmp, final)


def param_count(model: nn.Module) -> int:
    """Parameters, a tied output layer counted once."""
    seen = {id(p): p.numel() for p in model.parameters()}
    return sum(seen.values())


__all__ = ["write_checkpoint", "param_count"]
