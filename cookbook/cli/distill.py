"""Distillation commands: distill generate (a teacher's synthetic text) and distill train (a student trained on it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from cookbook.cli.common import (
    DRY_RUN_HELP,
    DTYPE_HELP,
    Gpu,
    WorldSize,
    comma_list,
    config_from,
    tokenizer_model_option,
    tokenizer_type_option,
)


def generate(
    ctx: typer.Context,
    output: Annotated[
        str,
        typer.Option("--output", "-o", help="Folder for the sharded jsonl (rerun the same command to resume into it)."),
    ],
    prompts_from: Annotated[
        str,
        typer.Option(
            "--prompts-from",
            help="Pretraining documents: an indexed dataset prefix, a .jsonl file or a folder of them.",
            rich_help_panel="Prompts",
        ),
    ],
    teacher: Annotated[
        str | None,
        typer.Option(
            "--teacher",
            help="A Hugging Face folder or cookbook checkpoint (cookbook, vllm; openai: its tokenizer counts prompt "
            "tokens).",
            rich_help_panel="Teacher",
        ),
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            help="cookbook (our generator, here), vllm (in this process, GPUs) or openai (OpenAI-compatible servers "
            "at --endpoint).",
            rich_help_panel="Teacher",
        ),
    ] = "cookbook",
    endpoint: Annotated[
        list[str] | None,
        typer.Option(
            "--endpoint",
            help="openai: server URLs (comma-separate or repeat), e.g. http://node1:8000.",
            rich_help_panel="Teacher",
        ),
    ] = None,
    served_model_name: Annotated[
        str | None,
        typer.Option(
            "--served-model-name",
            help="openai: the model name to ask for (default: the server's first).",
            rich_help_panel="Teacher",
        ),
    ] = None,
    concurrency: Annotated[
        int, typer.Option(help="openai: requests in flight per endpoint.", rich_help_panel="Teacher")
    ] = 64,
    timeout: Annotated[float, typer.Option(help="openai: seconds per request.", rich_help_panel="Teacher")] = 600.0,
    retries: Annotated[
        int,
        typer.Option(
            help="openai: retries of a failed request (connection errors, 429, 5xx).", rich_help_panel="Teacher"
        ),
    ] = 5,
    tensor_parallel_size: Annotated[
        int,
        typer.Option("--tensor-parallel-size", "--tp", help="vllm: GPUs per model.", rich_help_panel="Teacher"),
    ] = 1,
    gpu_memory_utilization: Annotated[
        float, typer.Option(help="vllm: share of GPU memory vLLM may take.", rich_help_panel="Teacher")
    ] = 0.9,
    device: Annotated[str, typer.Option(help="cookbook: auto, cpu or cuda.", rich_help_panel="Teacher")] = "auto",
    dtype: Annotated[
        str,
        typer.Option(
            help="cookbook: " + DTYPE_HELP[:-1] + "; vllm: its own names (auto, bfloat16, ...).",
            rich_help_panel="Teacher",
        ),
    ] = "auto",
    batch_size: Annotated[int, typer.Option(help="cookbook: sequences per batch.", rich_help_panel="Teacher")] = 16,
    prefix_tokens: Annotated[
        int | None,
        typer.Option(
            "--prefix-tokens",
            help="Prompt = the first N tokens of a document (default 128).",
            rich_help_panel="Prompts",
        ),
    ] = None,
    prefix_fraction: Annotated[
        float | None,
        typer.Option("--prefix-fraction", help="Or: that share of each document's tokens.", rich_help_panel="Prompts"),
    ] = None,
    num_prompts: Annotated[
        int | None,
        typer.Option(
            "--num-prompts",
            help="At most this many prompts (default: every long enough document).",
            rich_help_panel="Prompts",
        ),
    ] = None,
    min_doc_tokens: Annotated[
        int | None,
        typer.Option(
            "--min-doc-tokens",
            help="Skip documents shorter than this (default: longer than the prefix).",
            rich_help_panel="Prompts",
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seeds the document order and sampling.", rich_help_panel="Prompts")] = 1234,
    json_key: Annotated[
        str, typer.Option("--json-key", help="jsonl: the key holding a document's text.", rich_help_panel="Prompts")
    ] = "text",
    tokenizer_model: Annotated[
        str | None,
        tokenizer_model_option(
            "Counts prompt tokens and decodes indexed data (default: the teacher's).", panel="Prompts"
        ),
    ] = None,
    tokenizer_type: Annotated[str | None, tokenizer_type_option(panel="Prompts")] = None,
    max_tokens: Annotated[
        int,
        typer.Option(
            "--max-tokens", "--max-new-tokens", help="New tokens per completion at most.", rich_help_panel="Sampling"
        ),
    ] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy.", rich_help_panel="Sampling")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling (1 = off).", rich_help_panel="Sampling")] = 0.9,
    top_k: Annotated[
        int, typer.Option(help="Sample among the K most likely tokens (0 = off).", rich_help_panel="Sampling")
    ] = 0,
    n: Annotated[
        int, typer.Option("--n", "--samples-per-prompt", help="Completions per prompt.", rich_help_panel="Sampling")
    ] = 1,
    stop: Annotated[
        list[str] | None,
        typer.Option("--stop", help="A string that ends a completion (repeatable).", rich_help_panel="Sampling"),
    ] = None,
    frequency_penalty: Annotated[
        float, typer.Option(help="OpenAI's: logit -= f x count in the completion.", rich_help_panel="Sampling")
    ] = 0.0,
    presence_penalty: Annotated[
        float, typer.Option(help="OpenAI's: logit -= p if in the completion.", rich_help_panel="Sampling")
    ] = 0.0,
    repetition_penalty: Annotated[
        float,
        typer.Option(
            help="vLLM/HF's: tokens seen in prompt or completion are penalised (1 = off).", rich_help_panel="Sampling"
        ),
    ] = 1.0,
    prompts_per_shard: Annotated[
        int, typer.Option(help="Prompts per output shard (the unit of resume).", rich_help_panel="Output")
    ] = 2048,
    continuation_only: Annotated[
        bool,
        typer.Option(
            "--continuation-only",
            help="text = the continuation alone (default: prefix + continuation).",
            rich_help_panel="Output",
        ),
    ] = False,
    min_tokens: Annotated[
        int,
        typer.Option("--min-tokens", help="Drop completions shorter than this many tokens.", rich_help_panel="Filters"),
    ] = 0,
    max_repeat_ratio: Annotated[
        float | None,
        typer.Option(
            "--max-repeat-ratio",
            help="Drop texts whose word n-grams repeat more than this share (e.g. 0.5).",
            rich_help_panel="Filters",
        ),
    ] = None,
    ngram: Annotated[int, typer.Option(help="n of the repeat ratio, in words.", rich_help_panel="Filters")] = 3,
    dedup: Annotated[
        bool, typer.Option("--dedup/--no-dedup", help="Drop exact duplicate continuations.", rich_help_panel="Filters")
    ] = True,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Check the flags (and count the prompts where the data are here) without the teacher.",
        ),
    ] = False,
) -> None:
    """Synthetic data: prompt a teacher with the first tokens of pretraining documents and write its continuations as sharded jsonl.

    Example: cookbook distill generate --teacher /models/Qwen-72B --backend vllm --tp 8 --prompts-from data/pile.jsonl --prefix-tokens 128 --max-tokens 4096 --output synthetic/
    """
    from cookbook.inference.sampling import SamplingParams
    from inference_distill.filters import FilterConfig
    from recipes.distill import DistillGenerateConfig, generate_dry_run
    from recipes.distill import generate as run

    params = ctx.params
    opts = config_from(
        DistillGenerateConfig,
        params,
        prefix_tokens=128 if prefix_tokens is None and prefix_fraction is None else prefix_tokens,
        text_key=json_key,
        sampling=config_from(SamplingParams, params, stop=tuple(stop or ())),
        filters=config_from(FilterConfig, params),
        endpoints=comma_list(endpoint),
    )
    (generate_dry_run if dry_run else run)(opts)


def train(
    config: Path | None,
    overrides: dict,
    ctx: typer.Context,
    synthetic: Annotated[
        list[str] | None,
        typer.Option(
            "--synthetic",
            help="distill generate output folders (or jsonl files): comma-separate or repeat. Required.",
            rich_help_panel="Synthetic data",
        ),
    ] = None,
    synthetic_weight: Annotated[
        float | None,
        typer.Option(
            "--synthetic-weight",
            help="Share of training samples from the synthetic data when blended with --data-path (default 0.5; "
            "alone: 1).",
            rich_help_panel="Synthetic data",
        ),
    ] = None,
    synthetic_prefix: Annotated[
        str | None,
        typer.Option(
            "--synthetic-prefix",
            help="Where the tokenized synthetic data go (default SAVE/synthetic/synthetic).",
            rich_help_panel="Synthetic data",
        ),
    ] = None,
    workers: Annotated[
        int,
        typer.Option("--workers", help="Tokenizer threads for the synthetic data.", rich_help_panel="Synthetic data"),
    ] = max(1, min(8, os.cpu_count() or 1)),
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help=DRY_RUN_HELP[:-1] + " (--preset stands in for a --load that is not here).",
            rich_help_panel="Dry run",
        ),
    ] = False,
    world_size: WorldSize = 1,
    gpu: Gpu = "A100-80GB",
) -> None:
    """Continue training a student on a teacher's synthetic text (tokenized with the preprocess code), optionally blended with original data and with logit KD (--kd-teacher).

    Example: cookbook distill train --load ckpt/llama2-13b --synthetic synth/ --data-path data/pile_text_document --synthetic-weight 0.5 --lr 1e-5 --train-iters 2000 --save ckpt/13b-distilled
    """
    from recipes.distill import DistillTrainConfig, train_dry_run
    from recipes.distill import train as run

    opts = config_from(DistillTrainConfig, ctx.params, synthetic=comma_list(synthetic))
    if dry_run:
        train_dry_run(config, overrides, opts, world_size, gpu)
    else:
        run(config, overrides, opts)
