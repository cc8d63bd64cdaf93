"""What several commands share: their common options, and the helpers that turn flag values into a recipe's config.

An option written the same way in several commands is an ``Annotated`` type here (``Device``, ``Dtype``, ``Load``,
the dry-run trio); one whose help panel differs between commands is made by a function (``tokenizer_model_option``,
``tokenizer_type_option``).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated

import typer

from cookbook.errors import CookbookError

CHECKPOINT_TOKENIZER_HELP = "Default: the checkpoint's tokenizer."
TOKENIZER_FILE_HELP = "SentencePiece .model, or a Hugging Face tokenizer.json / folder."
TOKENIZER_TYPE_HELP = (
    "Megatron-LM's name: Llama2Tokenizer, SentencePieceTokenizer, HuggingFaceTokenizer, GPT2BPETokenizer "
    "(default: from the file)."
)
DTYPE_HELP = (
    "auto (bf16 where the device computes it natively, else fp32), bf16 or fp32."  # cookbook/engine/precision.py
)


def tokenizer_model_option(
    help: str = CHECKPOINT_TOKENIZER_HELP, panel: str | None = None, short: bool = False
) -> typer.models.OptionInfo:
    """``--tokenizer-model``, alias ``--tokenizer`` (and ``-t`` where ``short``)."""
    names = ("--tokenizer-model", "--tokenizer", "-t") if short else ("--tokenizer-model", "--tokenizer")
    return typer.Option(*names, help=help, rich_help_panel=panel)


def tokenizer_type_option(panel: str | None = None) -> typer.models.OptionInfo:
    return typer.Option(help=TOKENIZER_TYPE_HELP, rich_help_panel=panel)


Load = Annotated[str, typer.Option("--load", help="A checkpoint: a save folder (its latest) or one step_* directory.")]
Device = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
Dtype = Annotated[str, typer.Option(help=DTYPE_HELP)]

# --dry-run --world-size N --gpu G: check a training job here for the machines it will run on.
DRY_RUN_HELP = "Validate the job for --world-size processes and estimate its memory; no devices, no training."
DryRun = Annotated[bool, typer.Option("--dry-run", help=DRY_RUN_HELP, rich_help_panel="Dry run")]
WorldSize = Annotated[
    int, typer.Option(help="With --dry-run: the number of processes the job will run on.", rich_help_panel="Dry run")
]
Gpu = Annotated[str, typer.Option(help="With --dry-run: the GPU to estimate memory for.", rich_help_panel="Dry run")]


def comma_list(values: list[str] | None) -> list[str]:
    """Repeated options and comma-separated lists both work: -k a -k b, or -k a,b."""
    return [v for item in values or [] for v in item.split(",") if v]


def int_list(value: str | None, flag: str) -> list[int]:
    """``4096,8192`` (or spaces) -> [4096, 8192]; anything else is one error line naming ``flag``."""
    try:
        return [int(v) for v in (value or "").replace(",", " ").split()]
    except ValueError:
        raise CookbookError(f"{flag} {value!r} must be integers separated by commas, e.g. 4096,8192") from None


def config_from(cls, params: dict, **derived):
    """``cls(...)`` from a command's parsed parameters (``ctx.params``): each field of the dataclass ``cls`` takes the
    parameter of its name; ``derived`` gives the rest (values a flag does not give as they are: lists split at
    commas, fields named otherwise, defaults that depend on other flags)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{name: value for name, value in params.items() if name in fields and name not in derived}, **derived)
