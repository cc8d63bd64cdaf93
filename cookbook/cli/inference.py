"""Inference commands: generate (sample from a checkpoint) and serve (an OpenAI-compatible server)."""

from __future__ import annotations

from typing import Annotated

import typer

from cookbook.cli.common import Device, Dtype, Load, config_from, tokenizer_model_option, tokenizer_type_option
from cookbook.progress import out

TokenizerModel = Annotated[str | None, tokenizer_model_option()]
TokenizerType = Annotated[str | None, tokenizer_type_option()]


def generate(
    ctx: typer.Context,
    load: Load,
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", "-p", help="A prompt (repeatable).", rich_help_panel="Prompts")
    ] = None,
    prompts_file: Annotated[
        str | None,
        typer.Option(
            help='Prompts: jsonl (one {"text": ...} per line) or text (one per line).', rich_help_panel="Prompts"
        ),
    ] = None,
    text_key: Annotated[str, typer.Option(help="The jsonl key holding a prompt.", rich_help_panel="Prompts")] = "text",
    max_new_tokens: Annotated[
        int, typer.Option(help="Tokens to generate per prompt.", rich_help_panel="Sampling")
    ] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.", rich_help_panel="Sampling")] = 0.8,
    top_k: Annotated[
        int | None, typer.Option(help="Sample among the K most likely tokens.", rich_help_panel="Sampling")
    ] = None,
    top_p: Annotated[
        float | None,
        typer.Option(help="Sample among the most likely tokens holding probability P.", rich_help_panel="Sampling"),
    ] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.", rich_help_panel="Sampling")] = 0,
    batch_size: Annotated[int, typer.Option(help="Prompts per batch.")] = 8,
    tokenizer_model: TokenizerModel = None,
    tokenizer_type: TokenizerType = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    output: Annotated[
        str | None,
        typer.Option("--output", "-o", help="Write jsonl {prompt, text, tokens} here instead of printing."),
    ] = None,
) -> None:
    """Sample continuations of prompts from a checkpoint (KV cache; temperature, top-k, top-p).

    Example: cookbook generate --load ckpt/tiny --prompt "def main(" --max-new-tokens 64 --temperature 0
    """
    from recipes.generate import GenerateConfig, print_record, run

    records = run(config_from(GenerateConfig, ctx.params, prompts=list(prompt or [])), None if output else print_record)
    if output:
        out.print(f"[green]wrote[/green] {len(records)} generations to {output}")


def serve(
    ctx: typer.Context,
    load: Annotated[str, typer.Option("--load", help="A cookbook checkpoint or a Hugging Face model folder.")],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0 picks a free one).")] = 8000,
    served_model_name: Annotated[
        str | None,
        typer.Option("--served-model-name", help="The model's name in the API (default: the folder's name)."),
    ] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    max_batch_size: Annotated[
        int,
        typer.Option(
            "--max-batch-size",
            "--batch-size",
            help="Rows (prompts x n, of every request in flight) decoded together; requests join and leave the "
            "running batch at each step.",
        ),
    ] = 32,
    kv_cache_tokens: Annotated[
        int | None,
        typer.Option(
            help="KV cache size in tokens (rows x length; default: max-batch-size x max-model-len, capped by 90% of "
            "free GPU memory).",
            rich_help_panel="Limits",
        ),
    ] = None,
    request_timeout: Annotated[
        float | None,
        typer.Option(
            help="Seconds a request may take before it is cancelled (408); default: no limit.", rich_help_panel="Limits"
        ),
    ] = None,
    max_prompts: Annotated[
        int, typer.Option(help="Prompts per request at most (and the largest n).", rich_help_panel="Limits")
    ] = 64,
    max_tokens_limit: Annotated[
        int, typer.Option(help="The largest max_tokens a request may ask for.", rich_help_panel="Limits")
    ] = 4096,
    max_model_len: Annotated[
        int | None,
        typer.Option(help="Prompt + max_tokens at most (default: the model's context).", rich_help_panel="Limits"),
    ] = None,
    max_request_bytes: Annotated[
        int, typer.Option(help="Request bodies larger than this are refused (413).", rich_help_panel="Limits")
    ] = 1_000_000,
    tokenizer_model: TokenizerModel = None,
    tokenizer_type: TokenizerType = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No line per request.")] = False,
) -> None:
    """Serve a checkpoint over an OpenAI-compatible HTTP API with continuous batching (/v1/completions with logprobs, echo and streaming; /v1/models, /tokenize, /detokenize, /tokenizer_info, /health), as vLLM does.

    Example: cookbook serve --load ckpt/tiny --port 8000   (then: cookbook distill generate --backend openai --endpoint http://localhost:8000 ..., or lm_eval --model local-completions --model_args base_url=http://localhost:8000/v1/completions,model=tiny ...)
    """
    from inference_distill.server import ServeConfig
    from inference_distill.server import serve as run

    run(config_from(ServeConfig, ctx.params, model_name=served_model_name, log_requests=not quiet))
