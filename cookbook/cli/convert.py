"""``cookbook convert``: checkpoints between Hugging Face, cookbook and Megatron-LM."""

from __future__ import annotations

from typing import Annotated

import typer

from cookbook.cli.common import config_from
from cookbook.progress import out


def convert(
    ctx: typer.Context,
    source: Annotated[
        str,
        typer.Option("--from", help="The format of --load-dir: hf, cookbook or megatron.", rich_help_panel="Formats"),
    ],
    target: Annotated[
        str, typer.Option("--to", help="The format to write: hf, cookbook or megatron.", rich_help_panel="Formats")
    ],
    load_dir: Annotated[
        str,
        typer.Option(
            "--load-dir",
            help="A Hugging Face folder, a cookbook save (folder or step_*), or a Megatron-LM checkpoint folder.",
            rich_help_panel="Formats",
        ),
    ],
    save_dir: Annotated[
        str,
        typer.Option(
            "--save-dir",
            help="The folder to write (refused if it exists, unless --overwrite).",
            rich_help_panel="Formats",
        ),
    ],
    tp: Annotated[
        int,
        typer.Option(
            "--tp",
            "--target-tensor-parallel-size",
            help="--to megatron: tensor-parallel size.",
            rich_help_panel="Megatron-LM",
        ),
    ] = 1,
    pp: Annotated[
        int,
        typer.Option(
            "--pp",
            "--target-pipeline-parallel-size",
            help="--to megatron: pipeline-parallel size.",
            rich_help_panel="Megatron-LM",
        ),
    ] = 1,
    make_vocab_size_divisible_by: Annotated[
        int,
        typer.Option(
            "--make-vocab-size-divisible-by",
            help="--to megatron: pad the vocabulary to a multiple of this x TP.",
            rich_help_panel="Megatron-LM",
        ),
    ] = 128,
    transformer_impl: Annotated[
        str,
        typer.Option(
            "--transformer-impl",
            help="--to megatron: layer names of transformer_engine (Megatron-LM's default) or local.",
            rich_help_panel="Megatron-LM",
        ),
    ] = "transformer_engine",
    ckpt_format: Annotated[
        str,
        typer.Option(
            "--ckpt-format",
            help="--to megatron: torch (mp_rank_* files) or torch_dist (Megatron-LM's default, resharded when "
            "loaded); --from megatron reads either.",
            rich_help_panel="Megatron-LM",
        ),
    ] = "torch",
    dtype: Annotated[
        str | None,
        typer.Option("--dtype", help="Store the weights as bf16, fp16 or fp32 (default: as the source stores them)."),
    ] = None,
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", help="--to hf: the largest safetensors shard, e.g. 5GB.")
    ] = "5GB",
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace --save-dir if it exists (only once the new one is complete)."),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Convert a checkpoint between Hugging Face, cookbook and Megatron-LM, resharding TP/PP, one layer in memory.

    Example: cookbook convert --from hf --to megatron --load-dir Llama-2-7b-hf --save-dir megatron/llama2-7b --tp 4 --pp 2
    """
    from recipes.convert import ConvertConfig, render, run

    for line in render(run(config_from(ConvertConfig, ctx.params), show_progress=not quiet), target):
        out.print(line)
