"""Training commands: pretrain, extend, prune, plan; and the training flags that pretrain, extend, prune and distill
train take.

The training flags are not written here: they are the fields of the job's config dataclasses that declare a flag
(cookbook/flags.py), one option per field, typed as the field, in the panel the field names. ``training_command`` gives
a command ``--config`` and those options; the command receives them as ``overrides`` ({section: {field: value}}, a flag
left out is absent), which its recipe merges over the preset and the TOML file.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from pathlib import Path
from typing import Annotated, NamedTuple

import typer
from rich.markup import escape

from cookbook.cli.common import DryRun, Gpu, WorldSize, comma_list, config_from, int_list
from cookbook.progress import out

PRESET_HELP = "Model preset: tiny, llama2-7b, llama2-13b, llama3-8b, llama-31b/65b/108b/132b."
MULTI_VALUE_FLAGS = ("--data-path",)  # Megatron-LM style: --data-path 0.3 A 0.7 B (a list field)
ConfigFile = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="A TOML config; flags override its fields.", rich_help_panel="Config"),
]


class TrainingFlag(NamedTuple):
    section: str  # the config section (TOML table) of the field it sets
    field: str
    parameter: inspect.Parameter  # the option, as a keyword parameter SECTION__FIELD (default None: not given)
    is_list: bool  # the field is a list: the option takes one string, split at spaces


def _flag(section: str, field: str, kind: type, flags: tuple[str, ...], help: str, panel: str) -> TrainingFlag:
    option = typer.Option(*flags, help=escape(help), rich_help_panel=panel, show_default=False)  # plain-text help
    is_list = typing.get_origin(kind) is list
    annotation = Annotated[(str if is_list else kind) | None, option]
    parameter = inspect.Parameter(
        f"{section}__{field}", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
    )
    return TrainingFlag(section, field, parameter, is_list)


def _field_type(hint) -> type:
    """The type of a field less None: int, float, str, bool or a list."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    (kind,) = [t for t in options if t is not type(None)]
    return kind


@functools.cache
def training_flags() -> list[TrainingFlag]:
    """``--preset``, then the flag of every config field that declares one, in the order of the sections and fields.
    Importing the config dataclasses imports torch (seconds): cookbook.cli asks for these only where a command trains."""
    from cookbook.engine.config import SECTIONS

    flags = [_flag("model", "preset", str, ("--preset",), PRESET_HELP, "Model")]
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if "flags" in f.metadata:
                flags.append(_flag(section, f.name, _field_type(hints[f.name]), **f.metadata))
    return flags


def training_command(fn, flags: list[TrainingFlag]):
    """The command ``fn(config, overrides, **own)`` with ``--config``, the training ``flags`` and its own options."""
    own = list(inspect.signature(fn, eval_str=True).parameters.values())[2:]  # after (config, overrides)
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
    config = inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=ConfigFile)

    @functools.wraps(fn)
    def command(**kwargs):
        overrides: dict[str, dict] = {}
        for flag in flags:
            value = kwargs.pop(flag.parameter.name)
            if value is not None:
                overrides.setdefault(flag.section, {})[flag.field] = value.split() if flag.is_list else value
        return fn(kwargs.pop("config"), overrides, **kwargs)

    command.__signature__ = inspect.Signature([config, *(flag.parameter for flag in flags), *own])
    return command


def join_multi_value_flags(argv: list[str]) -> list[str]:
    """``--data-path 0.3 A 0.7 B`` -> ``--data-path "0.3 A 0.7 B"`` (click options take one value)."""
    joined, i = [], 0
    while i < len(argv):
        joined.append(argv[i])
        if argv[i] in MULTI_VALUE_FLAGS:
            j = i + 1
            while j < len(argv) and not argv[j].startswith("-"):
                j += 1
            if j > i + 1:
                joined.append(" ".join(argv[i + 1 : j]))
            i = j
        else:
            i += 1
    return joined


# --------------------------------------------------------------------------- the commands


def pretrain(
    config: Path | None, overrides: dict, dry_run: DryRun = False, world_size: WorldSize = 1, gpu: Gpu = "A100-80GB"
) -> None:
    """Pretrain or continue training a Llama-family model on indexed data (FSDP2 under torchrun).

    Example: cookbook pretrain --preset tiny --data-path data/corpus_text_document --tokenizer-model tok.model --train-iters 200 --save ckpt/tiny

    Many processes: torchrun --nproc-per-node 8 -m cookbook pretrain --config run.toml
    """
    from recipes.pretrain import dry_run as check
    from recipes.pretrain import run

    if dry_run:
        check(config, overrides, world_size, gpu)
    else:
        run(config, overrides)


def extend(
    config: Path | None,
    overrides: dict,
    interp_factor: Annotated[
        float | None,
        typer.Option(
            "--interp-factor",
            "--rotary-seq-len-interpolation-factor",
            help="Stretch the context by this factor (Megatron-LM's --rotary-seq-len-interpolation-factor). Required.",
            rich_help_panel="Extension",
        ),
    ] = None,
    rope_type: Annotated[
        str,
        typer.Option(
            help="linear (Position Interpolation), dynamic (NTK), yarn or llama3.", rich_help_panel="Extension"
        ),
    ] = "linear",
    no_train: Annotated[
        bool,
        typer.Option(
            "--no-train",
            help="Only write the checkpoint with the scaled config (training-free dynamic NTK / YaRN).",
            rich_help_panel="Extension",
        ),
    ] = False,
    dry_run: DryRun = False,
    world_size: WorldSize = 1,
    gpu: Gpu = "A100-80GB",
) -> None:
    """Extend the context window: rescale RoPE (Position Interpolation by default), then continue training at the new length.

    Example: cookbook extend --load ckpt/llama2-7b --interp-factor 2 --seq-length 8192 --data-path data/pile_text_document --lr 2e-5 --train-iters 1000 --save ckpt/llama2-7b-8k
    """
    from recipes.extend import dry_run as check
    from recipes.extend import run

    if dry_run:
        check(config, overrides, rope_type, interp_factor, world_size, gpu)
    else:
        run(config, overrides, rope_type, interp_factor, no_train)


def prune(
    config: Path | None,
    overrides: dict,
    ctx: typer.Context,
    hidden_size_remain: Annotated[
        int | None,
        typer.Option(
            "--hidden-size-remain",
            help="Hidden channels to keep (the same in every layer, the embedding and the output layer).",
            rich_help_panel="Target shape",
        ),
    ] = None,
    intermediate_size_remain: Annotated[
        int | None,
        typer.Option(
            "--intermediate-size-remain",
            "--ffn-hidden-size-remain",
            help="SwiGLU neurons to keep per layer.",
            rich_help_panel="Target shape",
        ),
    ] = None,
    num_attention_heads_remain: Annotated[
        int | None,
        typer.Option(
            "--num-attention-heads-remain",
            help="Query heads to keep per layer (head_dim stays).",
            rich_help_panel="Target shape",
        ),
    ] = None,
    num_query_groups_remain: Annotated[
        int | None,
        typer.Option(
            "--num-query-groups-remain",
            help="Key/value groups to keep per layer (default: MHA stays MHA, GQA keeps its groups).",
            rich_help_panel="Target shape",
        ),
    ] = None,
    drop_layers: Annotated[
        int | None,
        typer.Option(
            "--drop-layers",
            help="Drop this many layers, the least important by --layer-importance.",
            rich_help_panel="Target shape",
        ),
    ] = None,
    drop_layer_ids: Annotated[
        str | None,
        typer.Option(
            "--drop-layer-ids",
            help="Drop exactly these layers (0-based), e.g. 7,13,18,24.",
            rich_help_panel="Target shape",
        ),
    ] = None,
    importance: Annotated[
        str,
        typer.Option(
            help="Which heads, neurons and channels to keep: activation (Minitron), magnitude or random.",
            rich_help_panel="Importance",
        ),
    ] = "activation",
    layer_importance: Annotated[
        str,
        typer.Option(
            help="With --drop-layers N: block-influence (1 - cos(input, output)) or ppl (loss when removed).",
            rich_help_panel="Importance",
        ),
    ] = "block-influence",
    calib_data: Annotated[
        str | None,
        typer.Option(
            "--calib-data",
            help="Indexed dataset prefix of calibration samples (activation importance, layer importance).",
            rich_help_panel="Importance",
        ),
    ] = None,
    calib_samples: Annotated[
        int, typer.Option("--calib-samples", help="Calibration samples.", rich_help_panel="Importance")
    ] = 1024,
    calib_seq_length: Annotated[
        int | None,
        typer.Option(
            "--calib-seq-length",
            help="Tokens per calibration sample (default: --seq-length, else the model's context).",
            rich_help_panel="Importance",
        ),
    ] = None,
    calib_batch_size: Annotated[
        int,
        typer.Option(
            "--calib-batch-size",
            help="Samples per forward in calibration and --eval-data perplexity.",
            rich_help_panel="Importance",
        ),
    ] = 8,
    eval_data: Annotated[
        list[str] | None,
        typer.Option(
            "--eval-data",
            help="Perplexity before and after on these: indexed prefixes or jsonl files (comma-separate or repeat).",
            rich_help_panel="Report",
        ),
    ] = None,
    eval_seq_length: Annotated[
        int | None,
        typer.Option(
            "--eval-seq-length",
            help="Tokens per --eval-data window (default: --seq-length, else the model's context).",
            rich_help_panel="Report",
        ),
    ] = None,
    heal_steps: Annotated[
        int,
        typer.Option(
            "--heal-steps",
            help="Then train the pruned model this many iterations (with the training flags; --data-path needed).",
            rich_help_panel="Healing",
        ),
    ] = 0,
    kd: Annotated[
        bool,
        typer.Option(
            "--kd/--no-kd",
            help="Heal distilling from the unpruned model (its logits' KL; --kd-teacher picks another teacher).",
            rich_help_panel="Healing",
        ),
    ] = True,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Check the target shape and flags without weights (--preset stands in for a --load that is not here).",
            rich_help_panel="Dry run",
        ),
    ] = False,
) -> None:
    """Prune a checkpoint to a smaller shape (heads, query groups, neurons, hidden channels, layers), then optionally heal it with distillation.

    Example: cookbook prune --load ckpt/llama2-13b --hidden-size-remain 4096 --intermediate-size-remain 11008 --num-attention-heads-remain 32 --drop-layers 8 --calib-data data/pile_text_document --save ckpt/pruned-7b
    """
    from pruner.spec import PruneSpec, parse_layer_ids
    from recipes.prune import PruneConfig, render, render_shapes, run
    from recipes.prune import dry_run as check

    spec = PruneSpec(
        hidden_size=hidden_size_remain,
        intermediate_size=intermediate_size_remain,
        num_heads=num_attention_heads_remain,
        num_kv_heads=num_query_groups_remain,
        drop_layers=drop_layers,
        drop_layer_ids=parse_layer_ids(drop_layer_ids),
    )
    opts = config_from(PruneConfig, ctx.params, spec=spec, batch_size=calib_batch_size, eval_data=comma_list(eval_data))
    if dry_run:
        out.print(render_shapes(check(config, overrides, opts)))
        return
    for table in render(run(config, overrides, opts)):
        out.print(table)


def plan(
    preset: Annotated[
        str | None, typer.Option(help="Model preset (or give the shapes).", rich_help_panel="Model")
    ] = None,
    num_layers: Annotated[int | None, typer.Option(help="Transformer layers.", rich_help_panel="Model")] = None,
    hidden_size: Annotated[int | None, typer.Option(help="Hidden size.", rich_help_panel="Model")] = None,
    num_attention_heads: Annotated[int | None, typer.Option(help="Attention heads.", rich_help_panel="Model")] = None,
    num_query_groups: Annotated[int | None, typer.Option(help="Key/value heads.", rich_help_panel="Model")] = None,
    ffn_hidden_size: Annotated[int | None, typer.Option(help="SwiGLU hidden size.", rich_help_panel="Model")] = None,
    vocab_size: Annotated[int | None, typer.Option(help="Vocabulary size.", rich_help_panel="Model")] = None,
    seq_length: Annotated[
        int | None, typer.Option(help="Tokens per sample (default: the model's context).", rich_help_panel="Job")
    ] = None,
    global_batch_size: Annotated[int, typer.Option(help="Samples per iteration.", rich_help_panel="Job")] = 1024,
    gpu: Annotated[
        str, typer.Option(help="A100-80GB, A100-40GB, H100-80GB, H200 or L40S.", rich_help_panel="Cluster")
    ] = "A100-80GB",
    num_gpus: Annotated[int, typer.Option(help="GPUs in all.", rich_help_panel="Cluster")] = 8,
    gpus_per_node: Annotated[
        int, typer.Option(help="GPUs per node (tensor parallel stays within one).", rich_help_panel="Cluster")
    ] = 8,
    micro_batch_sizes: Annotated[
        str, typer.Option(help="Micro batch sizes to consider.", rich_help_panel="Job")
    ] = "1,2,4",
    max_tp: Annotated[
        int | None, typer.Option(help="Largest tensor-parallel size to consider.", rich_help_panel="Cluster")
    ] = None,
    max_pp: Annotated[
        int | None, typer.Option(help="Largest pipeline-parallel size to consider.", rich_help_panel="Cluster")
    ] = None,
    show_all: Annotated[
        bool,
        typer.Option("--all", help="Every layout, those that do not fit too (default: the fastest 25 that fit)."),
    ] = False,
    wide: Annotated[
        bool,
        typer.Option(
            "--wide", help="Also the memory's parts: parameters, gradients, optimizer, transient, activations."
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print every layout as JSON.")] = False,
) -> None:
    """Memory per GPU and estimated step time of each parallel layout; recommends one.

    Example: cookbook plan --preset llama-65b --seq-length 4096 --global-batch-size 1024 --gpu A100-80GB --num-gpus 128
    """
    from recipes.plan import render, run

    shapes = {
        "num_layers": num_layers,
        "hidden_size": hidden_size,
        "num_heads": num_attention_heads,
        "num_kv_heads": num_query_groups,
        "intermediate_size": ffn_hidden_size,
        "vocab_size": vocab_size,
    }
    result = run(
        preset,
        seq_length,
        global_batch_size,
        gpu,
        num_gpus,
        gpus_per_node,
        tuple(int_list(micro_batch_sizes, "--micro-batch-sizes")),
        max_tp,
        max_pp,
        **{k: v for k, v in shapes.items() if v is not None},
    )
    if as_json:
        out.print_json(data=result.to_dict())
        return
    out.print(render(result, limit=None if show_all else 25, show_all=show_all, wide=wide))
    out.print(result.recommendation())
