"""Training samples cut from an indexed dataset, in the same order as Megatron-LM's GPTDataset.

For a split (a range of the dataset's sequences), a seed, a sequence length s and a number of
samples N:

1. epochs E: the fewest with ``E * tokens_per_epoch >= N * s + 1``;
2. document index: the split's sequence ids tiled E times and shuffled with
   ``numpy.random.RandomState(seed)``; the last epoch shuffled on its own when it supplies fewer than
   80% of an epoch's samples, so the first E - 1 epochs stay a proper shuffle;
3. sample index: sample k covers tokens ``[k s, k s + s + 1)`` of the documents concatenated in that
   order (consecutive samples share one token), stored as (position in the document index, offset);
4. shuffle index: a permutation of the samples from the same random state (the final epoch's
   samples again shuffled separately).

``tokens = sample[:-1]`` and ``labels = sample[1:]``. Several datasets blend by weight with
Megatron-LM's greedy interleave. Proven equal to megatron-core's GPTDataset and blending helper in
tests/test_gpt_dataset.py.

A sample spans several documents, each ended by the tokenizer's EOD. Megatron-LM's three flags treat them
apart (``document_inputs``, equal to megatron-core's masks and position ids for the same flags):
``--reset-position-ids`` restarts positions after each EOD, ``--reset-attention-mask`` lets a token attend
only within its document, ``--eod-mask-loss`` scores no prediction made from an EOD (the next document's
first token). The engine computes them per micro batch from the tokens, on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cookbook.data.indexed import IndexedDataset
from cookbook.errors import CookbookError


def parse_split(split: str) -> list[float]:
    """``"969,30,1"`` -> normalised fractions for train, valid, test."""
    try:
        weights = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError as e:
        raise CookbookError(f"--split {split!r} must be comma-separated numbers such as 969,30,1") from e
    weights += [0.0] * (3 - len(weights))
    if len(weights) != 3 or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise CookbookError(f"--split {split!r} must be up to three non-negative numbers with a positive sum")
    return [w / sum(weights) for w in weights]


def split_ranges(fractions: list[float], n: int) -> list[tuple[int, int]]:
    """Megatron-LM's split of n sequences: split i is ``[round(lo_i * n), round(hi_i * n))`` with
    lo/hi the cumulative fractions."""
    bounds = np.concatenate([[0.0], np.cumsum(fractions)]).tolist()
    return [(int(round(bounds[i] * float(n))), int(round(bounds[i + 1] * float(n)))) for i in range(len(fractions))]


def num_epochs(tokens_per_epoch: int, num_samples: int | None, seq_len: int) -> int:
    if num_samples is None:
        return 1
    needed = num_samples * seq_len + 1
    return max(1, -(-needed // tokens_per_epoch))


def document_index(documents: np.ndarray, epochs: int, rng: np.random.RandomState, separate_final: bool) -> np.ndarray:
    if not separate_final or epochs == 1:
        index = np.tile(documents.astype(np.int32), epochs)
        rng.shuffle(index)
        return index
    first = document_index(documents, epochs - 1, rng, False)
    return np.concatenate((first, document_index(documents, 1, rng, False)))


def sample_index(sizes: np.ndarray, doc_index: np.ndarray, seq_len: int, num_samples: int) -> np.ndarray:
    """[num_samples + 1, 2]: where each sample starts, as (position in doc_index, offset in that document).

    Sample k starts at token k * seq_len of the concatenated documents (the last partial sample is
    dropped, so every boundary lies inside the data)."""
    lengths = sizes[doc_index].astype(np.int64)
    ends = np.cumsum(lengths)
    starts = np.arange(num_samples + 1, dtype=np.int64) * seq_len
    where = np.searchsorted(ends, starts, side="right")
    return np.stack([where, starts - (ends[where] - lengths[where])], axis=1)


def shuffle_index(num_samples: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total:
        return first
    last = np.arange(num_samples, total, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


class GPTSamples:
    """``num_samples`` samples of ``seq_len + 1`` tokens from sequences ``[lo, hi)`` of a dataset."""

    def __init__(self, dataset: IndexedDataset, lo: int, hi: int, seq_len: int, num_samples: int | None, seed: int):
        if hi <= lo:
            raise CookbookError(f"{dataset.prefix}: the split holds no documents (sequences {lo}..{hi})")
        self.dataset, self.seq_len = dataset, seq_len
        documents = np.arange(lo, hi)
        sizes = dataset.sequence_lengths
        tokens_per_epoch = int(sizes[documents].sum(dtype=np.int64))
        if tokens_per_epoch <= 1:
            raise CookbookError(f"{dataset.prefix}: the split holds {tokens_per_epoch} tokens; it needs more than one")
        epochs = num_epochs(tokens_per_epoch, num_samples, seq_len)
        per_epoch = (tokens_per_epoch - 1) // seq_len
        separate_final = False
        if epochs > 1:
            before_final = ((epochs - 1) * tokens_per_epoch - 1) // seq_len
            separate_final = num_samples - before_final < int(0.80 * per_epoch)
        rng = np.random.RandomState(seed)
        self.document_index = document_index(documents, epochs, rng, separate_final)
        total = (epochs * tokens_per_epoch - 1) // seq_len
        self.sample_index = sample_index(sizes, self.document_index, seq_len, total)
        first = before_final if separate_final else total
        self.shuffle_index = shuffle_index(first, total, rng)
        self.num_samples = total if num_samples is None else num_samples

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def __getitem__(self, i: int) -> np.ndarray:
        """The ``seq_len + 1`` tokens of sample ``i``."""
        s = int(self.shuffle_index[i])
        (d0, o0), (d1, o1) = self.sample_index[s], self.sample_index[s + 1]
        docs = self.document_index
        if d0 == d1:
            return np.asarray(self._sequence(docs[d0])[o0 : o1 + 1], dtype=np.int64)
        parts = [self._sequence(docs[d0])[o0:]]
        parts += [self._sequence(docs[d]) for d in range(d0 + 1, d1)]
        parts.append(self._sequence(docs[d1])[: o1 + 1])
        return np.concatenate(parts).astype(np.int64)

    def _sequence(self, i: int) -> np.ndarray:
        return self.dataset[int(i)]


# --------------------------------------------------------------------------- blending


def normalize_weights(weights: list[float]) -> list[float]:
    w = np.asarray(weights, dtype=np.float64)
    if len(w) == 0 or (w < 0).any() or w.sum() <= 0:
        raise CookbookError(f"blend weights {list(weights)} must be non-negative with a positive sum")
    return (w / w.sum()).tolist()


def samples_per_dataset(weights: list[float], target: int, surplus: float = 0.005) -> list[int]:
    """How many samples each blended dataset must supply: ``ceil(ceil(target * w) * (1 + surplus))``."""
    return [int(math.ceil(math.ceil(target * w) * (1 + surplus))) for w in weights]


def blend_indices(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron-LM's greedy interleave: sample s comes from the dataset with the largest
    ``w_d * max(s, 1) - used_d`` (the first on ties). Returns (dataset of each sample, its index
    within that dataset)."""
    w = [float(x) for x in weights]
    used = [0] * len(w)
    dataset = np.empty(size, dtype=np.int16)
    within = np.empty(size, dtype=np.int64)
    for s in range(size):
        t = float(max(s, 1))
        best, best_error = 0, w[0] * t - used[0]
        for d in range(1, len(w)):
            error = w[d] * t - used[d]
            if error > best_error:
                best, best_error = d, error
        dataset[s], within[s] = best, used[best]
        used[best] += 1
    return dataset, within


class BlendedSamples:
    """``size`` samples drawn from several GPTSamples in proportion to ``weights``."""

    def __init__(self, datasets: list[GPTSamples], weights: list[float], size: int):
        self.datasets = datasets
        self.dataset_index, self.dataset_sample_index = blend_indices(normalize_weights(weights), size)

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]


# --------------------------------------------------------------------------- packed documents


@dataclass(frozen=True)
class DocumentFlags:
    """Megatron-LM's flags for samples packed from documents that each end with ``eod``."""

    eod: int
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False


def document_inputs(tokens: torch.Tensor, flags: DocumentFlags):
    """Megatron-LM's ``get_ltor_masks_and_position_ids`` for input tokens [b, s] (``sample[:-1]``), in the form
    the engine takes them: (positions [b, s] or None, documents [b, s] or None, loss mask [b, s] or None).

    - positions (``reset_position_ids``): 0, 1, ... restarting after each EOD (an EOD ends its document);
    - documents (``reset_attention_mask``): the number of EODs before each token; token i may attend to token
      j <= i of the same document (megatron-core's boolean mask, inverted: True where it masks);
    - loss mask (``eod_mask_loss``): False where the input token is an EOD."""
    is_eod = tokens == flags.eod
    positions = documents = keep = None
    if flags.reset_position_ids:
        index = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        after_eod = torch.zeros_like(is_eod)
        after_eod[:, 1:] = is_eod[:, :-1]
        positions = index - torch.where(after_eod, index, 0).cummax(dim=1).values
    if flags.reset_attention_mask:
        documents = (is_eod.cumsum(dim=1) - is_eod.long()).to(torch.int32)
    if flags.eod_mask_loss:
        keep = ~is_eod
    return positions, documents, keep
