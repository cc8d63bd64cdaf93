"""Loading a model to run: a cookbook checkpoint (a save folder or one step_* directory) or a Hugging Face model
folder (config.json + safetensors), with the tokenizer it was trained with."""

from __future__ import annotations

from pathlib import Path

import torch

from cookbook.errors import CookbookError


def _hf_model(folder: Path, device: str, dtype: str):
    """Our Transformer with a Hugging Face folder's weights, read one tensor at a time."""
    from cookbook.engine.distributed import pick_device
    from cookbook.engine.precision import load_in_dtype
    from cookbook.formats import hf
    from cookbook.formats.stream import checked
    from cookbook.model import Transformer

    ckpt = hf.read(folder)
    with torch.device("meta"):
        model = Transformer(ckpt.config)
    model.to_empty(device=pick_device(device, 0))
    load_in_dtype(model, dtype)
    model.tie_weights()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in checked(ckpt.tensors(), ckpt.config, str(folder)):
            params[name].copy_(tensor)
    return model.eval()


def model_format(path: str | Path) -> str:
    """"cookbook" (a save folder or one step_* directory) or "hf" (a Hugging Face model folder); a missing path is
    named as missing first."""
    from cookbook.engine.checkpoint import find_checkpoint

    where = Path(path)
    if not where.exists():
        raise CookbookError(f"{path} does not exist; pass a cookbook checkpoint or a Hugging Face model folder")
    if find_checkpoint(where) is not None:
        return "cookbook"
    if (where / "config.json").is_file():
        return "hf"
    raise CookbookError(f"{path} holds no cookbook checkpoint (no 'latest' file and no .metadata/config.toml) and "
                        "is no Hugging Face model folder (no config.json); pass one of those")


def find_tokenizer(path: str | Path, tokenizer_model: str | None = None,
                   tokenizer_type: str | None = None) -> tuple[str, str | None]:
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


def load_model_and_tokenizer(path: str | Path, device: str = "auto", dtype: str = "auto",
                             tokenizer_model: str | None = None, tokenizer_type: str | None = None):
    """(model in eval mode, tokenizer) from a cookbook checkpoint or a Hugging Face model folder, with the tokenizer
    ``find_tokenizer`` finds (found before the weights are read, so a missing one fails at once)."""
    from cookbook.data.tokenizer import load_tokenizer
    from cookbook.engine.checkpoint import load_model
    from cookbook.engine.precision import check_dtype

    check_dtype(dtype)
    form = model_format(path)  # a missing or wrong path is named before anything else
    tok, kind = find_tokenizer(path, tokenizer_model, tokenizer_type)
    model = load_model(path, device, dtype)[0] if form == "cookbook" else _hf_model(Path(path), device, dtype)
    return model, load_tokenizer(tok, kind)
