"""Perplexity of a model over token streams at one or more context lengths (what ``cookbook eval`` reports, and what
shows what Position Interpolation does at 4k vs 8k).

What is scored
    Each source becomes **one token stream**: a jsonl file's documents are tokenized one by one with
    Megatron-LM's ``tokenizer.tokenize(text)`` (BOS or other specials as the tokenizer type adds them;
    ``append_eod`` puts the tokenizer's EOD after each document, as ``preprocess --append-eod``
    does) and concatenated in file order; an indexed dataset's ``.bin`` is already that stream. So
    long contexts exist even when documents are short, as in Megatron-LM's evaluation, and the model
    sees document boundaries the way it saw them in training.

Windows (``seq_length`` L, ``stride`` S, 0 < S <= L, S = L by default)
    The model always reads at most L tokens (positions 0..L-1, the context it is evaluated at) and
    predicts the token after each of them. Window k reads ``stream[k*S : k*S + L]`` and predicts
    ``stream[k*S + 1 : k*S + L + 1]``; the first window scores all its predictions, every later one
    only its last S (the earlier ones were scored already with less context). Hence every token
    but the first is scored exactly once, whatever S is, and with S = L the windows do not overlap
    (each shares only its last target with the next one's first input, as Megatron-LM's samples of
    L + 1 tokens do). The last window is cut short at the end of the stream and scored too: nothing is
    dropped. This is exactly Hugging Face's "perplexity of fixed-length models" recipe with
    ``max_length = L + 1`` (HF counts the predicted token in the window; here L is what the model reads).

Numbers
    Per-token NLL comes from a log-softmax in fp32 whatever the model's dtype, summed in fp64;
    ``nll`` is the mean over scored tokens and ``ppl = exp(nll)``.
"""

from __future__ import annotations

import math
import operator
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cookbook.data.indexed import IndexedDataset, dataset_prefix
from cookbook.data.jsonl import parse_lines, read_lines
from cookbook.data.sources import expand_inputs
from cookbook.data.tokenizer import Tokenizer, encode_documents
from cookbook.errors import CookbookError
from cookbook.progress import console

_CE_ELEMENTS = 1 << 26  # logits upcast to fp32 at a time (256 MB): bounds memory at large vocab x length


@dataclass
class PerplexityResult:
    name: str
    seq_length: int
    tokens: int  # scored tokens
    nll: float  # mean negative log-likelihood per scored token (nats)
    ppl: float  # exp(nll)


# --------------------------------------------------------------------------- windows


def _count(value, flag: str, what: str) -> int:
    try:
        n = operator.index(value)
    except TypeError:
        n = 0
    if n <= 0:
        raise CookbookError(f"{flag} must be a positive number of {what}, not {value}")
    return n


def check_window(seq_length: int, stride: int | None) -> int:
    """Validate L and S; return S (L when None)."""
    seq_length = _count(seq_length, "--seq-length", "tokens")
    if stride is None:
        return seq_length
    stride = _count(stride, "--stride", "tokens")
    if stride > seq_length:
        raise CookbookError(
            f"--stride {stride} is larger than --seq-length {seq_length}; tokens would be skipped, use a stride <= the sequence length"
        )
    return stride


def windows(n_tokens: int, seq_length: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, scored) per window over a stream of ``n_tokens``: the model reads
    ``stream[begin:end]``, predicts ``stream[begin + 1 : end + 1]`` and the last ``scored`` of those
    predictions count. Every position 1..n_tokens-1 is scored exactly once."""
    last = n_tokens - 1  # the last position that can be predicted
    done = 0  # positions 1..done are scored
    begin = 0
    while done < last:
        end = min(begin + seq_length, last)
        yield begin, end, end - done
        done = end
        begin += stride


def _token_nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of -log p(target) over rows of ``logits`` [M, V], log-softmax in fp32, summed in fp64."""
    rows = max(1, _CE_ELEMENTS // max(1, logits.shape[-1]))
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for i in range(0, logits.shape[0], rows):
        nll = F.cross_entropy(logits[i : i + rows].float(), targets[i : i + rows], reduction="none")
        total += nll.double().sum()
    return total


def _progress(description: str, total: int, enabled: bool):
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("windows  {task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not (enabled and console.is_terminal),  # no blank lines in logs
    )
    return progress, progress.add_task(description, total=total, rate="")


def window_nll(
    model,
    stream: torch.Tensor,
    seq_length: int,
    stride: int | None,
    batch_size: int,
    device,
    *,
    description: str = "eval",
    show_progress: bool = True,
) -> tuple[float, int]:
    """(sum of per-token NLL in fp64, number of scored tokens) of ``stream`` under ``model``
    (``model(tokens [b, s]) -> logits [b, s, vocab]``; an output with ``.logits`` works too), with the
    windows described in this module's docstring. The model is run in eval mode without gradients;
    ``batch_size`` windows go through it at once."""
    stride = check_window(seq_length, stride)
    seq_length, batch_size = int(seq_length), _count(batch_size, "--batch-size", "windows")
    stream = torch.as_tensor(stream)
    if stream.dim() != 1 or stream.dtype.is_floating_point or stream.dtype == torch.bool:
        raise CookbookError(f"a token stream must be a 1-D tensor of integer ids, not {stream.dim()}-D {stream.dtype}")
    n = stream.numel()
    if n < 2:
        raise CookbookError(f"the data holds {n} token{'s' if n != 1 else ''}; perplexity needs at least 2")
    stream = stream.to(torch.int64)
    lo, hi = int(stream.min()), int(stream.max())
    if lo < 0:
        raise CookbookError(f"the data holds a negative token id {lo}; it is not a token stream")
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int) and hi >= vocab:
        raise CookbookError(
            f"the data holds token id {hi} but the model's vocabulary has {vocab} ids; was it tokenized with this model's tokenizer?"
        )

    spans = list(windows(n, seq_length, stride))
    # Windows of the same length go through the model together; only the last can be shorter.
    groups: list[list[tuple[int, int, int]]] = []
    for span in spans:
        same = groups and len(groups[-1]) < batch_size and groups[-1][0][1] - groups[-1][0][0] == span[1] - span[0]
        if same:
            groups[-1].append(span)
        else:
            groups.append([span])

    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    scored_tokens = 0
    start = time.perf_counter()
    progress, task = _progress(description, len(spans), show_progress)
    try:
        with progress, torch.no_grad():
            for group in groups:
                length = group[0][1] - group[0][0]
                chunk = torch.stack([stream[b : e + 1] for b, e, _ in group]).to(device, non_blocking=True)
                inputs, targets = chunk[:, :-1], chunk[:, 1:]
                out = model(inputs)
                logits = getattr(out, "logits", out)
                if hi >= logits.shape[-1]:
                    raise CookbookError(
                        f"the data holds token id {hi} but the model's vocabulary has {logits.shape[-1]} ids; "
                        "was it tokenized with this model's tokenizer?"
                    )
                targets = targets.to(logits.device)
                for row, (_, _, scored) in enumerate(group):  # the last `scored` predictions count (views, no copy)
                    total += _token_nll_sum(logits[row, length - scored :], targets[row, length - scored :]).to(
                        total.device
                    )
                scored_tokens += sum(s for _, _, s in group)
                dt = max(time.perf_counter() - start, 1e-9)
                progress.update(task, advance=len(group), rate=f"{scored_tokens / dt:,.0f} tokens/s")
    finally:
        model.train(was_training)
    return float(total.item()), scored_tokens


# --------------------------------------------------------------------------- sources


def file_stream(path, tokenizer: Tokenizer, text_key: str = "text", *, append_eod: bool = False) -> torch.Tensor:
    """The tokens of a jsonl file (or of the files a folder or glob names, in order): every document's
    ``tokenizer.tokenize(text)`` (plus EOD with ``append_eod``), concatenated; the same tokens
    ``cookbook preprocess`` writes to ``.bin`` for that file and flags (a list of strings is one
    sequence per string, empty sequences are dropped)."""
    files = expand_inputs([path])
    parts: list[np.ndarray] = []
    documents = 0
    for file in files:
        for first, lines, _ in read_lines(file):
            values = parse_lines(file, first, lines, [text_key], skip_bad=False, fix="fix it")[0][text_key]
            if not values:
                continue
            documents += len(values)
            flat, _, _ = encode_documents(tokenizer, values, append_eod)
            parts.append(np.asarray(flat, dtype=np.int64))
    if not documents:
        raise CookbookError(f"{path} holds no documents; give a jsonl file with one JSON object per line")
    tokens = np.concatenate(parts)
    if len(tokens) < 2:
        raise CookbookError(f"{path} tokenizes to {len(tokens)} token(s); perplexity needs at least 2")
    return torch.from_numpy(tokens)


def indexed_stream(prefix) -> torch.Tensor:
    """Every token of a Megatron indexed dataset (``PREFIX.bin``/``.idx``), in file order."""
    prefix = str(prefix)
    prefix = dataset_prefix(prefix)
    dataset = IndexedDataset(prefix)
    if dataset.num_tokens < 2:
        raise CookbookError(f"the dataset {prefix} holds {dataset.num_tokens} token(s); perplexity needs at least 2")
    return torch.from_numpy(np.array(dataset.bin, dtype=np.int64))  # a copy: writable, any dtype


# --------------------------------------------------------------------------- the recipe


def evaluate(
    model,
    sources: dict[str, torch.Tensor],
    seq_lengths: list[int],
    stride: int | None,
    batch_size: int,
    device,
    *,
    show_progress: bool = True,
) -> list[PerplexityResult]:
    """Perplexity of every source at every sequence length (source-major, in the order given).
    A stride larger than a sequence length is an error."""
    if not sources:
        raise CookbookError("nothing to evaluate; pass --ppl-files FILES or --data-path PREFIX")
    seq_lengths = list(seq_lengths)
    if not seq_lengths:
        raise CookbookError("no sequence length given; pass --seq-length 4096 (or several: 4096,8192)")
    for length in seq_lengths:
        check_window(length, stride)
    results = []
    for name, stream in sources.items():
        for length in seq_lengths:
            nll_sum, tokens = window_nll(
                model,
                stream,
                length,
                stride,
                batch_size,
                device,
                description=f"{name} @ {length}",
                show_progress=show_progress,
            )
            nll = nll_sum / tokens
            results.append(PerplexityResult(name, length, tokens, nll, math.exp(nll) if nll < 709 else math.inf))
    return results
