"""``cookbook eval``: perplexity of a model on jsonl files or Megatron indexed datasets at one or more context
lengths (``cookbook.inference.perplexity`` says what is scored), retrieval from a long context (``--passkey``,
``--recall``: ``cookbook.inference.retrieval``), or lm-evaluation-harness tasks in process (``--tasks``)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.table import Table

from cookbook.errors import CookbookError
from cookbook.fileio import check_writable, write_text_atomic
from cookbook.inference.load import find_tokenizer, load_model
from cookbook.inference.perplexity import PerplexityResult, check_window, evaluate, file_stream, indexed_stream
from cookbook.inference.retrieval import (
    NeedleAttention,
    RetrievalTrial,
    accuracy,
    accuracy_by_length,
    copying_heads,
    needle_attention,
    retrieval_eval,
)

DUMP_NAME = "perplexity.json"


def render(results: list[PerplexityResult]) -> Table:
    table = Table(title="perplexity", title_justify="left")
    table.add_column("data")
    table.add_column("seq length", justify="right")
    table.add_column("tokens", justify="right")
    table.add_column("nll", justify="right")
    table.add_column("ppl", justify="right", style="bold")
    for i, r in enumerate(results):
        new_source = i > 0 and r.name != results[i - 1].name
        if new_source:
            table.add_section()
        table.add_row(r.name, f"{r.seq_length:,}", f"{r.tokens:,}", f"{r.nll:.4f}", f"{r.ppl:.3f}")
    return table


def dump_json(dump_dir, name: str, payload: dict) -> Path:
    """Write ``DUMP_DIR/name`` (``payload`` as indented JSON), atomically; the folder is made if needed."""
    dump_dir = Path(dump_dir)
    check_writable(dump_dir, "--dump-dir", folder=True)
    dump_dir.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(dump_dir / name, json.dumps(payload, indent=2, default=str, allow_nan=True) + "\n")


def dump(results: list[PerplexityResult], dump_dir, extra: dict) -> Path:
    """Write ``DUMP_DIR/perplexity.json``: ``extra``'s fields, then ``results``."""
    return dump_json(dump_dir, DUMP_NAME, {**(extra or {}), "results": [asdict(r) for r in results]})


def render_retrieval(trials: list[RetrievalTrial], task: str) -> Table:
    acc = accuracy(trials)
    lengths = list(dict.fromkeys(k[0] for k in acc))
    depths = list(dict.fromkeys(k[1] for k in acc))
    title = {"passkey": "passkey retrieval", "recall": "key-value recall"}[task]
    table = Table(
        title=f"{title} accuracy (rows: context length, columns: depth; digits: of the key's digits in place)",
        title_justify="left",
    )
    table.add_column("length", justify="right")
    for d in depths:
        table.add_column(f"{d:g}", justify="right")
    table.add_column("mean", justify="right", style="bold")
    table.add_column("digits", justify="right")
    by_length, digits = accuracy_by_length(trials), accuracy_by_length(trials, "digits_right")
    for length in lengths:
        row = [f"{acc[(length, d)]:.2f}" for d in depths]
        table.add_row(f"{length:,}", *row, f"{by_length[length]:.2f}", f"{digits[length]:.2f}")
    return table


def render_attention(heads: list[NeedleAttention], task: str) -> Table:
    table = Table(
        title=f"{task}: where the most copying head looks while the key is written (shares of its attention; a head "
        "that looks everywhere alike in brackets)",
        title_justify="left",
    )
    for name in ("length", "depth", "layer.head", "on the needle", "on the next key token", "mean distance"):
        table.add_column(name, justify="right")
    for h in copying_heads(heads):
        table.add_row(
            f"{h.length:,}", f"{h.depth:g}", f"{h.layer}.{h.head}", f"{h.share:.2f} ({h.share_chance:.2f})",
            f"{h.copy:.2f} ({h.copy_chance:.2f})", f"{h.distance:.0f}"
        )  # fmt: skip
    return table


def dump_retrieval(
    trials: list[RetrievalTrial], task: str, dump_dir, extra: dict, heads: list[NeedleAttention] = ()
) -> Path:
    """``DUMP_DIR/TASK.json`` (passkey.json, recall.json): ``extra``, the accuracy per length and depth, per length,
    the same for the digits in their place, every trial, and (``--attention``) every head's attention."""
    payload = {
        "task": task,
        **extra,
        "accuracy": [{"length": k[0], "depth": k[1], "accuracy": a} for k, a in accuracy(trials).items()],
        "accuracy_by_length": [{"length": k, "accuracy": a} for k, a in accuracy_by_length(trials).items()],
        "digit_accuracy": [
            {"length": k[0], "depth": k[1], "accuracy": a} for k, a in accuracy(trials, "digits_right").items()
        ],
        "digit_accuracy_by_length": [
            {"length": k, "accuracy": a} for k, a in accuracy_by_length(trials, "digits_right").items()
        ],
        "trials": [asdict(t) for t in trials],
    }
    if heads:
        payload["attention"] = [asdict(h) for h in heads]
    return dump_json(dump_dir, f"{task}.json", payload)


# --------------------------------------------------------------------------- the command


@dataclass
class EvalConfig:
    load: str
    ppl_files: list[str]
    data_path: list[str]
    seq_lengths: list[int]  # empty: the model's max_seq_len
    stride: int | None = None
    batch_size: int = 1
    text_key: str = "text"
    append_eod: bool = False
    tokenizer_model: str | None = None  # default: the one the checkpoint was trained with
    tokenizer_type: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    dump_dir: str | None = None
    # --passkey, --recall: retrieval accuracy instead of perplexity (cookbook/inference/retrieval.py)
    retrieval: str | None = None  # passkey or recall
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    trials: int = 5
    digits: int = 5
    recall_keys: int = 4
    seed: int = 0
    plot: str | None = None  # a PNG of accuracy against length, a line per depth
    attention: bool = False  # also where the heads look (cookbook.inference.retrieval.needle_attention)


def _tokenizer(cfg: EvalConfig):
    """--tokenizer-model, else the one the checkpoint was trained with."""
    from cookbook.data.tokenizer import load_tokenizer

    return load_tokenizer(*find_tokenizer(cfg.load, cfg.tokenizer_model, cfg.tokenizer_type))


def _dtype(model) -> str:
    """The dtype the model ran in (what --dtype auto chose)."""
    return {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(next(model.parameters()).dtype, "other")


def run_retrieval(cfg: EvalConfig):
    """``--passkey`` or ``--recall``: (trials, the heads' attention with ``--attention``, the files written: the JSON
    dump, the plot). The attention is measured on the same prompts as the accuracy (the same seed)."""
    if cfg.dump_dir:
        check_writable(cfg.dump_dir, "--dump-dir", folder=True)
    if cfg.plot:
        check_writable(cfg.plot, "--plot")
    tokenizer = _tokenizer(cfg)  # before the weights: a missing one fails at once
    model, sections = load_model(cfg.load, cfg.device, cfg.dtype)
    lengths = cfg.seq_lengths or [model.config.max_seq_len]
    task = cfg.retrieval
    trials = retrieval_eval(
        model, tokenizer, task, lengths, list(cfg.depths), cfg.trials, cfg.digits, cfg.recall_keys, cfg.seed,
        cfg.batch_size
    )  # fmt: skip
    heads = []
    if cfg.attention:
        heads = needle_attention(
            model, tokenizer, task, lengths, list(cfg.depths), cfg.trials, cfg.digits, cfg.recall_keys, cfg.seed
        )
    written = []
    if cfg.dump_dir:
        extra = {"load": cfg.load, "dtype": _dtype(model), "seed": cfg.seed, "model": sections["model"]}
        if task == "recall":
            extra["keys"] = cfg.recall_keys
        written.append(dump_retrieval(trials, task, cfg.dump_dir, extra, heads))
    if cfg.plot:
        from recipes.plot import accuracy_curves, draw_accuracy

        written.append(draw_accuracy(accuracy_curves(trials), cfg.plot, f"{task} accuracy of {Path(cfg.load).name}"))
    return trials, heads, written


def run(cfg: EvalConfig, show_progress: bool = True) -> tuple[list[PerplexityResult], Path | None]:
    """Load a checkpoint, build every source's token stream, score; optionally dump JSON."""
    if not cfg.ppl_files and not cfg.data_path:
        raise CookbookError("nothing to evaluate; pass --ppl-files FILES or --data-path PREFIX (or --passkey)")
    for length in cfg.seq_lengths:
        check_window(length, cfg.stride)
    if cfg.dump_dir:
        check_writable(cfg.dump_dir, "--dump-dir", folder=True)
    tokenizer = _tokenizer(cfg) if cfg.ppl_files else None  # before the weights: a missing one fails at once
    model, sections = load_model(cfg.load, cfg.device, cfg.dtype)
    sources: dict[str, torch.Tensor] = {}
    if cfg.ppl_files:
        for f in cfg.ppl_files:
            sources[f] = file_stream(f, tokenizer, cfg.text_key, append_eod=cfg.append_eod)
    for prefix in cfg.data_path:
        sources[prefix] = indexed_stream(prefix)
    device = next(model.parameters()).device
    lengths = cfg.seq_lengths or [model.config.max_seq_len]
    results = evaluate(model, sources, lengths, cfg.stride, cfg.batch_size, device, show_progress=show_progress)
    dumped = None
    if cfg.dump_dir:
        extra = {"load": cfg.load, "stride": cfg.stride, "dtype": _dtype(model), "model": sections["model"]}
        dumped = dump(results, cfg.dump_dir, extra)
    return results, dumped


def run_tasks(load: str, tasks: list[str], **options):
    """``--tasks``: lm-evaluation-harness in this process on the checkpoint (``cookbook.inference.harness``); (lm-eval's
    results, None off rank 0; the results file written under ``output_path``, if any)."""
    if not sys.stderr.isatty():  # no progress bars in a pipe or a log (read when tqdm is first imported)
        os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise CookbookError(
            "--tasks runs lm-evaluation-harness, which is not installed; pip install 'cookbook[eval]'"
        ) from None
    from cookbook.inference.harness import TasksConfig
    from cookbook.inference.harness import run_tasks as evaluate_tasks

    return evaluate_tasks(TasksConfig(load=load, tasks=tasks, **options))


def render_tasks(results: dict) -> str:
    """lm-eval's own table of the results (plain text, one row per task and metric)."""
    from lm_eval.utils import make_table

    return make_table(results) + (make_table(results, "groups") if results.get("groups") else "")
