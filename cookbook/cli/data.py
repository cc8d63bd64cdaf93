"""Data commands: sample-corpus, tokenizer train, preprocess, merge, data info."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from cookbook.cli.common import (
    TOKENIZER_FILE_HELP,
    comma_list,
    config_from,
    tokenizer_model_option,
    tokenizer_type_option,
)
from cookbook.errors import CookbookError
from cookbook.progress import console, out


def sample_corpus(
    output: Annotated[Path, typer.Argument(help="The jsonl file to write.")],
    max_mb: Annotated[float | None, typer.Option(help="Stop after about this many MB of text.")] = None,
) -> None:
    """Write a sample corpus (the Python standard library's sources, ~30 MB) to a jsonl file; nothing is downloaded.

    Example: cookbook sample-corpus corpus.jsonl
    """
    from cookbook.data.sample_corpus import write_sample_corpus

    docs, size = write_sample_corpus(output, max_mb)
    out.print(f"[green]wrote[/green] {output}: {docs:,} documents, {size / 1e6:,.1f} MB of text")


def tokenizer_train(
    ctx: typer.Context,
    input: Annotated[
        list[str], typer.Option("--input", "-i", help="jsonl file(s), glob or folder (repeat or comma-separate).")
    ],
    output: Annotated[str, typer.Option("--output", "-o", help="SentencePiece: the .model path; hf-bpe: a folder.")],
    kind: Annotated[
        str, typer.Option(help="sentencepiece (Llama 2 style) or hf-bpe (Llama 3 style byte-level BPE).")
    ] = "sentencepiece",
    model_type: Annotated[str, typer.Option(help="SentencePiece algorithm: bpe or unigram.")] = "bpe",
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size.")] = 8000,
    normalization: Annotated[
        str, typer.Option(help="SentencePiece normalization rule: identity (Llama 2), nmt_nfkc, nfkc.")
    ] = "identity",
    json_key: Annotated[str, typer.Option(help="The jsonl key holding the text.")] = "text",
    max_documents: Annotated[int | None, typer.Option(help="Train on the first N documents only.")] = None,
    special_tokens: Annotated[
        list[str] | None, typer.Option("--special-token", help="Extra special tokens (repeatable).")
    ] = None,
) -> None:
    """Train a SentencePiece (BPE/unigram, byte fallback) or Hugging Face BPE tokenizer on jsonl.

    Example: cookbook tokenizer train --input corpus.jsonl --output tok.model --vocab-size 8000
    """
    from cookbook.data.tokenizer_train import TokenizerTrainConfig, train_tokenizer

    cfg = config_from(
        TokenizerTrainConfig, ctx.params, inputs=comma_list(input), special_tokens=list(special_tokens or [])
    )
    with console.status(f"training a {kind} tokenizer ({vocab_size:,} tokens)"):
        path = train_tokenizer(cfg)
    out.print(f"[green]wrote[/green] {path}  (use it as --tokenizer-model {path})")


def preprocess(
    ctx: typer.Context,
    input: Annotated[
        list[str],
        typer.Option(
            "--input",
            "-i",
            help="Files (.jsonl[.gz|.zst], .parquet, .arrow), saved datasets (folders), globs, folders of them, "
            "or - for jsonl on stdin (repeat or comma-separate).",
            rich_help_panel="Input",
        ),
    ],
    output_prefix: Annotated[
        str,
        typer.Option("--output-prefix", "-o", help="Writes PREFIX_<key>_document.bin/.idx.", rich_help_panel="Output"),
    ],
    tokenizer_model: Annotated[
        str | None, tokenizer_model_option(TOKENIZER_FILE_HELP, panel="Tokenizer", short=True)
    ] = None,
    tokenizer_type: Annotated[str | None, tokenizer_type_option(panel="Tokenizer")] = None,
    vocab_file: Annotated[
        str | None, typer.Option(help="GPT2BPETokenizer: vocab.json.", rich_help_panel="Tokenizer")
    ] = None,
    merge_file: Annotated[
        str | None, typer.Option(help="GPT2BPETokenizer: merges.txt.", rich_help_panel="Tokenizer")
    ] = None,
    json_keys: Annotated[
        list[str] | None,
        typer.Option(
            "--json-keys",
            help="Keys (parquet/Arrow: columns) to tokenize, one dataset each (default: text).",
            rich_help_panel="Input",
        ),
    ] = None,
    append_eod: Annotated[
        bool,
        typer.Option(
            "--append-eod",
            help="Append the tokenizer's end-of-document id to each non-empty document.",
            rich_help_panel="Tokenizer",
        ),
    ] = False,
    workers: Annotated[
        int, typer.Option("--workers", "-w", help="Tokenizer threads.", rich_help_panel="Performance")
    ] = max(1, os.cpu_count() or 1),
    skip_bad_lines: Annotated[
        bool,
        typer.Option(
            "--skip-bad-lines",
            help="Skip bad lines and rows (not JSON objects with the keys, null or non-text values), and count them; "
            "default: stop at the first.",
            rich_help_panel="Input",
        ),
    ] = False,
    tokenizer_backend: Annotated[
        str,
        typer.Option(
            help="auto (gigatoken where it is exact), gigatoken, or reference (sentencepiece/tokenizers only).",
            rich_help_panel="Performance",
        ),
    ] = "auto",
    partitions: Annotated[
        int,
        typer.Option(
            "--partitions",
            help="Split the inputs into N contiguous partitions, written one by one to PREFIX_<key>_document.parts/ "
            "and merged; a rerun of the same command reuses the finished ones.",
            rich_help_panel="Partitions",
        ),
    ] = 1,
    partition_index: Annotated[
        int | None,
        typer.Option(
            "--partition-index",
            help="Do only partition I of --partitions N (one SLURM array task); then cookbook merge the parts folder.",
            rich_help_panel="Partitions",
        ),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs",
            "-j",
            help="Partitions written at once, each in its own process with --workers/--jobs tokenizer threads "
            "(for many cores).",
            rich_help_panel="Partitions",
        ),
    ] = 1,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Tokenize a corpus (jsonl, parquet, Arrow) into a Megatron indexed dataset, byte-identical to Megatron-LM's preprocess_data.py.

    Example: cookbook preprocess --input corpus.jsonl --output-prefix data/corpus --tokenizer-model tok.model --append-eod
    """
    from recipes.preprocess import PreprocessConfig, render, run

    cfg = config_from(
        PreprocessConfig, ctx.params, inputs=comma_list(input), json_keys=comma_list(json_keys) or ["text"]
    )
    for part in render(run(cfg, show_progress=not quiet), cfg):
        out.print(part)


def merge(
    input: Annotated[
        list[str],
        typer.Option(
            "--input", "-i", help="A folder of .bin/.idx pairs, or dataset prefixes (repeat or comma-separate)."
        ),
    ],
    output_prefix: Annotated[str, typer.Option("--output-prefix", "-o", help="Writes PREFIX.bin/.idx.")],
) -> None:
    """Merge indexed datasets into one, byte-identical to Megatron-LM's merge_datasets.py.

    Example: cookbook merge --input data/ --output-prefix data/all
    """
    from recipes.merge import render, run

    out.print(render(run(comma_list(input), output_prefix)))


def data_info(
    prefix: Annotated[str, typer.Argument(help="Dataset prefix (PREFIX.bin/.idx).")],
    decode: Annotated[int, typer.Option(help="Print the first N documents back as text (needs --tokenizer).")] = 0,
    tokenizer_model: Annotated[str | None, tokenizer_model_option(TOKENIZER_FILE_HELP, short=True)] = None,
    tokenizer_type: Annotated[str | None, tokenizer_type_option()] = None,
) -> None:
    """Documents, tokens, dtype, token id range and a document-length histogram of an indexed dataset.

    Example: cookbook data info data/corpus_text_document --decode 1 --tokenizer tok.model
    """
    from cookbook.data.indexed import dataset_prefix
    from recipes.data_info import info, print_documents, render

    prefix = dataset_prefix(prefix)
    if decode and not tokenizer_model:
        raise CookbookError("--decode needs --tokenizer PATH, the tokenizer the dataset was made with")
    for table in render(info(prefix)):
        out.print(table)
    if decode:
        print_documents(prefix, tokenizer_model, tokenizer_type, decode)
