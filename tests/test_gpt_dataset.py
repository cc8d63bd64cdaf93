"""Samples equal megatron-core's GPTDataset: the same document, sample and shuffle indices and tokens."""

from __future__ import annotations

import numpy as np
import pytest

from cookbook.data.gpt_dataset import GPTSamples, parse_split, split_ranges
from cookbook.data.indexed import IndexedDataset
from cookbook.errors import CookbookError
from helpers_data import megatron_build

gpt = pytest.importorskip("megatron.core.datasets.gpt_dataset")
from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexed  # noqa: E402
from megatron.core.datasets.blended_megatron_dataset_config import (  # noqa: E402
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.utils import Split  # noqa: E402


class StubTokenizer:
    vocab_size = 1000
    eod = 0
    pad = -1
    unique_identifiers = {"class": "StubTokenizer"}


def megatron_dataset(prefix, lo, hi, seq_len, num_samples, seed):
    config = gpt.GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_len, split="1,0,0", tokenizer=StubTokenizer(),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, path_to_cache=None,
    )
    return gpt.GPTDataset(MegatronIndexed(prefix), prefix, np.arange(lo, hi, dtype=np.int32), num_samples, Split.train, config)


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    rng = np.random.default_rng(0)
    docs = [[list(rng.integers(1, 1000, rng.integers(1, 90)))] for _ in range(150)]
    return megatron_build(tmp_path_factory.mktemp("gpt") / "ds", docs)


@pytest.mark.parametrize("seq_len,num_samples,seed", [
    (16, None, 1234), (16, 50, 7), (32, 900, 1234), (7, 5000, 3), (64, 230, 99), (5, 2000, 1),
])
@pytest.mark.parametrize("split", [(0, 150), (10, 120)])
def test_indices_and_tokens_equal_megatron(prefix, seq_len, num_samples, seed, split):
    ours = GPTSamples(IndexedDataset(prefix), *split, seq_len, num_samples, seed)
    theirs = megatron_dataset(prefix, *split, seq_len, num_samples, seed)
    assert np.array_equal(ours.document_index, theirs.document_index)
    assert np.array_equal(ours.sample_index, theirs.sample_index)
    assert np.array_equal(ours.shuffle_index, theirs.shuffle_index)
    assert len(ours) == len(theirs)
    for i in list(range(min(len(ours), 40))) + [len(ours) - 1]:
        tokens = theirs[i]["tokens"].numpy()
        sample = ours[i]
        assert len(sample) == seq_len + 1
        assert np.array_equal(sample[:-1], tokens)
        assert np.array_equal(sample[1:], theirs[i]["labels"].numpy())


def test_split_matches_megatron():
    """The split matrix and rounding of megatron-core's BlendedMegatronDatasetBuilder."""
    for split, n in (("969,30,1", 1786), ("98,2,0", 1001), ("1", 10), ("1,1,1", 10), ("80,20", 7), ("1,1,1", 7)):
        ranges = split_ranges(parse_split(split), n)
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
        expected = [(int(round(lo * float(n))), int(round(hi * float(n)))) if (lo, hi) != (None, None) else None
                    for lo, hi in [m if m is not None else (None, None) for m in matrix]]
        assert [r if r[0] != r[1] else None for r in ranges] == [e if e and e[0] != e[1] else None for e in expected]


def test_bad_split_strings():
    for bad in ("a,b", "-1,2", "0,0,0", "1,2,3,4"):
        with pytest.raises(CookbookError):
            parse_split(bad)
