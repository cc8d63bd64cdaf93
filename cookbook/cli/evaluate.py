"""Evaluation commands: eval (perplexity, passkey and recall, lm-evaluation-harness tasks) and plot (loss curves,
retrieval accuracy)."""

from __future__ import annotations

from typing import Annotated

import typer

from cookbook.cli.common import (
    Device,
    Dtype,
    Load,
    comma_list,
    config_from,
    int_list,
    tokenizer_model_option,
    tokenizer_type_option,
)
from cookbook.errors import CookbookError
from cookbook.progress import out


def eval_(
    ctx: typer.Context,
    load: Load,
    ppl_files: Annotated[
        list[str] | None,
        typer.Option("--ppl-files", help="jsonl files to score (comma-separate or repeat).", rich_help_panel="Data"),
    ] = None,
    data_path: Annotated[
        list[str] | None,
        typer.Option("--data-path", help="Indexed dataset prefixes to score.", rich_help_panel="Data"),
    ] = None,
    seq_length: Annotated[
        str | None,
        typer.Option(
            "--seq-length",
            help="Context length(s), e.g. 4096,8192 (default: the model's).",
            rich_help_panel="Windows",
        ),
    ] = None,
    stride: Annotated[
        int | None,
        typer.Option(
            help="Score only the last STRIDE tokens of each overlapping window (default: no overlap).",
            rich_help_panel="Windows",
        ),
    ] = None,
    text_key: Annotated[str, typer.Option(help="The jsonl key holding the text.", rich_help_panel="Data")] = "text",
    append_eod: Annotated[
        bool,
        typer.Option(
            "--append-eod", help="End each document with EOD, as preprocess --append-eod did.", rich_help_panel="Data"
        ),
    ] = False,
    tokenizer_model: Annotated[str | None, tokenizer_model_option(panel="Data")] = None,
    tokenizer_type: Annotated[str | None, tokenizer_type_option(panel="Data")] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(help="Windows per forward (default 1); with --tasks, rows generated together (default 16)."),
    ] = None,
    device: Device = "auto",
    dtype: Dtype = "auto",
    dump_dir: Annotated[
        str | None,
        typer.Option(
            help="Also write DUMP_DIR/perplexity.json (passkey.json or recall.json with --passkey or --recall; with "
            "--tasks, lm-eval's DUMP_DIR/MODEL/results_*.json)."
        ),
    ] = None,
    tasks: Annotated[
        list[str] | None,
        typer.Option(
            "--tasks",
            help="lm-evaluation-harness tasks (comma-separate or repeat), run in this process; needs pip install "
            "'cookbook\\[eval]'.",
            rich_help_panel="Tasks",
        ),
    ] = None,
    include_path: Annotated[
        list[str] | None,
        typer.Option(
            "--include-path",
            help="Folders of task YAMLs over local data (nothing is downloaded).",
            rich_help_panel="Tasks",
        ),
    ] = None,
    num_fewshot: Annotated[
        int | None,
        typer.Option(help="Few-shot examples per prompt (default: each task's own).", rich_help_panel="Tasks"),
    ] = None,
    limit: Annotated[
        float | None,
        typer.Option(help="Documents per task at most (a fraction when below 1).", rich_help_panel="Tasks"),
    ] = None,
    max_gen_toks: Annotated[
        int,
        typer.Option(help="New tokens per generate_until request, unless the task sets it.", rich_help_panel="Tasks"),
    ] = 256,
    add_bos_token: Annotated[
        bool | None,
        typer.Option(
            "--add-bos-token/--no-add-bos-token",
            help="Begin every request with BOS or not (default: the tokenizer's own, as lm-eval's hf model).",
            rich_help_panel="Tasks",
        ),
    ] = None,
    log_samples: Annotated[
        bool,
        typer.Option(
            "--log-samples",
            help="With --dump-dir: also write each document's requests and answers.",
            rich_help_panel="Tasks",
        ),
    ] = False,
    passkey: Annotated[
        bool,
        typer.Option(
            "--passkey",
            help="Passkey retrieval accuracy per length and depth instead of perplexity.",
            rich_help_panel="Retrieval",
        ),
    ] = False,
    recall: Annotated[
        bool,
        typer.Option(
            "--recall",
            help="Key-value recall among --recall-keys named values, per length and depth, instead of perplexity.",
            rich_help_panel="Retrieval",
        ),
    ] = False,
    depths: Annotated[
        str,
        typer.Option(
            "--depths",
            "--passkey-depths",
            help="Where the asked key sits, as fractions of the filler.",
            rich_help_panel="Retrieval",
        ),
    ] = "0,0.25,0.5,0.75,1",
    trials: Annotated[
        int,
        typer.Option("--trials", "--passkey-trials", help="Prompts per length and depth.", rich_help_panel="Retrieval"),
    ] = 5,
    digits: Annotated[
        int, typer.Option("--digits", "--passkey-digits", help="Digits of each key.", rich_help_panel="Retrieval")
    ] = 5,
    recall_keys: Annotated[
        int, typer.Option(help="Named values in each --recall prompt (one asked).", rich_help_panel="Retrieval")
    ] = 4,
    plot: Annotated[
        str | None,
        typer.Option(
            help="With --passkey or --recall: also draw accuracy against length, a line per depth, to this PNG.",
            rich_help_panel="Retrieval",
        ),
    ] = None,
    attention: Annotated[
        bool,
        typer.Option(
            "--attention",
            help="With --passkey or --recall: also measure where each attention head looks while the key is written "
            "(its share on the needle and on the key's next token, against chance); a row per length and depth for "
            "the head that copies most, every head in the --dump-dir JSON.",
            rich_help_panel="Retrieval",
        ),
    ] = False,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed of the retrieval keys (default 0); with --tasks, of lm-eval's few-shot choice and sampling "
            "(default 1234)."
        ),
    ] = None,
) -> None:
    """Perplexity of a checkpoint on jsonl files or indexed data at one or more context lengths; --passkey or --recall retrieval; or --tasks of lm-evaluation-harness.

    Example: cookbook eval --load ckpt/tiny --ppl-files valid.jsonl --seq-length 256,512 --dump-dir eval/

    Passkey: cookbook eval --load ckpt/tiny-2x --passkey --seq-length 256,512 --trials 10 --plot passkey.png

    Recall: cookbook eval --load ckpt/tiny-2x --recall --recall-keys 4 --seq-length 256,512 --dump-dir eval/

    Tasks: cookbook eval --load ckpt/tiny --tasks my_mc,my_gen --include-path tasks/ --num-fewshot 5 --dump-dir eval/
    """
    from recipes.eval import (
        EvalConfig,
        render,
        render_attention,
        render_retrieval,
        render_tasks,
        run,
        run_retrieval,
        run_tasks,
    )

    if tasks:
        results, written = run_tasks(
            load,
            comma_list(tasks),
            include_path=list(include_path or []),
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size or 16,
            max_gen_toks=max_gen_toks,
            add_bos_token=add_bos_token,
            seed=1234 if seed is None else seed,
            log_samples=log_samples,
            output_path=dump_dir,
            tokenizer_model=tokenizer_model,
            tokenizer_type=tokenizer_type,
            device=device,
            dtype=dtype,
        )
        if results is not None:
            out.file.write(render_tasks(results) + "\n")
            if written:
                out.print(f"[green]wrote[/green] {written}")
        return

    if passkey and recall:
        raise CookbookError("--passkey and --recall are two evaluations; run one at a time")
    retrieval = "passkey" if passkey else "recall" if recall else None
    if plot and not retrieval:
        raise CookbookError("--plot draws retrieval accuracy; add --passkey or --recall (cookbook plot draws runs)")
    if attention and not retrieval:
        raise CookbookError("--attention measures where the heads look for a key; add --passkey or --recall")
    try:
        fractions = tuple(float(d) for d in depths.split(",") if d.strip())
    except ValueError:
        raise CookbookError(f"--depths {depths!r} is not a comma-separated list of fractions, e.g. 0,0.5,1") from None
    cfg = config_from(
        EvalConfig,
        ctx.params,
        ppl_files=comma_list(ppl_files),
        data_path=comma_list(data_path),
        seq_lengths=int_list(seq_length, "--seq-length"),
        batch_size=batch_size or 1,
        retrieval=retrieval,
        depths=fractions,
        seed=seed or 0,
    )
    if retrieval:
        trials, heads, written = run_retrieval(cfg)
        out.print(render_retrieval(trials, retrieval))
        if heads:
            out.print(render_attention(heads, retrieval))
    else:
        results, dumped = run(cfg)
        out.print(render(results))
        written = [dumped] if dumped else []
    for path in written:
        out.print(f"[green]wrote[/green] {path}")


def plot(
    runs: Annotated[
        list[str],
        typer.Argument(
            help="Save folders (their metrics.jsonl) or metrics.jsonl files; or retrieval results (passkey.json, recall.json)."
        ),
    ],
    output: Annotated[str, typer.Option("--output", "-o", help="The PNG to write.")] = "loss.png",
    label: Annotated[
        list[str] | None, typer.Option("--label", help="A legend label per run, in order (repeat).")
    ] = None,
    metric: Annotated[
        str, typer.Option(help="The metrics.jsonl field to draw: loss, ppl, grad_norm, lr, tokens_per_s, ...")
    ] = "loss",
    split: Annotated[str, typer.Option(help="train, valid or both.")] = "both",
    smooth: Annotated[int, typer.Option(help="Moving average over this many logged points (train curves).")] = 1,
    title: Annotated[str | None, typer.Option(help="The figure title.")] = None,
    log_y: Annotated[bool, typer.Option("--log-y", help="Logarithmic y axis.")] = False,
) -> None:
    """Draw the loss curves of several runs in one PNG (matplotlib), or their retrieval accuracy by context length.

    Example: cookbook plot ckpt/tiny-2x-pi ckpt/tiny-2x-nopi --label "with PI" --label "without PI" -o extend.png

    Retrieval: cookbook plot eval-pi/passkey.json eval-yarn/passkey.json --label PI --label YaRN -o passkey.png
    """
    from recipes.plot import plot as draw

    path = draw(runs, output, label, metric, split, smooth, title, log_y)
    out.print(f"[green]wrote[/green] {path}")
