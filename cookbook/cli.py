"""The ``cookbook`` command line: one command per recipe, each a thin call into ``recipes/``.

A ``CookbookError`` is printed as one red line and exits with code 2 (``--debug``, before or after the command,
shows the traceback); so is an output the system cannot write (a read-only or full disk). Ctrl-C and SIGTERM exit
with 130 and one line saying what was kept. Commands are registered only when they work.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Optional, get_args, get_origin

import typer
from rich.markup import escape
from rich.table import Table

from cookbook import __version__, help as help_screens
from cookbook.checks import check_number
from cookbook.errors import CookbookError, Interrupted, interrupt_note
from cookbook.progress import console, out

help_screens.install()  # flag names never cut at 80 columns (cookbook/help.py)

EXAMPLES = """\
[bold]Examples[/bold]

  cookbook sample-corpus corpus.jsonl
  cookbook tokenizer train --input corpus.jsonl --output tok.model --vocab-size 8000
  cookbook preprocess --input corpus.jsonl --output-prefix data/corpus --tokenizer-model tok.model --append-eod
  cookbook merge --input data/ --output-prefix data/all
  cookbook data info data/corpus_text_document --decode 1 --tokenizer tok.model
  cookbook convert --from hf --to cookbook --load-dir Llama-2-7b-hf --save-dir ckpt/llama2-7b
  cookbook pretrain --preset tiny --data-path data/corpus_text_document --tokenizer-model tok.model --save ckpt/tiny
  cookbook prune --load ckpt/tiny --hidden-size-remain 128 --drop-layers 1 --calib-data data/corpus_text_document --save ckpt/tiny-pruned
  cookbook extend --load ckpt/tiny --interp-factor 2 --data-path data/corpus_text_document --train-iters 100 --save ckpt/tiny-2x
  cookbook plan --preset llama-65b --seq-length 4096 --num-gpus 128
  cookbook eval --load ckpt/tiny --ppl-files valid.jsonl --seq-length 256,512
  cookbook generate --load ckpt/tiny --prompt "def main(" --temperature 0
  cookbook serve --load ckpt/tiny --port 8000
  cookbook distill generate --teacher ckpt/big --prompts-from data/corpus_text_document --max-tokens 512 --output synth/
  cookbook distill train --load ckpt/tiny --synthetic synth/ --data-path data/corpus_text_document --save ckpt/tiny-distilled
  cookbook plot ckpt/tiny ckpt/tiny-2x --label base --label extended -o loss.png
"""

app = typer.Typer(
    name="cookbook",
    help="The whole life of a Llama-family model on one PyTorch-native engine.\n\n" + EXAMPLES,
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(help="Inspect indexed datasets.", no_args_is_help=True, rich_markup_mode="rich")
tokenizer_app = typer.Typer(help="Train tokenizers offline.", no_args_is_help=True, rich_markup_mode="rich")
app.add_typer(data_app, name="data", help="Inspect indexed datasets: cookbook data info PREFIX")
app.add_typer(tokenizer_app, name="tokenizer", help="Train a tokenizer: cookbook tokenizer train --input X --output Y")
distill_app = typer.Typer(help="Distil a teacher into a student: synthetic data, then training.", no_args_is_help=True, rich_markup_mode="rich")
app.add_typer(distill_app, name="distill", help="Distil a teacher: cookbook distill generate ..., then cookbook distill train ...")

_debug = bool(os.environ.get("COOKBOOK_DEBUG"))


def _version(value: bool) -> None:
    if value:
        out.print(f"cookbook {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback when a command fails.")] = False,
) -> None:
    global _debug
    _debug = _debug or debug


def _split(values: list[str] | None) -> list[str]:
    """Repeated options and comma-separated lists both work: -k a -k b, or -k a,b."""
    return [v for item in values or [] for v in item.split(",") if v]


# --------------------------------------------------------------------------- sample-corpus


@app.command("sample-corpus")
def sample_corpus(
    output: Annotated[Path, typer.Argument(help="The jsonl file to write.")],
    max_mb: Annotated[Optional[float], typer.Option(help="Stop after about this many MB of text.")] = None,
) -> None:
    """Write a sample corpus (the Python standard library's sources, ~30 MB) to a jsonl file; nothing is downloaded.

    Example: cookbook sample-corpus corpus.jsonl
    """
    from cookbook.data.sample_corpus import write_sample_corpus

    docs, size = write_sample_corpus(output, max_mb)
    out.print(f"[green]wrote[/green] {output}: {docs:,} documents, {size / 1e6:,.1f} MB of text")


# --------------------------------------------------------------------------- tokenizer train


@tokenizer_app.command("train")
def tokenizer_train(
    input: Annotated[list[str], typer.Option("--input", "-i", help="jsonl file(s), glob or folder (repeat or comma-separate).")],
    output: Annotated[str, typer.Option("--output", "-o", help="SentencePiece: the .model path; hf-bpe: a folder.")],
    kind: Annotated[str, typer.Option(help="sentencepiece (Llama 2 style) or hf-bpe (Llama 3 style byte-level BPE).")] = "sentencepiece",
    model_type: Annotated[str, typer.Option(help="SentencePiece algorithm: bpe or unigram.")] = "bpe",
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size.")] = 8000,
    normalization: Annotated[str, typer.Option(help="SentencePiece normalization rule: identity (Llama 2), nmt_nfkc, nfkc.")] = "identity",
    json_key: Annotated[str, typer.Option(help="The jsonl key holding the text.")] = "text",
    max_documents: Annotated[Optional[int], typer.Option(help="Train on the first N documents only.")] = None,
    special_tokens: Annotated[Optional[list[str]], typer.Option("--special-token", help="Extra special tokens (repeatable).")] = None,
) -> None:
    """Train a SentencePiece (BPE/unigram, byte fallback) or Hugging Face BPE tokenizer on jsonl.

    Example: cookbook tokenizer train --input corpus.jsonl --output tok.model --vocab-size 8000
    """
    from cookbook.data.tokenizer_train import TokenizerTrainConfig, train_tokenizer

    cfg = TokenizerTrainConfig(
        inputs=_split(input), output=output, kind=kind, model_type=model_type, vocab_size=vocab_size,
        normalization=normalization, json_key=json_key, max_documents=max_documents, special_tokens=list(special_tokens or []),
    )
    with console.status(f"training a {kind} tokenizer ({vocab_size:,} tokens)"):
        path = train_tokenizer(cfg)
    out.print(f"[green]wrote[/green] {path}  (use it as --tokenizer-model {path})")


# --------------------------------------------------------------------------- preprocess

TOKENIZER_HELP = "SentencePiece .model, or a Hugging Face tokenizer.json / folder."
DTYPE_HELP = "auto (bf16 where the device computes it natively, else fp32), bf16 or fp32."  # cookbook/engine/precision.py
TYPE_HELP = "Megatron-LM's name: Llama2Tokenizer, SentencePieceTokenizer, HuggingFaceTokenizer, GPT2BPETokenizer (default: from the file)."


@app.command()
def preprocess(
    input: Annotated[list[str], typer.Option("--input", "-i", help="Files (.jsonl[.gz|.zst], .parquet, .arrow), saved datasets (folders), globs, folders of them, or - for jsonl on stdin (repeat or comma-separate).", rich_help_panel="Input")],
    output_prefix: Annotated[str, typer.Option("--output-prefix", "-o", help="Writes PREFIX_<key>_document.bin/.idx.", rich_help_panel="Output")],
    tokenizer_model: Annotated[Optional[str], typer.Option("--tokenizer-model", "--tokenizer", "-t", help=TOKENIZER_HELP, rich_help_panel="Tokenizer")] = None,
    tokenizer_type: Annotated[Optional[str], typer.Option(help=TYPE_HELP, rich_help_panel="Tokenizer")] = None,
    vocab_file: Annotated[Optional[str], typer.Option(help="GPT2BPETokenizer: vocab.json.", rich_help_panel="Tokenizer")] = None,
    merge_file: Annotated[Optional[str], typer.Option(help="GPT2BPETokenizer: merges.txt.", rich_help_panel="Tokenizer")] = None,
    json_keys: Annotated[Optional[list[str]], typer.Option("--json-keys", help="Keys (parquet/Arrow: columns) to tokenize, one dataset each (default: text).", rich_help_panel="Input")] = None,
    append_eod: Annotated[bool, typer.Option("--append-eod", help="Append the tokenizer's end-of-document id to each non-empty document.", rich_help_panel="Tokenizer")] = False,
    workers: Annotated[int, typer.Option("--workers", "-w", help="Tokenizer threads.", rich_help_panel="Performance")] = max(1, os.cpu_count() or 1),
    skip_bad_lines: Annotated[bool, typer.Option("--skip-bad-lines", help="Skip bad lines and rows (not JSON objects with the keys, null or non-text values), and count them; default: stop at the first.", rich_help_panel="Input")] = False,
    tokenizer_backend: Annotated[str, typer.Option(help="auto (gigatoken where it is exact), gigatoken, or reference (sentencepiece/tokenizers only).", rich_help_panel="Performance")] = "auto",
    partitions: Annotated[int, typer.Option("--partitions", help="Split the inputs into N contiguous partitions, written one by one to PREFIX_<key>_document.parts/ and merged; a rerun of the same command reuses the finished ones.", rich_help_panel="Partitions")] = 1,
    partition_index: Annotated[Optional[int], typer.Option("--partition-index", help="Do only partition I of --partitions N (one SLURM array task); then cookbook merge the parts folder.", rich_help_panel="Partitions")] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Partitions written at once, each in its own process with --workers/--jobs tokenizer threads (for many cores).", rich_help_panel="Partitions")] = 1,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Tokenize a corpus (jsonl, parquet, Arrow) into a Megatron indexed dataset, byte-identical to Megatron-LM's preprocess_data.py.

    Example: cookbook preprocess --input corpus.jsonl --output-prefix data/corpus --tokenizer-model tok.model --append-eod
    """
    from recipes.preprocess import PreprocessConfig, run

    cfg = PreprocessConfig(
        inputs=_split(input), output_prefix=output_prefix, tokenizer_model=tokenizer_model,
        tokenizer_type=tokenizer_type, vocab_file=vocab_file, merge_file=merge_file,
        json_keys=_split(json_keys) or ["text"], append_eod=append_eod, workers=workers,
        skip_bad_lines=skip_bad_lines, tokenizer_backend=tokenizer_backend, partitions=partitions,
        partition_index=partition_index, jobs=jobs,
    )
    s = run(cfg, show_progress=not quiet)
    table = Table(title="preprocess", show_header=False, title_justify="left")
    rows = [
        ("documents", f"{s.documents:,}"),
        ("sequences", f"{s.sequences:,}"),
        ("tokens", f"{s.tokens:,}"),
        ("empty documents", f"{s.empty:,}"),
        ("skipped lines", f"{s.skipped_rows:,}"),
        ("input", f"{s.bytes / 1e6:,.1f} MB"),
        ("time", f"{s.seconds:,.2f} s  ({s.documents / max(s.seconds, 1e-9):,.0f} docs/s, "
                 f"{s.bytes / 1e6 / max(s.seconds, 1e-9):,.1f} MB/s, {s.tokens / max(s.seconds, 1e-9):,.0f} tokens/s)"),
        ("tokenizer", s.tokenizer),
    ]
    if partitions > 1:
        rows.append(("partitions", f"{s.partitions_done:,} written, {s.partitions_reused:,} reused from an earlier run"))
    rows += [(f"input {escape(name)}", f"{c.documents:,} documents, {c.skipped:,} skipped, {c.bytes / 1e6:,.1f} MB")
             for name, c in s.inputs.items()]
    rows += [(f"output ({key})", f"{prefix}.bin/.idx") for key, prefix in s.outputs.items()]
    for row in rows:
        table.add_row(*row)
    out.print(table)
    for where in s.skipped[:5]:
        out.print(f"[yellow]skipped[/yellow] {escape(where)}")
    if s.skipped_rows > 5:
        out.print(f"[yellow]... and {s.skipped_rows - 5:,} more skipped lines[/yellow]")


# --------------------------------------------------------------------------- merge


@app.command()
def merge(
    input: Annotated[list[str], typer.Option("--input", "-i", help="A folder of .bin/.idx pairs, or dataset prefixes (repeat or comma-separate).")],
    output_prefix: Annotated[str, typer.Option("--output-prefix", "-o", help="Writes PREFIX.bin/.idx.")],
) -> None:
    """Merge indexed datasets into one, byte-identical to Megatron-LM's merge_datasets.py.

    Example: cookbook merge --input data/ --output-prefix data/all
    """
    from recipes.merge import run

    s = run(_split(input), output_prefix)
    out.print(
        f"[green]merged[/green] {len(s.prefixes)} dataset{'s' if len(s.prefixes) != 1 else ''} into {s.output_prefix}.bin/.idx: "
        f"{s.documents:,} documents, {s.sequences:,} sequences, {s.tokens:,} tokens ({s.dtype})"
    )


# --------------------------------------------------------------------------- data info


@data_app.command("info")
def data_info(
    prefix: Annotated[str, typer.Argument(help="Dataset prefix (PREFIX.bin/.idx).")],
    decode: Annotated[int, typer.Option(help="Print the first N documents back as text (needs --tokenizer).")] = 0,
    tokenizer_model: Annotated[Optional[str], typer.Option("--tokenizer", "--tokenizer-model", "-t", help=TOKENIZER_HELP)] = None,
    tokenizer_type: Annotated[Optional[str], typer.Option(help=TYPE_HELP)] = None,
) -> None:
    """Documents, tokens, dtype, token id range and a document-length histogram of an indexed dataset.

    Example: cookbook data info data/corpus_text_document --decode 1 --tokenizer tok.model
    """
    from recipes.data_info import decode_documents, histogram, info

    prefix = prefix[:-4] if prefix.endswith((".bin", ".idx")) else prefix
    if decode and not tokenizer_model:
        raise CookbookError("--decode needs --tokenizer PATH, the tokenizer the dataset was made with")
    d = info(prefix)
    table = Table(title=prefix, show_header=False, title_justify="left")
    for name, value in [
        ("documents", f"{d.documents:,}"), ("sequences", f"{d.sequences:,}"), ("tokens", f"{d.tokens:,}"),
        ("dtype", d.dtype), ("token ids", "none" if d.min_id is None else f"{d.min_id} .. {d.max_id}"),
        ("empty documents", f"{d.empty_documents:,}"),
        ("tokens / document", f"mean {d.tokens / max(d.documents, 1):,.1f}, max {int(d.document_lengths.max()) if d.documents else 0:,}"),
    ]:
        table.add_row(name, value)
    out.print(table)
    buckets = histogram(d.document_lengths)
    if buckets:
        hist = Table(title="document length (tokens)", title_justify="left")
        hist.add_column("tokens", justify="right")
        hist.add_column("documents", justify="right")
        hist.add_column("")
        peak = max(c for _, _, c in buckets) or 1
        for lo, hi, c in buckets:
            hist.add_row(f"{lo:,} - {hi:,}", f"{c:,}", "[cyan]" + "█" * max(0, round(40 * c / peak)))
        out.print(hist)
    if decode:
        from cookbook.data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_model, tokenizer_type)
        for i, text in enumerate(decode_documents(prefix, tok, decode)):
            out.rule(f"document {i}")
            out.file.write(text if text.endswith("\n") else text + "\n")  # verbatim: no wrapping
            out.file.flush()


# --------------------------------------------------------------------------- convert


@app.command()
def convert(
    source: Annotated[str, typer.Option("--from", help="The format of --load-dir: hf, cookbook or megatron.", rich_help_panel="Formats")],
    target: Annotated[str, typer.Option("--to", help="The format to write: hf, cookbook or megatron.", rich_help_panel="Formats")],
    load_dir: Annotated[str, typer.Option("--load-dir", help="A Hugging Face folder, a cookbook save (folder or step_*), or a Megatron-LM checkpoint folder.", rich_help_panel="Formats")],
    save_dir: Annotated[str, typer.Option("--save-dir", help="The folder to write (refused if it exists, unless --overwrite).", rich_help_panel="Formats")],
    tp: Annotated[int, typer.Option("--tp", "--target-tensor-parallel-size", help="--to megatron: tensor-parallel size.", rich_help_panel="Megatron-LM")] = 1,
    pp: Annotated[int, typer.Option("--pp", "--target-pipeline-parallel-size", help="--to megatron: pipeline-parallel size.", rich_help_panel="Megatron-LM")] = 1,
    make_vocab_size_divisible_by: Annotated[int, typer.Option("--make-vocab-size-divisible-by", help="--to megatron: pad the vocabulary to a multiple of this x TP.", rich_help_panel="Megatron-LM")] = 128,
    transformer_impl: Annotated[str, typer.Option("--transformer-impl", help="--to megatron: layer names of transformer_engine (Megatron-LM's default) or local.", rich_help_panel="Megatron-LM")] = "transformer_engine",
    ckpt_format: Annotated[str, typer.Option("--ckpt-format", help="--to megatron: torch (mp_rank_* files) or torch_dist (Megatron-LM's default, resharded when loaded); --from megatron reads either.", rich_help_panel="Megatron-LM")] = "torch",
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="Store the weights as bf16, fp16 or fp32 (default: as the source stores them).")] = None,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="--to hf: the largest safetensors shard, e.g. 5GB.")] = "5GB",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --save-dir if it exists (only once the new one is complete).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Convert a checkpoint between Hugging Face, cookbook and Megatron-LM, resharding TP/PP, one layer in memory.

    Example: cookbook convert --from hf --to megatron --load-dir Llama-2-7b-hf --save-dir megatron/llama2-7b --tp 4 --pp 2
    """
    from recipes.convert import ConvertConfig, run

    cfg = ConvertConfig(
        source=source, target=target, load_dir=load_dir, save_dir=save_dir, tp=tp, pp=pp, dtype=dtype,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by, transformer_impl=transformer_impl,
        ckpt_format=ckpt_format, max_shard_size=max_shard_size, overwrite=overwrite,
    )
    r = run(cfg, show_progress=not quiet)
    out.print(
        f"[green]converted[/green] {escape(r.source)} ({r.params / 1e6:,.1f}M parameters) to {target} in {escape(str(r.save_dir))}: "
        f"{r.tensors:,} tensors, {r.bytes / 1e9:,.2f} GB in {r.seconds:,.1f} s"
    )
    for note in r.notes:
        out.print(f"[yellow]note:[/yellow] {escape(note)}")


# --------------------------------------------------------------------------- training flags
# One table of flags shared by every command that trains (pretrain, extend, distill train, heal):
# (flag and aliases, config section, field, type, help). Names follow Megatron-LM.

TRAINING_FLAGS = [
    # model
    (("--preset",), "model", "preset", str, "Model preset: tiny, llama2-7b, llama2-13b, llama3-8b, llama-31b/65b/108b/132b."),
    (("--num-layers",), "model", "num_layers", int, "Transformer layers."),
    (("--hidden-size",), "model", "hidden_size", int, "Hidden size."),
    (("--num-attention-heads",), "model", "num_heads", int, "Attention heads."),
    (("--num-query-groups",), "model", "num_kv_heads", int, "Key/value heads (grouped-query attention)."),
    (("--ffn-hidden-size",), "model", "intermediate_size", int, "SwiGLU hidden size."),
    (("--max-position-embeddings",), "model", "max_seq_len", int, "The context the model is trained for."),
    (("--rotary-base",), "model", "rope_theta", float, "RoPE base theta."),
    (("--vocab-size",), "model", "vocab_size", int, "Vocabulary size (default: the tokenizer's, padded)."),
    (("--norm-epsilon",), "model", "norm_eps", float, "RMSNorm epsilon."),
    (("--init-method-std",), "model", "init_std", float, "Std of the normal initialisation."),
    (("--tie-embeddings/--untie-embeddings-and-output-weights",), "model", "tie_embeddings", bool, "Share the embedding and output weights."),
    (("--add-qkv-bias/--no-qkv-bias",), "model", "qkv_bias", bool, "Bias on q, k, v (Qwen2 style)."),
    # data
    (("--data-path",), "data", "data_path", str, "PREFIX, or weight-prefix pairs: --data-path 0.3 A 0.7 B."),
    (("--split",), "data", "split", str, "Train/valid/test split of each dataset, e.g. 969,30,1."),
    (("--seq-length",), "data", "seq_length", int, "Tokens per sample."),
    (("--tokenizer-model", "--tokenizer"), "data", "tokenizer_model", str, "The tokenizer the data was made with (kept with checkpoints)."),
    (("--tokenizer-type",), "data", "tokenizer_type", str, "Megatron-LM tokenizer type (default: from the file)."),
    (("--make-vocab-size-divisible-by",), "data", "make_vocab_size_divisible_by", int, "Pad the tokenizer's vocabulary to a multiple of this."),
    (("--reset-position-ids/--no-reset-position-ids",), "data", "reset_position_ids", bool, "Packed documents: positions restart after each end-of-document token."),
    (("--reset-attention-mask/--no-reset-attention-mask",), "data", "reset_attention_mask", bool, "Packed documents: a token attends only within its own document."),
    (("--eod-mask-loss/--no-eod-mask-loss",), "data", "eod_mask_loss", bool, "Packed documents: no loss on predicting the token after an end-of-document token."),
    (("--eod-id",), "data", "eod_id", int, "The end-of-document token id for the three flags above (default: the tokenizer's)."),
    # optimizer
    (("--lr",), "optimizer", "lr", float, "Peak learning rate."),
    (("--min-lr",), "optimizer", "min_lr", float, "Learning rate at the end of decay."),
    (("--lr-warmup-iters",), "optimizer", "lr_warmup_iters", int, "Linear warmup iterations."),
    (("--lr-warmup-fraction",), "optimizer", "lr_warmup_fraction", float, "Warmup as a fraction of the decay iterations."),
    (("--lr-warmup-init",), "optimizer", "lr_warmup_init", float, "Learning rate at the start of warmup."),
    (("--lr-decay-style",), "optimizer", "lr_decay_style", str, "constant, linear, cosine, inverse-square-root or WSD."),
    (("--lr-decay-iters",), "optimizer", "lr_decay_iters", int, "Iterations to decay over (default: --train-iters)."),
    (("--lr-wsd-decay-style",), "optimizer", "lr_wsd_decay_style", str, "WSD's final decay: linear, cosine, exponential, minus_sqrt."),
    (("--lr-wsd-decay-iters",), "optimizer", "lr_wsd_decay_iters", int, "WSD's final decay iterations."),
    (("--weight-decay",), "optimizer", "weight_decay", float, "AdamW weight decay (not on norms and biases)."),
    (("--adam-beta1",), "optimizer", "adam_beta1", float, "AdamW beta1."),
    (("--adam-beta2",), "optimizer", "adam_beta2", float, "AdamW beta2."),
    (("--adam-eps",), "optimizer", "adam_eps", float, "AdamW epsilon."),
    (("--clip-grad",), "optimizer", "clip_grad", float, "Clip the global gradient norm to this (0: off)."),
    # training
    (("--train-iters",), "training", "train_iters", int, "Iterations (optimizer steps) to train to."),
    (("--micro-batch-size",), "training", "micro_batch_size", int, "Samples per forward/backward on each rank."),
    (("--global-batch-size",), "training", "global_batch_size", int, "Samples per iteration (micro x data-parallel x accumulation)."),
    (("--seed",), "training", "seed", int, "Seed of the initialisation and the data shuffle."),
    (("--dtype",), "training", "dtype", str, DTYPE_HELP[:-1] + "; bf16 keeps fp32 master weights (default auto)."),
    (("--device",), "training", "device", str, "auto, cpu or cuda."),
    (("--eval-interval",), "training", "eval_interval", int, "Evaluate on the valid split every N iterations (0: never)."),
    (("--eval-iters",), "training", "eval_iters", int, "Global batches per evaluation."),
    (("--log-interval",), "training", "log_interval", int, "Log every N iterations (and the first)."),
    (("--print-config",), "training", "print_config", bool, "Print the full resolved config at the start, not only a summary."),
    (("--tensorboard-dir",), "training", "tensorboard_dir", str, "Also write TensorBoard events here."),
    # memory and speed
    (("--recompute-granularity",), "training", "recompute_granularity", str, "Activation recompute: none, selective or full."),
    (("--recompute-method",), "training", "recompute_method", str, "With full: uniform or block."),
    (("--recompute-num-layers",), "training", "recompute_num_layers", int, "With full: layers per recompute unit (uniform) or recomputed layers (block)."),
    (("--compile/--no-compile",), "training", "compile", bool, "torch.compile each transformer block."),
    (("--fp8/--no-fp8",), "training", "fp8", bool, "FP8 matmuls in the blocks via torchao (H100/H200; pip install 'cookbook[fp8]')."),
    (("--attention-backend",), "training", "attention_backend", str, "auto, sdpa, flex or flash (flash-attn varlen: pip install 'cookbook[gpu]')."),
    # logit knowledge distillation
    (("--kd-teacher",), "training", "kd_teacher", str, "Distil from this cookbook checkpoint (same vocabulary): add its logits' KL to the loss."),
    (("--kd-ratio",), "training", "kd_ratio", float, "With --kd-teacher: loss = (1 - r) CE + r KL(teacher || student) (default 0.5)."),
    (("--kd-temperature",), "training", "kd_temperature", float, "With --kd-teacher: softmax temperature of both distributions (default 1)."),
    # parallelism (data parallel fills what the others leave)
    (("--tensor-model-parallel-size",), "parallel", "tp", int, "Tensor-parallel degree."),
    (("--sequence-parallel/--no-sequence-parallel",), "parallel", "sequence_parallel", bool, "Shard norms and residuals by sequence across the tensor-parallel ranks."),
    (("--pipeline-model-parallel-size",), "parallel", "pp", int, "Pipeline-parallel degree (1F1B schedule)."),
    (("--num-layers-per-virtual-pipeline-stage",), "parallel", "layers_per_virtual_stage", int, "Interleaved 1F1B: layers per virtual stage (each rank holds several)."),
    (("--context-parallel-size",), "parallel", "cp", int, "Context-parallel degree."),
    (("--data-parallel-replicate-size",), "parallel", "dp_replicate", int, "HSDP: replicas of the sharded model (default 1)."),
    # checkpoints
    (("--save",), "checkpoint", "save", str, "Folder for checkpoints and metrics.jsonl."),
    (("--load",), "checkpoint", "load", str, "Continue from this checkpoint (a save folder or one step_* directory)."),
    (("--finetune/--no-finetune",), "checkpoint", "finetune", bool, "With --load: only the weights; fresh optimizer, step 0."),
    (("--save-interval",), "checkpoint", "save_interval", int, "Save every N iterations (0: only at the end)."),
    (("--keep-last",), "checkpoint", "keep_last", int, "Keep the newest N saves (0: all)."),
]
PANELS = {"model": "Model", "data": "Data", "optimizer": "Optimizer", "training": "Training", "checkpoint": "Checkpoints",
          "parallel": "Parallelism"}
MULTI_VALUE_FLAGS = ("--data-path",)  # Megatron-LM style: --data-path 0.3 A 0.7 B


def training_command(fn):
    """Give ``fn(config_file, overrides, **own)`` the ``--config`` option and every training flag;
    a flag left out is absent from ``overrides`` ({section: {field: value}})."""
    own = list(inspect.signature(fn, eval_str=True).parameters.values())[2:]
    params = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[
        Optional[Path], typer.Option("--config", "-c", help="A TOML config; flags override its fields.", rich_help_panel="Config")])]
    for i, (names, section, _, kind, help) in enumerate(TRAINING_FLAGS):
        option = typer.Option(*names, help=escape(help), rich_help_panel=PANELS[section], show_default=False)  # plain text
        params.append(inspect.Parameter(f"flag_{i}", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Optional[kind], option]))

    @functools.wraps(fn)
    def command(**kwargs):
        overrides: dict[str, dict] = {}
        for i, (_, section, field, _, _) in enumerate(TRAINING_FLAGS):
            value = kwargs.pop(f"flag_{i}")
            if value is not None:
                overrides.setdefault(section, {})[field] = value.split() if field == "data_path" else value
        return fn(kwargs.pop("config"), overrides, **kwargs)

    command.__signature__ = inspect.Signature(params + [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own])
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


# --------------------------------------------------------------------------- pretrain


@app.command()
@training_command
def pretrain(
    config: Optional[Path],
    overrides: dict,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate the job for --world-size processes and estimate its memory; no devices, no training.", rich_help_panel="Dry run")] = False,
    world_size: Annotated[int, typer.Option(help="With --dry-run: the number of processes the job will run on.", rich_help_panel="Dry run")] = 1,
    gpu: Annotated[str, typer.Option(help="With --dry-run: the GPU to estimate memory for.", rich_help_panel="Dry run")] = "A100-80GB",
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


# --------------------------------------------------------------------------- extend


@app.command()
@training_command
def extend(
    config: Optional[Path],
    overrides: dict,
    interp_factor: Annotated[Optional[float], typer.Option("--interp-factor", "--rotary-seq-len-interpolation-factor", help="Stretch the context by this factor (Megatron-LM's --rotary-seq-len-interpolation-factor). Required.", rich_help_panel="Extension")] = None,
    rope_type: Annotated[str, typer.Option(help="linear (Position Interpolation), dynamic (NTK), yarn or llama3.", rich_help_panel="Extension")] = "linear",
    no_train: Annotated[bool, typer.Option("--no-train", help="Only write the checkpoint with the scaled config (training-free dynamic NTK / YaRN).", rich_help_panel="Extension")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate the job for --world-size processes and estimate its memory; no devices, no training.", rich_help_panel="Dry run")] = False,
    world_size: Annotated[int, typer.Option(help="With --dry-run: the number of processes the job will run on.", rich_help_panel="Dry run")] = 1,
    gpu: Annotated[str, typer.Option(help="With --dry-run: the GPU to estimate memory for.", rich_help_panel="Dry run")] = "A100-80GB",
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


# --------------------------------------------------------------------------- prune


@app.command()
@training_command
def prune(
    config: Optional[Path],
    overrides: dict,
    hidden_size_remain: Annotated[Optional[int], typer.Option("--hidden-size-remain", help="Hidden channels to keep (the same in every layer, the embedding and the output layer).", rich_help_panel="Target shape")] = None,
    intermediate_size_remain: Annotated[Optional[int], typer.Option("--intermediate-size-remain", "--ffn-hidden-size-remain", help="SwiGLU neurons to keep per layer.", rich_help_panel="Target shape")] = None,
    num_attention_heads_remain: Annotated[Optional[int], typer.Option("--num-attention-heads-remain", help="Query heads to keep per layer (head_dim stays).", rich_help_panel="Target shape")] = None,
    num_query_groups_remain: Annotated[Optional[int], typer.Option("--num-query-groups-remain", help="Key/value groups to keep per layer (default: MHA stays MHA, GQA keeps its groups).", rich_help_panel="Target shape")] = None,
    drop_layers: Annotated[Optional[int], typer.Option("--drop-layers", help="Drop this many layers, the least important by --layer-importance.", rich_help_panel="Target shape")] = None,
    drop_layer_ids: Annotated[Optional[str], typer.Option("--drop-layer-ids", help="Drop exactly these layers (0-based), e.g. 7,13,18,24.", rich_help_panel="Target shape")] = None,
    importance: Annotated[str, typer.Option(help="Which heads, neurons and channels to keep: activation (Minitron), magnitude or random.", rich_help_panel="Importance")] = "activation",
    layer_importance: Annotated[str, typer.Option(help="With --drop-layers N: block-influence (1 - cos(input, output)) or ppl (loss when removed).", rich_help_panel="Importance")] = "block-influence",
    calib_data: Annotated[Optional[str], typer.Option("--calib-data", help="Indexed dataset prefix of calibration samples (activation importance, layer importance).", rich_help_panel="Importance")] = None,
    calib_samples: Annotated[int, typer.Option("--calib-samples", help="Calibration samples.", rich_help_panel="Importance")] = 1024,
    calib_seq_length: Annotated[Optional[int], typer.Option("--calib-seq-length", help="Tokens per calibration sample (default: --seq-length, else the model's context).", rich_help_panel="Importance")] = None,
    calib_batch_size: Annotated[int, typer.Option("--calib-batch-size", help="Samples per forward in calibration and --eval-data perplexity.", rich_help_panel="Importance")] = 8,
    eval_data: Annotated[Optional[list[str]], typer.Option("--eval-data", help="Perplexity before and after on these: indexed prefixes or jsonl files (comma-separate or repeat).", rich_help_panel="Report")] = None,
    eval_seq_length: Annotated[Optional[int], typer.Option("--eval-seq-length", help="Tokens per --eval-data window (default: --seq-length, else the model's context).", rich_help_panel="Report")] = None,
    heal_steps: Annotated[int, typer.Option("--heal-steps", help="Then train the pruned model this many iterations (with the training flags; --data-path needed).", rich_help_panel="Healing")] = 0,
    kd: Annotated[bool, typer.Option("--kd/--no-kd", help="Heal distilling from the unpruned model (its logits' KL; --kd-teacher picks another teacher).", rich_help_panel="Healing")] = True,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the target shape and flags without weights (--preset stands in for a --load that is not here).", rich_help_panel="Dry run")] = False,
) -> None:
    """Prune a checkpoint to a smaller shape (heads, query groups, neurons, hidden channels, layers), then optionally heal it with distillation.

    Example: cookbook prune --load ckpt/llama2-13b --hidden-size-remain 4096 --intermediate-size-remain 11008 --num-attention-heads-remain 32 --drop-layers 8 --calib-data data/pile_text_document --save ckpt/pruned-7b
    """
    from pruner.spec import PruneSpec, parse_layer_ids
    from recipes.prune import PruneOptions, render, render_shapes, run
    from recipes.prune import dry_run as check

    spec = PruneSpec(hidden_size=hidden_size_remain, intermediate_size=intermediate_size_remain,
                     num_heads=num_attention_heads_remain, num_kv_heads=num_query_groups_remain,
                     drop_layers=drop_layers, drop_layer_ids=parse_layer_ids(drop_layer_ids))
    opts = PruneOptions(spec=spec, importance=importance, layer_importance=layer_importance, calib_data=calib_data,
                        calib_samples=calib_samples, calib_seq_length=calib_seq_length, batch_size=calib_batch_size,
                        eval_data=_split(eval_data), eval_seq_length=eval_seq_length, heal_steps=heal_steps, kd=kd)
    if dry_run:
        out.print(render_shapes(check(config, overrides, opts)))
        return
    for table in render(run(config, overrides, opts)):
        out.print(table)


# --------------------------------------------------------------------------- plan


@app.command()
def plan(
    preset: Annotated[Optional[str], typer.Option(help="Model preset (or give the shapes).", rich_help_panel="Model")] = None,
    num_layers: Annotated[Optional[int], typer.Option(help="Transformer layers.", rich_help_panel="Model")] = None,
    hidden_size: Annotated[Optional[int], typer.Option(help="Hidden size.", rich_help_panel="Model")] = None,
    num_attention_heads: Annotated[Optional[int], typer.Option(help="Attention heads.", rich_help_panel="Model")] = None,
    num_query_groups: Annotated[Optional[int], typer.Option(help="Key/value heads.", rich_help_panel="Model")] = None,
    ffn_hidden_size: Annotated[Optional[int], typer.Option(help="SwiGLU hidden size.", rich_help_panel="Model")] = None,
    vocab_size: Annotated[Optional[int], typer.Option(help="Vocabulary size.", rich_help_panel="Model")] = None,
    seq_length: Annotated[Optional[int], typer.Option(help="Tokens per sample (default: the model's context).", rich_help_panel="Job")] = None,
    global_batch_size: Annotated[int, typer.Option(help="Samples per iteration.", rich_help_panel="Job")] = 1024,
    gpu: Annotated[str, typer.Option(help="A100-80GB, A100-40GB, H100-80GB, H200 or L40S.", rich_help_panel="Cluster")] = "A100-80GB",
    num_gpus: Annotated[int, typer.Option(help="GPUs in all.", rich_help_panel="Cluster")] = 8,
    gpus_per_node: Annotated[int, typer.Option(help="GPUs per node (tensor parallel stays within one).", rich_help_panel="Cluster")] = 8,
    micro_batch_sizes: Annotated[str, typer.Option(help="Micro batch sizes to consider.", rich_help_panel="Job")] = "1,2,4",
    max_tp: Annotated[Optional[int], typer.Option(help="Largest tensor-parallel size to consider.", rich_help_panel="Cluster")] = None,
    max_pp: Annotated[Optional[int], typer.Option(help="Largest pipeline-parallel size to consider.", rich_help_panel="Cluster")] = None,
    show_all: Annotated[bool, typer.Option("--all", help="Every layout, those that do not fit too (default: the fastest 25 that fit).")] = False,
    wide: Annotated[bool, typer.Option("--wide", help="Also the memory's parts: parameters, gradients, optimizer, transient, activations.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print every layout as JSON.")] = False,
) -> None:
    """Memory per GPU and estimated step time of each parallel layout; recommends one.

    Example: cookbook plan --preset llama-65b --seq-length 4096 --global-batch-size 1024 --gpu A100-80GB --num-gpus 128
    """
    from recipes.plan import render, run

    shapes = {"num_layers": num_layers, "hidden_size": hidden_size, "num_heads": num_attention_heads,
              "num_kv_heads": num_query_groups, "intermediate_size": ffn_hidden_size, "vocab_size": vocab_size}
    result = run(preset, seq_length, global_batch_size, gpu, num_gpus, gpus_per_node,
                 tuple(_ints(micro_batch_sizes, "--micro-batch-sizes")), max_tp, max_pp,
                 **{k: v for k, v in shapes.items() if v is not None})
    if as_json:
        out.print_json(data=result.to_dict())
        return
    out.print(render(result, limit=None if show_all else 25, show_all=show_all, wide=wide))
    out.print(result.recommendation())


# --------------------------------------------------------------------------- eval


def _ints(value: str | None, flag: str) -> list[int]:
    try:
        return [int(v) for v in (value or "").replace(",", " ").split()]
    except ValueError:
        raise CookbookError(f"{flag} {value!r} must be integers separated by commas, e.g. 4096,8192") from None


@app.command("eval")
def eval_(
    load: Annotated[str, typer.Option("--load", help="A checkpoint: a save folder (its latest) or one step_* directory.")],
    ppl_files: Annotated[Optional[list[str]], typer.Option("--ppl-files", help="jsonl files to score (comma-separate or repeat).", rich_help_panel="Data")] = None,
    data_path: Annotated[Optional[list[str]], typer.Option("--data-path", help="Indexed dataset prefixes to score.", rich_help_panel="Data")] = None,
    seq_length: Annotated[Optional[str], typer.Option("--seq-length", help="Context length(s), e.g. 4096,8192 (default: the model's).", rich_help_panel="Windows")] = None,
    stride: Annotated[Optional[int], typer.Option(help="Score only the last STRIDE tokens of each overlapping window (default: no overlap).", rich_help_panel="Windows")] = None,
    text_key: Annotated[str, typer.Option(help="The jsonl key holding the text.", rich_help_panel="Data")] = "text",
    append_eod: Annotated[bool, typer.Option("--append-eod", help="End each document with EOD, as preprocess --append-eod did.", rich_help_panel="Data")] = False,
    tokenizer_model: Annotated[Optional[str], typer.Option("--tokenizer-model", "--tokenizer", help="Default: the checkpoint's tokenizer.", rich_help_panel="Data")] = None,
    tokenizer_type: Annotated[Optional[str], typer.Option(help=TYPE_HELP, rich_help_panel="Data")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Windows per forward (default 1); with --tasks, rows generated together (default 16).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "auto",
    dump_dir: Annotated[Optional[str], typer.Option(help="Also write DUMP_DIR/perplexity.json (passkey.json with --passkey; with --tasks, lm-eval's DUMP_DIR/MODEL/results_*.json).")] = None,
    tasks: Annotated[Optional[list[str]], typer.Option("--tasks", help="lm-evaluation-harness tasks (comma-separate or repeat), run in this process; needs pip install 'cookbook\\[eval]'.", rich_help_panel="Tasks")] = None,
    include_path: Annotated[Optional[list[str]], typer.Option("--include-path", help="Folders of task YAMLs over local data (nothing is downloaded).", rich_help_panel="Tasks")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(help="Few-shot examples per prompt (default: each task's own).", rich_help_panel="Tasks")] = None,
    limit: Annotated[Optional[float], typer.Option(help="Documents per task at most (a fraction when below 1).", rich_help_panel="Tasks")] = None,
    max_gen_toks: Annotated[int, typer.Option(help="New tokens per generate_until request, unless the task sets it.", rich_help_panel="Tasks")] = 256,
    add_bos_token: Annotated[Optional[bool], typer.Option("--add-bos-token/--no-add-bos-token", help="Begin every request with BOS or not (default: the tokenizer's own, as lm-eval's hf model).", rich_help_panel="Tasks")] = None,
    log_samples: Annotated[bool, typer.Option("--log-samples", help="With --dump-dir: also write each document's requests and answers.", rich_help_panel="Tasks")] = False,
    passkey: Annotated[bool, typer.Option("--passkey", help="Passkey retrieval accuracy per length and depth instead of perplexity.", rich_help_panel="Passkey")] = False,
    passkey_depths: Annotated[str, typer.Option(help="Where the key sits, as fractions of the filler.", rich_help_panel="Passkey")] = "0,0.25,0.5,0.75,1",
    passkey_trials: Annotated[int, typer.Option(help="Random keys per length and depth.", rich_help_panel="Passkey")] = 5,
    passkey_digits: Annotated[int, typer.Option(help="Digits of each key.", rich_help_panel="Passkey")] = 5,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the passkeys (default 0); with --tasks, of lm-eval's few-shot choice and sampling (default 1234).")] = None,
) -> None:
    """Perplexity of a checkpoint on jsonl files or indexed data at one or more context lengths; --passkey retrieval; or --tasks of lm-evaluation-harness.

    Example: cookbook eval --load ckpt/tiny --ppl-files valid.jsonl --seq-length 256,512 --dump-dir eval/

    Passkey: cookbook eval --load ckpt/tiny-2x --passkey --seq-length 256,512 --passkey-trials 10

    Tasks: cookbook eval --load ckpt/tiny --tasks my_mc,my_gen --include-path tasks/ --num-fewshot 5 --dump-dir eval/
    """
    from recipes.eval import EvalConfig, render, render_tasks, run, run_passkey, run_tasks

    if tasks:
        results, written = run_tasks(
            load, _split(tasks), include_path=list(include_path or []), num_fewshot=num_fewshot, limit=limit,
            batch_size=batch_size or 16, max_gen_toks=max_gen_toks, add_bos_token=add_bos_token,
            seed=1234 if seed is None else seed, log_samples=log_samples, output_path=dump_dir,
            tokenizer_model=tokenizer_model, tokenizer_type=tokenizer_type, device=device, dtype=dtype)
        if results is not None:
            out.file.write(render_tasks(results) + "\n")
            if written:
                out.print(f"[green]wrote[/green] {written}")
        return
    batch_size, seed = batch_size or 1, seed or 0

    try:
        depths = tuple(float(d) for d in passkey_depths.split(",") if d.strip())
    except ValueError:
        raise CookbookError(f"--passkey-depths {passkey_depths!r} is not a comma-separated list of fractions, e.g. 0,0.5,1") from None
    cfg = EvalConfig(
        load=load, ppl_files=_split(ppl_files), data_path=_split(data_path), seq_lengths=_ints(seq_length, "--seq-length"),
        stride=stride, batch_size=batch_size, text_key=text_key, append_eod=append_eod, tokenizer_model=tokenizer_model,
        tokenizer_type=tokenizer_type, device=device, dtype=dtype, dump_dir=dump_dir, passkey=passkey,
        passkey_depths=depths, passkey_trials=passkey_trials, passkey_digits=passkey_digits, seed=seed,
    )
    if passkey:
        from recipes.passkey import render as render_passkey

        trials, dumped = run_passkey(cfg)
        out.print(render_passkey(trials))
        if dumped:
            out.print(f"[green]wrote[/green] {dumped}")
        return
    results, dumped = run(cfg)
    out.print(render(results))
    if dumped:
        out.print(f"[green]wrote[/green] {dumped}")


# --------------------------------------------------------------------------- plot


@app.command()
def plot(
    runs: Annotated[list[str], typer.Argument(help="Save folders (their metrics.jsonl) or metrics.jsonl files.")],
    output: Annotated[str, typer.Option("--output", "-o", help="The PNG to write.")] = "loss.png",
    label: Annotated[Optional[list[str]], typer.Option("--label", help="A legend label per run, in order (repeat).")] = None,
    metric: Annotated[str, typer.Option(help="The metrics.jsonl field to draw: loss, ppl, grad_norm, lr, tokens_per_s, ...")] = "loss",
    split: Annotated[str, typer.Option(help="train, valid or both.")] = "both",
    smooth: Annotated[int, typer.Option(help="Moving average over this many logged points (train curves).")] = 1,
    title: Annotated[Optional[str], typer.Option(help="The figure title.")] = None,
    log_y: Annotated[bool, typer.Option("--log-y", help="Logarithmic y axis.")] = False,
) -> None:
    """Draw the loss curves of several runs in one PNG (matplotlib).

    Example: cookbook plot ckpt/tiny-2x-pi ckpt/tiny-2x-nopi --label "with PI" --label "without PI" -o extend.png
    """
    from recipes.plot import plot as draw

    path = draw(runs, output, label, metric, split, smooth, title, log_y)
    out.print(f"[green]wrote[/green] {path}")


# --------------------------------------------------------------------------- generate


@app.command()
def generate(
    load: Annotated[str, typer.Option("--load", help="A checkpoint: a save folder (its latest) or one step_* directory.")],
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="A prompt (repeatable).", rich_help_panel="Prompts")] = None,
    prompts_file: Annotated[Optional[str], typer.Option(help="Prompts: jsonl (one {\"text\": ...} per line) or text (one per line).", rich_help_panel="Prompts")] = None,
    text_key: Annotated[str, typer.Option(help="The jsonl key holding a prompt.", rich_help_panel="Prompts")] = "text",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt.", rich_help_panel="Sampling")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy.", rich_help_panel="Sampling")] = 0.8,
    top_k: Annotated[Optional[int], typer.Option(help="Sample among the K most likely tokens.", rich_help_panel="Sampling")] = None,
    top_p: Annotated[Optional[float], typer.Option(help="Sample among the most likely tokens holding probability P.", rich_help_panel="Sampling")] = None,
    seed: Annotated[int, typer.Option(help="Sampling seed.", rich_help_panel="Sampling")] = 0,
    batch_size: Annotated[int, typer.Option(help="Prompts per batch.")] = 8,
    tokenizer_model: Annotated[Optional[str], typer.Option("--tokenizer-model", "--tokenizer", help="Default: the checkpoint's tokenizer.")] = None,
    tokenizer_type: Annotated[Optional[str], typer.Option(help=TYPE_HELP)] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "auto",
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Write jsonl {prompt, text, tokens} here instead of printing.")] = None,
) -> None:
    """Sample continuations of prompts from a checkpoint (KV cache; temperature, top-k, top-p).

    Example: cookbook generate --load ckpt/tiny --prompt "def main(" --max-new-tokens 64 --temperature 0
    """
    from recipes.generate import GenerateConfig, run

    cfg = GenerateConfig(
        load=load, prompts=list(prompt or []), prompts_file=prompts_file, text_key=text_key, max_new_tokens=max_new_tokens,
        temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, batch_size=batch_size,
        tokenizer_model=tokenizer_model, tokenizer_type=tokenizer_type, device=device, dtype=dtype, output=output,
    )

    def show(record: dict) -> None:
        out.rule(escape(record["prompt"][:60]))
        out.file.write(record["prompt"] + record["text"] + "\n")
        out.file.flush()

    records = run(cfg, on_result=None if output else show)
    if output:
        out.print(f"[green]wrote[/green] {len(records)} generations to {output}")


# --------------------------------------------------------------------------- distill


@app.command()
def serve(
    load: Annotated[str, typer.Option("--load", help="A cookbook checkpoint or a Hugging Face model folder.")],
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0 picks a free one).")] = 8000,
    served_model_name: Annotated[Optional[str], typer.Option("--served-model-name", help="The model's name in the API (default: the folder's name).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help=DTYPE_HELP)] = "auto",
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", "--batch-size", help="Rows (prompts x n, of every request in flight) decoded together; requests join and leave the running batch at each step.")] = 32,
    kv_cache_tokens: Annotated[Optional[int], typer.Option(help="KV cache size in tokens (rows x length; default: max-batch-size x max-model-len, capped by 90% of free GPU memory).", rich_help_panel="Limits")] = None,
    request_timeout: Annotated[Optional[float], typer.Option(help="Seconds a request may take before it is cancelled (408); default: no limit.", rich_help_panel="Limits")] = None,
    max_prompts: Annotated[int, typer.Option(help="Prompts per request at most (and the largest n).", rich_help_panel="Limits")] = 64,
    max_tokens_limit: Annotated[int, typer.Option(help="The largest max_tokens a request may ask for.", rich_help_panel="Limits")] = 4096,
    max_model_len: Annotated[Optional[int], typer.Option(help="Prompt + max_tokens at most (default: the model's context).", rich_help_panel="Limits")] = None,
    max_request_bytes: Annotated[int, typer.Option(help="Request bodies larger than this are refused (413).", rich_help_panel="Limits")] = 1_000_000,
    tokenizer_model: Annotated[Optional[str], typer.Option("--tokenizer-model", "--tokenizer", help="Default: the checkpoint's tokenizer.")] = None,
    tokenizer_type: Annotated[Optional[str], typer.Option(help=TYPE_HELP)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No line per request.")] = False,
) -> None:
    """Serve a checkpoint over an OpenAI-compatible HTTP API with continuous batching (/v1/completions with logprobs, echo and streaming; /v1/models, /tokenize, /detokenize, /tokenizer_info, /health), as vLLM does.

    Example: cookbook serve --load ckpt/tiny --port 8000   (then: cookbook distill generate --backend openai --endpoint http://localhost:8000 ..., or lm_eval --model local-completions --model_args base_url=http://localhost:8000/v1/completions,model=tiny ...)
    """
    from inference_distill.server import ServeConfig
    from inference_distill.server import serve as run

    run(ServeConfig(load=load, host=host, port=port, device=device, dtype=dtype, max_batch_size=max_batch_size,
                    kv_cache_tokens=kv_cache_tokens, request_timeout=request_timeout, model_name=served_model_name,
                    max_request_bytes=max_request_bytes, max_prompts=max_prompts, max_tokens_limit=max_tokens_limit,
                    max_model_len=max_model_len, tokenizer_model=tokenizer_model, tokenizer_type=tokenizer_type, log_requests=not quiet))


@distill_app.command("generate")
def distill_generate(
    output: Annotated[str, typer.Option("--output", "-o", help="Folder for the sharded jsonl (rerun the same command to resume into it).")],
    prompts_from: Annotated[str, typer.Option("--prompts-from", help="Pretraining documents: an indexed dataset prefix, a .jsonl file or a folder of them.", rich_help_panel="Prompts")],
    teacher: Annotated[Optional[str], typer.Option("--teacher", help="A Hugging Face folder or cookbook checkpoint (cookbook, vllm; openai: its tokenizer counts prompt tokens).", rich_help_panel="Teacher")] = None,
    backend: Annotated[str, typer.Option("--backend", help="cookbook (our generator, here), vllm (in this process, GPUs) or openai (OpenAI-compatible servers at --endpoint).", rich_help_panel="Teacher")] = "cookbook",
    endpoint: Annotated[Optional[list[str]], typer.Option("--endpoint", help="openai: server URLs (comma-separate or repeat), e.g. http://node1:8000.", rich_help_panel="Teacher")] = None,
    served_model_name: Annotated[Optional[str], typer.Option("--served-model-name", help="openai: the model name to ask for (default: the server's first).", rich_help_panel="Teacher")] = None,
    concurrency: Annotated[int, typer.Option(help="openai: requests in flight per endpoint.", rich_help_panel="Teacher")] = 64,
    timeout: Annotated[float, typer.Option(help="openai: seconds per request.", rich_help_panel="Teacher")] = 600.0,
    retries: Annotated[int, typer.Option(help="openai: retries of a failed request (connection errors, 429, 5xx).", rich_help_panel="Teacher")] = 5,
    tensor_parallel_size: Annotated[int, typer.Option("--tensor-parallel-size", "--tp", help="vllm: GPUs per model.", rich_help_panel="Teacher")] = 1,
    gpu_memory_utilization: Annotated[float, typer.Option(help="vllm: share of GPU memory vLLM may take.", rich_help_panel="Teacher")] = 0.9,
    device: Annotated[str, typer.Option(help="cookbook: auto, cpu or cuda.", rich_help_panel="Teacher")] = "auto",
    dtype: Annotated[str, typer.Option(help="cookbook: " + DTYPE_HELP[:-1] + "; vllm: its own names (auto, bfloat16, ...).", rich_help_panel="Teacher")] = "auto",
    batch_size: Annotated[int, typer.Option(help="cookbook: sequences per batch.", rich_help_panel="Teacher")] = 16,
    prefix_tokens: Annotated[Optional[int], typer.Option("--prefix-tokens", help="Prompt = the first N tokens of a document (default 128).", rich_help_panel="Prompts")] = None,
    prefix_fraction: Annotated[Optional[float], typer.Option("--prefix-fraction", help="Or: that share of each document's tokens.", rich_help_panel="Prompts")] = None,
    num_prompts: Annotated[Optional[int], typer.Option("--num-prompts", help="At most this many prompts (default: every long enough document).", rich_help_panel="Prompts")] = None,
    min_doc_tokens: Annotated[Optional[int], typer.Option("--min-doc-tokens", help="Skip documents shorter than this (default: longer than the prefix).", rich_help_panel="Prompts")] = None,
    seed: Annotated[int, typer.Option(help="Seeds the document order and sampling.", rich_help_panel="Prompts")] = 1234,
    json_key: Annotated[str, typer.Option("--json-key", help="jsonl: the key holding a document's text.", rich_help_panel="Prompts")] = "text",
    tokenizer_model: Annotated[Optional[str], typer.Option("--tokenizer-model", "--tokenizer", help="Counts prompt tokens and decodes indexed data (default: the teacher's).", rich_help_panel="Prompts")] = None,
    tokenizer_type: Annotated[Optional[str], typer.Option(help=TYPE_HELP, rich_help_panel="Prompts")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "--max-new-tokens", help="New tokens per completion at most.", rich_help_panel="Sampling")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy.", rich_help_panel="Sampling")] = 0.7,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling (1 = off).", rich_help_panel="Sampling")] = 0.9,
    top_k: Annotated[int, typer.Option(help="Sample among the K most likely tokens (0 = off).", rich_help_panel="Sampling")] = 0,
    n: Annotated[int, typer.Option("--n", "--samples-per-prompt", help="Completions per prompt.", rich_help_panel="Sampling")] = 1,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="A string that ends a completion (repeatable).", rich_help_panel="Sampling")] = None,
    frequency_penalty: Annotated[float, typer.Option(help="OpenAI's: logit -= f x count in the completion.", rich_help_panel="Sampling")] = 0.0,
    presence_penalty: Annotated[float, typer.Option(help="OpenAI's: logit -= p if in the completion.", rich_help_panel="Sampling")] = 0.0,
    repetition_penalty: Annotated[float, typer.Option(help="vLLM/HF's: tokens seen in prompt or completion are penalised (1 = off).", rich_help_panel="Sampling")] = 1.0,
    prompts_per_shard: Annotated[int, typer.Option(help="Prompts per output shard (the unit of resume).", rich_help_panel="Output")] = 2048,
    continuation_only: Annotated[bool, typer.Option("--continuation-only", help="text = the continuation alone (default: prefix + continuation).", rich_help_panel="Output")] = False,
    min_tokens: Annotated[int, typer.Option("--min-tokens", help="Drop completions shorter than this many tokens.", rich_help_panel="Filters")] = 0,
    max_repeat_ratio: Annotated[Optional[float], typer.Option("--max-repeat-ratio", help="Drop texts whose word n-grams repeat more than this share (e.g. 0.5).", rich_help_panel="Filters")] = None,
    ngram: Annotated[int, typer.Option(help="n of the repeat ratio, in words.", rich_help_panel="Filters")] = 3,
    dedup: Annotated[bool, typer.Option("--dedup/--no-dedup", help="Drop exact duplicate continuations.", rich_help_panel="Filters")] = True,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Check the flags (and count the prompts where the data are here) without the teacher.")] = False,
) -> None:
    """Synthetic data: prompt a teacher with the first tokens of pretraining documents and write its continuations as sharded jsonl.

    Example: cookbook distill generate --teacher /models/Qwen-72B --backend vllm --tp 8 --prompts-from data/pile.jsonl --prefix-tokens 128 --max-tokens 4096 --output synthetic/
    """
    from inference_distill.filters import FilterConfig
    from inference_distill.sampling import SamplingParams
    from recipes.distill import GenerateOptions, generate, generate_dry_run

    if prefix_tokens is None and prefix_fraction is None:
        prefix_tokens = 128
    sampling = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, n=n, stop=tuple(stop or ()),
                              frequency_penalty=frequency_penalty, presence_penalty=presence_penalty, repetition_penalty=repetition_penalty)
    (generate_dry_run if dry_run else generate)(GenerateOptions(
        output=output, prompts_from=prompts_from, backend=backend, teacher=teacher, served_model_name=served_model_name,
        prefix_tokens=prefix_tokens, prefix_fraction=prefix_fraction, num_prompts=num_prompts, min_doc_tokens=min_doc_tokens,
        seed=seed, text_key=json_key, tokenizer_model=tokenizer_model, tokenizer_type=tokenizer_type, sampling=sampling,
        prompts_per_shard=prompts_per_shard, continuation_only=continuation_only,
        filters=FilterConfig(min_tokens=min_tokens, max_repeat_ratio=max_repeat_ratio, ngram=ngram, dedup=dedup),
        endpoints=_split(endpoint), concurrency=concurrency, timeout=timeout, retries=retries,
        tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization, device=device,
        dtype=dtype, batch_size=batch_size,
    ))


@distill_app.command("train")
@training_command
def distill_train(
    config: Optional[Path],
    overrides: dict,
    synthetic: Annotated[Optional[list[str]], typer.Option("--synthetic", help="distill generate output folders (or jsonl files): comma-separate or repeat. Required.", rich_help_panel="Synthetic data")] = None,
    synthetic_weight: Annotated[Optional[float], typer.Option("--synthetic-weight", help="Share of training samples from the synthetic data when blended with --data-path (default 0.5; alone: 1).", rich_help_panel="Synthetic data")] = None,
    synthetic_prefix: Annotated[Optional[str], typer.Option("--synthetic-prefix", help="Where the tokenized synthetic data go (default SAVE/synthetic/synthetic).", rich_help_panel="Synthetic data")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Tokenizer threads for the synthetic data.", rich_help_panel="Synthetic data")] = max(1, min(8, os.cpu_count() or 1)),
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate the job for --world-size processes and estimate its memory; no devices, no training (--preset stands in for a --load that is not here).", rich_help_panel="Dry run")] = False,
    world_size: Annotated[int, typer.Option(help="With --dry-run: the number of processes the job will run on.", rich_help_panel="Dry run")] = 1,
    gpu: Annotated[str, typer.Option(help="With --dry-run: the GPU to estimate memory for.", rich_help_panel="Dry run")] = "A100-80GB",
) -> None:
    """Continue training a student on a teacher's synthetic text (tokenized with the preprocess code), optionally blended with original data and with logit KD (--kd-teacher).

    Example: cookbook distill train --load ckpt/llama2-13b --synthetic synth/ --data-path data/pile_text_document --synthetic-weight 0.5 --lr 1e-5 --train-iters 2000 --save ckpt/13b-distilled
    """
    from recipes.distill import TrainOptions, train, train_dry_run

    opts = TrainOptions(synthetic=_split(synthetic), synthetic_weight=synthetic_weight, synthetic_prefix=synthetic_prefix, workers=workers)
    if dry_run:
        train_dry_run(config, overrides, opts, world_size, gpu)
    else:
        train(config, overrides, opts)


# --------------------------------------------------------------------------- numbers
# Every number a flag takes is finite and, but for these, not negative (OpenAI's penalties are signed); what else a
# value must be (positive, at most 1, ...) its config checks.
SIGNED_FLAGS = {"--frequency-penalty", "--presence-penalty"}


def numeric_flags(fn) -> dict[str, str]:
    """Parameter name -> its flag (the first long name), for every int and float option of the command ``fn``."""
    flags = {}
    for p in inspect.signature(fn, eval_str=True).parameters.values():
        if get_origin(p.annotation) is not Annotated:
            continue
        kind, *meta = get_args(p.annotation)
        if not {kind, *get_args(kind)} & {int, float}:
            continue
        info = next((m for m in meta if isinstance(m, typer.models.ParameterInfo)), None)
        # in Annotated, typer keeps the first name where a default would go
        decls = ([info.default] if isinstance(info.default, str) else []) + list(info.param_decls or ()) if info else []
        names = [d.split("/")[0] for d in decls if d.startswith("--")]
        flags[p.name] = names[0] if names else "--" + p.name.replace("_", "-")
    return flags


def guarded(fn):
    """The command ``fn``, refusing NaN, infinity and negative numbers in its flags before it runs, and turning an
    interrupt into ``Interrupted`` (which keeps what the command says it kept)."""
    flags = numeric_flags(fn)

    @functools.wraps(fn)
    def command(**kwargs):
        for name, flag in flags.items():
            value = kwargs.get(name)
            if value is not None and not isinstance(value, bool):
                check_number(flag, value, low=None if flag in SIGNED_FLAGS else 0)
        try:
            return fn(**kwargs)
        except KeyboardInterrupt as e:
            raise Interrupted(interrupt_note(e)) from None

    return command


def _guard_every_command(group: typer.Typer) -> None:
    for info in group.registered_commands:
        info.callback = guarded(info.callback)
    for sub in group.registered_groups:
        _guard_every_command(sub.typer_instance)


_guard_every_command(app)


# --------------------------------------------------------------------------- entry point


def _click_exceptions(name: str) -> tuple[type[BaseException], ...]:
    """The exception ``name`` of the click typer runs on: its own bundled copy (typer >= 0.29) or click."""
    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


_CLICK_ERRORS = _click_exceptions("ClickException")
_CLICK_ABORT = _click_exceptions("Abort")


def _terminate(signum, frame):
    raise KeyboardInterrupt  # so that partial outputs are removed on SIGTERM as on Ctrl-C


def _take_debug(args: list[str]) -> list[str]:
    """``--debug`` anywhere before ``--`` (``cookbook --debug eval ...`` or ``cookbook eval ... --debug``)."""
    global _debug
    end = args.index("--") if "--" in args else len(args)
    if "--debug" in args[:end]:
        _debug = True
        args = [a for i, a in enumerate(args) if a != "--debug" or i >= end]
    return args


def _fail(message: str, code: int) -> None:
    if _debug:
        traceback.print_exc()
    console.print(message, highlight=False, soft_wrap=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; user-facing errors become one red line and exit code 2."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        args = join_multi_value_flags(_take_debug(sys.argv[1:] if argv is None else list(argv)))
        command = typer.main.get_command(app)
        code = command.main(args=args, prog_name="cookbook", standalone_mode=False)
    except CookbookError as e:
        _fail(f"[bold red]error:[/bold red] {escape(str(e))}", e.exit_code)
    except (Interrupted, KeyboardInterrupt, *_CLICK_ABORT) as e:  # in a command, while parsing, in a prompt
        _fail(f"[red]interrupted:[/red] {escape(interrupt_note(e))}", 130)
    except _CLICK_ERRORS as e:  # usage errors: click's own message and exit code (2)
        e.show()
        sys.exit(e.exit_code)
    except OSError as e:  # an output the system refuses (read-only, full, a folder where a file goes): no traceback
        where = f" {e.filename}" if e.filename else ""
        _fail(f"[bold red]error:[/bold red] cannot write or read{escape(where)}: {escape(e.strerror or str(e))}", 2)
    if code == 130:  # typer turned an interrupt outside a command into its exit code
        _fail("[red]interrupted:[/red] nothing written", 130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
