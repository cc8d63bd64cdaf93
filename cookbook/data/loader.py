"""Train / valid / test samples from Megatron-LM's ``--data-path``, and batches for data-parallel ranks.

Sample counts follow Megatron-LM, so the same flags cut and shuffle the same samples:
train ``train_iters x global_batch``, valid ``(train_iters // eval_interval + 1) x eval_iters x
global_batch``, test ``eval_iters x global_batch``.

Batches follow Megatron-LM's pretraining sampler: samples are taken in order from
``consumed_samples``; each micro-step takes ``micro_batch x dp`` consecutive samples and rank r
keeps the r-th slice of ``micro_batch``. The loader's whole state is ``consumed_samples``; it is
saved with every checkpoint, so a resumed run reads exactly the samples it would have read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cookbook.data.gpt_dataset import (
    BlendedSamples,
    DocumentFlags,
    GPTSamples,
    parse_split,
    samples_per_dataset,
    split_ranges,
)
from cookbook.data.indexed import IndexedDataset, bin_path, idx_path
from cookbook.errors import CookbookError


def parse_data_path(values: list[str] | str, check_files: bool = True) -> list[tuple[float, str]]:
    """``["A"]`` -> [(1, A)]; ``["0.3", "A", "0.7", "B"]`` -> [(0.3, A), (0.7, B)]. Strings split on whitespace.
    ``check_files``: each prefix's .bin/.idx must exist (off for a job checked away from its data)."""
    if isinstance(values, str):
        values = [values]
    items = [v for value in values for v in str(value).split()]
    if not items:
        raise CookbookError("no training data; pass --data-path PREFIX (or weight-prefix pairs: 0.3 A 0.7 B)")
    if len(items) == 1:
        pairs = [(1.0, items[0])]
    else:
        if len(items) % 2:
            raise CookbookError(f"--data-path {' '.join(items)}: give one prefix or weight-prefix pairs (0.3 A 0.7 B)")
        pairs = []
        for w, prefix in zip(items[::2], items[1::2]):
            try:
                weight = float(w)
            except ValueError:
                raise CookbookError(
                    f"--data-path: {w!r} should be a weight before prefix {prefix!r} (0.3 A 0.7 B)"
                ) from None
            if weight < 0:
                raise CookbookError(f"--data-path: weight {w} of {prefix} is negative")
            pairs.append((weight, prefix))
        if sum(w for w, _ in pairs) <= 0:
            raise CookbookError("--data-path: the weights sum to zero")
    for _, prefix in pairs if check_files else []:
        if not (idx_path(prefix).is_file() and bin_path(prefix).is_file()):
            raise CookbookError(f"--data-path: {prefix}.bin/.idx not found (give the prefix without the extension)")
    return pairs


@dataclass
class SplitSizes:
    train: int
    valid: int
    test: int


def split_sizes(train_iters: int, global_batch: int, eval_interval: int, eval_iters: int) -> SplitSizes:
    evals = (train_iters // eval_interval + 1) if eval_interval > 0 else 1
    return SplitSizes(train_iters * global_batch, evals * eval_iters * global_batch, eval_iters * global_batch)


def build_splits(
    data_path, split: str, seq_length: int, seed: int, sizes: SplitSizes, notes: list[str] | None = None
) -> dict[str, object | None]:
    """``{"train": samples, "valid": samples or None, "test": samples or None}``; each indexable,
    sample i = ``seq_length + 1`` int64 tokens.

    A dataset too small for its share of a split (``--split`` 969,30,1 gives a dataset of 60 documents no test
    documents) is refused for train, naming it and ``--split``; valid and test leave it out and blend the others
    (None when none is left). ``notes`` collects a line for each valid split that is empty or partial."""
    pairs = parse_data_path(data_path)
    fractions = parse_split(split)
    datasets = [IndexedDataset(prefix) for _, prefix in pairs]
    out = {}
    for i, (name, target) in enumerate(zip(("train", "valid", "test"), (sizes.train, sizes.valid, sizes.test))):
        ranges = [split_ranges(fractions, len(ds))[i] for ds in datasets]
        empty = [(ds, len(ds)) for ds, (lo, hi) in zip(datasets, ranges) if hi <= lo]
        if empty and name == "train":
            ds, n = empty[0]
            raise CookbookError(
                f"--split {split} leaves the train split of {ds.prefix} without documents (it holds {n}); "
                "give train a larger share, e.g. --split 98,2,0"
            )
        if target and fractions[i] > 0 and empty and name == "valid" and notes is not None:  # a share too small
            what = ", ".join(f"{ds.prefix} ({n} documents)" for ds, n in empty)
            rest = "the others'" if len(empty) < len(datasets) else "none: no validation loss"
            notes.append(
                f"--split {split} gives no valid documents to {what}; valid samples: {rest} (--split sets the shares)"
            )
        keep = [j for j, (lo, hi) in enumerate(ranges) if hi > lo]
        if target == 0 or not keep:
            out[name] = None
            continue
        if len(keep) == 1:
            (lo, hi), ds = ranges[keep[0]], datasets[keep[0]]
            out[name] = GPTSamples(ds, lo, hi, seq_length, target, seed)
        else:
            weights = [pairs[j][0] for j in keep]
            counts = samples_per_dataset([w / sum(weights) for w in weights], target)
            parts = [GPTSamples(datasets[j], *ranges[j], seq_length, n, seed) for j, n in zip(keep, counts)]
            out[name] = BlendedSamples(parts, weights, target)
    return out


def document_flags(data, vocab_size: int) -> DocumentFlags | None:
    """The packed-document flags of a job's ``[data]`` section (``DataConfig``) with their end-of-document id
    (``eod_id``, else the tokenizer's); None when all three are off."""
    if not (data.reset_position_ids or data.reset_attention_mask or data.eod_mask_loss):
        return None
    eod = data.eod_id
    if eod is None:
        if not data.tokenizer_model:
            raise CookbookError(
                "--reset-position-ids, --reset-attention-mask and --eod-mask-loss need the end-of-document "
                "token: give --tokenizer-model (its EOD) or --eod-id"
            )
        from cookbook.data.tokenizer import load_tokenizer

        eod = load_tokenizer(data.tokenizer_model, data.tokenizer_type).eod
        if eod is None:
            raise CookbookError(f"the tokenizer {data.tokenizer_model} has no end-of-document token; give --eod-id")
    if not 0 <= eod < vocab_size:
        raise CookbookError(f"--eod-id {eod} is not a token of the model's vocabulary of {vocab_size}")
    return DocumentFlags(eod, data.reset_position_ids, data.reset_attention_mask, data.eod_mask_loss)


class BatchLoader:
    """Micro batches ``[micro_batch, seq_length + 1]`` for one data-parallel rank."""

    def __init__(
        self, samples, micro_batch: int, dp_rank: int, dp_size: int, vocab_size: int, consumed_samples: int = 0
    ):
        self.samples, self.micro_batch, self.dp_rank, self.dp_size = samples, micro_batch, dp_rank, dp_size
        self.vocab_size = vocab_size
        self.consumed_samples = consumed_samples

    def next(self) -> torch.Tensor:
        start = self.consumed_samples + self.dp_rank * self.micro_batch
        end = self.consumed_samples + self.micro_batch * self.dp_size
        if end > len(self.samples):
            raise CookbookError(f"the data ran out after {self.consumed_samples} samples; it holds {len(self.samples)}")
        self.consumed_samples = end
        batch = np.stack([self.samples[i] for i in range(start, start + self.micro_batch)])
        if batch.max(initial=0) >= self.vocab_size:
            raise CookbookError(
                f"the data holds token id {int(batch.max())} but the model's vocabulary has {self.vocab_size} entries; "
                "was it tokenized with another tokenizer?"
            )
        return torch.from_numpy(batch)

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])
