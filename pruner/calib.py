"""Calibration samples: token windows from a Megatron indexed dataset, checked against the model's vocabulary."""

from __future__ import annotations

import numpy as np
import torch

from cookbook.data.indexed import IndexedDataset, dataset_prefix
from cookbook.errors import CookbookError


def calibration_samples(prefix: str, samples: int, seq_length: int, vocab_size: int) -> torch.Tensor:
    """``samples`` windows of ``seq_length + 1`` tokens [samples, seq_length + 1] (int64), spread evenly over the
    dataset's token stream (they overlap only when the data is shorter than ``samples x seq_length``)."""
    if not isinstance(samples, int) or samples < 1:
        raise CookbookError(f"--calib-samples must be a positive number of samples, not {samples!r}")
    if not isinstance(seq_length, int) or seq_length < 1:
        raise CookbookError(f"--calib-seq-length must be a positive number of tokens, not {seq_length!r}")
    prefix = dataset_prefix(prefix)
    try:
        dataset = IndexedDataset(prefix)
    except CookbookError as e:
        raise CookbookError(f"--calib-data: {e}") from None
    stream, need = dataset.bin, seq_length + 1
    if dataset.num_tokens < need:
        raise CookbookError(
            f"--calib-data {prefix} holds {dataset.num_tokens} tokens, fewer than one sample of "
            f"{need}; give more data or a shorter --calib-seq-length"
        )
    starts = np.linspace(0, dataset.num_tokens - need, samples).round().astype(np.int64)
    tokens = torch.from_numpy(np.stack([np.asarray(stream[s : s + need], dtype=np.int64) for s in starts]))
    top = int(tokens.max())
    if top >= vocab_size:
        raise CookbookError(
            f"--calib-data {prefix} holds token id {top} but the model's vocabulary has {vocab_size} ids; "
            "calibrate on data made with the model's tokenizer"
        )
    return tokens


__all__ = ["calibration_samples"]
