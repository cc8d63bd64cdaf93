"""Loading any checkpoint to run: a cookbook save (a run folder, its ``latest``, or one step_* directory) or a
Hugging Face model folder (config.json + safetensors), with the tokenizer it was trained with.

``load_model`` gives the model and its config sections (``[model]``, and ``[data]`` naming its tokenizer) whatever
the format; ``find_tokenizer`` names the tokenizer without reading weights, so a missing one fails at once;
``load_model_and_tokenizer`` does both. Every command that runs a model (generate, eval, serve, prune, distill
generate) loads through here.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from cookbook.engine.checkpoint import model_format, model_sections
from cookbook.errors import CookbookError


def find_tokenizer(
    path: str | Path, tokenizer_model: str | None = None, tokenizer_type: str | None = None
) -> tuple[str, str | None]:
    """(tokenizer path, Megatron-LM type or None) of a checkpoint: ``tokenizer_model`` if given, else a cookbook
    checkpoint's recorded tokenizer (carried in the save), else a Hugging Face folder's own tokenizer files."""
    from cookbook.engine.checkpoint import find_checkpoint, read_config
    from cookbook.formats.stream import hf_side_files, tokenizer_path

    if tokenizer_model:
        return str(tokenizer_model), tokenizer_type
    where = Path(path)
    if model_format(where) == "cookbook":
        data = read_config(find_checkpoint(where)).get("data", {})
        if not data.get("tokenizer_model"):
            raise CookbookError(f"the checkpoint {path} names no tokenizer; pass --tokenizer-model")
        return data["tokenizer_model"], tokenizer_type or data.get("tokenizer_type")
    tok = tokenizer_path(where, hf_side_files(where))
    if tok is None:
        raise CookbookError(f"{path} holds no tokenizer.json or tokenizer.model; pass --tokenizer-model")
    return str(tok), tokenizer_type


def load_model(path: str | Path, device: str = "auto", dtype: str = "auto"):
    """(model in eval mode, its config sections: ``model_sections``) of any checkpoint, in this process; ``dtype``
    auto, bf16 or fp32 (cookbook/engine/precision.py)."""
    from cookbook.engine.checkpoint import find_checkpoint, read_state
    from cookbook.engine.config import build_config, check_dtype
    from cookbook.engine.distributed import pick_device
    from cookbook.engine.precision import DTYPES, choose_dtype, load_in_dtype
    from cookbook.formats import hf
    from cookbook.formats.stream import checked
    from cookbook.model import Transformer

    check_dtype(dtype)
    form = model_format(path)  # a missing or wrong path is named before anything else
    sections = model_sections(path)
    with torch.device("meta"):
        model = Transformer(build_config({"model": sections["model"]}).model)
    model.to_empty(device=pick_device(device, 0))
    model.tie_weights()
    if form == "cookbook":
        state = {"model": model.state_dict()}
        read_state(state, find_checkpoint(path), single_process=not dist.is_initialized())
        model.load_state_dict(state["model"])
    else:  # one tensor at a time, straight into the model in its final dtype
        ckpt = hf.read(Path(path))
        model.to(DTYPES[choose_dtype(dtype, next(model.parameters()).device)[0]])
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in checked(ckpt.tensors(), ckpt.config, str(path)):
                params[name].copy_(tensor)
    return load_in_dtype(model, dtype).eval(), sections


def load_model_and_tokenizer(
    path: str | Path,
    device: str = "auto",
    dtype: str = "auto",
    tokenizer_model: str | None = None,
    tokenizer_type: str | None = None,
):
    """(model in eval mode, tokenizer) of any checkpoint, with the tokenizer ``find_tokenizer`` finds (found before
    the weights are read, so a missing one fails at once)."""
    from cookbook.data.tokenizer import load_tokenizer
    from cookbook.engine.config import check_dtype

    check_dtype(dtype)
    tok, kind = find_tokenizer(path, tokenizer_model, tokenizer_type)
    return load_model(path, device, dtype)[0], load_tokenizer(tok, kind)
