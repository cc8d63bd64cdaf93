"""``cookbook generate``: sample continuations of prompts from a checkpoint (the generation core is
``cookbook.inference``'s)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cookbook.errors import CookbookError
from cookbook.inference.sampling import SamplingParams

# --------------------------------------------------------------------------- the command


@dataclass
class GenerateConfig:
    load: str  # a cookbook checkpoint or a Hugging Face model folder
    prompts: list[str]  # given on the command line
    prompts_file: str | None = None  # jsonl ({"text": ...} per line) or plain text (one prompt per line)
    text_key: str = "text"
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    batch_size: int = 8
    tokenizer_model: str | None = None
    tokenizer_type: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    output: str | None = None  # jsonl of {"prompt", "text"}; default: print


def read_prompts(cfg: GenerateConfig) -> list[str]:
    prompts = list(cfg.prompts)
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise CookbookError(f"--prompts-file {path} does not exist")
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if path.suffix == ".jsonl":
            for n, line in enumerate(lines, 1):
                try:
                    prompts.append(json.loads(line)[cfg.text_key])
                except (ValueError, KeyError, TypeError):
                    raise CookbookError(f"{path}:{n} is not a JSON object with a {cfg.text_key!r} key") from None
        else:
            prompts += lines
    if not prompts:
        raise CookbookError("no prompts; pass --prompt TEXT or --prompts-file FILE")
    return prompts


def run(cfg: GenerateConfig, on_result=None) -> list[dict]:
    """Generate for every prompt, ``batch_size`` at a time, each prompt sampled with ``cfg.seed`` (the same prompt
    gives the same text wherever it stands in the list); ``on_result(record)`` as each finishes."""
    from cookbook.fileio import check_writable, write_text_atomic
    from cookbook.inference.generator import LocalGenerator
    from cookbook.progress import console

    params = SamplingParams(
        max_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k or 0,
        top_p=1.0 if cfg.top_p is None else cfg.top_p,
    )
    params.check()
    if cfg.batch_size < 1:
        raise CookbookError(f"--batch-size {cfg.batch_size} must be at least 1")
    if cfg.output:
        check_writable(cfg.output, "--output")
    prompts = read_prompts(cfg)
    generator = LocalGenerator.load(cfg.load, cfg.device, cfg.dtype, cfg.tokenizer_model, cfg.tokenizer_type)
    records = []
    with Progress(
        TextColumn("[bold]generate"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task("generate", total=len(prompts))
        for start in range(0, len(prompts), cfg.batch_size):
            chunk = prompts[start : start + cfg.batch_size]
            done = generator.complete(chunk, params, [cfg.seed] * len(chunk), cfg.batch_size)
            for prompt, (completion,) in zip(chunk, done):
                record = {"prompt": prompt, "text": completion.text, "tokens": completion.tokens}
                records.append(record)
                if on_result is not None:
                    on_result(record)
            progress.advance(task, len(chunk))
    if cfg.output:
        write_text_atomic(cfg.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records


def print_record(record: dict) -> None:
    """One generation as ``cookbook generate`` prints it when it finishes: a rule titled by the prompt, then the
    prompt and its continuation verbatim."""
    from rich.markup import escape

    from cookbook.progress import out

    out.rule(escape(record["prompt"][:60]))
    out.file.write(record["prompt"] + record["text"] + "\n")
    out.file.flush()
