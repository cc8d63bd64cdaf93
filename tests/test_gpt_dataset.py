"""Samples equal megatron-core's GPTDataset: the same document, sample and shuffle indices and tokens."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_data import megatron_build

from cookbook.data.gpt_dataset import GPTSamples, parse_split, split_ranges
from cookbook.data.indexed import IndexedDataset
from cookbook.errors import CookbookError

gpt = pytest.importorskip("megatron.core.datasets.gpt_dataset")
from megatron.core.datasets.blended_megatron_dataset_config import (  # noqa: E402
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexed  # noqa: E402
from megatron.core.datasets.utils import Split  # noqa: E402


class StubTokenizer:
    vocab_size = 1000
    eod = 0
    pad = -1
    unique_identifiers = {"class": "StubTokenizer"}


def megatron_dataset(
    prefix,
    lo,
    hi,
    seq_len,
    num_samples,
    seed,
    reset_position_ids=False,
    reset_attention_mask=False,
    eod_mask_loss=False,
):
    config = gpt.GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_len,
        split="1,0,0",
        tokenizer=StubTokenizer(),
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        path_to_cache=None,
    )
    return gpt.GPTDataset(
        MegatronIndexed(prefix), prefix, np.arange(lo, hi, dtype=np.int32), num_samples, Split.train, config
    )


@pytest.fixture(scope="module")
def prefix(tmp_path_factory):
    rng = np.random.default_rng(0)
    docs = [[list(rng.integers(1, 1000, rng.integers(1, 90)))] for _ in range(150)]
    return megatron_build(tmp_path_factory.mktemp("gpt") / "ds", docs)


@pytest.mark.parametrize(
    "seq_len,num_samples,seed",
    [
        (16, None, 1234),
        (16, 50, 7),
        (32, 900, 1234),
        (7, 5000, 3),
        (64, 230, 99),
        (5, 2000, 1),
    ],
)
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


@pytest.fixture(scope="module")
def documents_prefix(tmp_path_factory):
    """Documents that end with the EOD (StubTokenizer.eod = 0), as preprocess --append-eod writes them."""
    rng = np.random.default_rng(1)
    docs = [[list(rng.integers(1, 1000, rng.integers(0, 40))) + [StubTokenizer.eod]] for _ in range(120)]
    return megatron_build(tmp_path_factory.mktemp("gpt_eod") / "ds", docs)


@pytest.mark.parametrize(
    "flags", [(True, False, False), (False, True, False), (False, False, True), (True, True, True)]
)
def test_document_flags_equal_megatron(documents_prefix, flags):
    """--reset-position-ids, --reset-attention-mask and --eod-mask-loss: our samples put through ``document_inputs``
    give megatron-core's position ids, attention mask (True where it masks) and loss mask, sample by sample."""
    import torch

    from cookbook.data.gpt_dataset import DocumentFlags, document_inputs

    ours = GPTSamples(IndexedDataset(documents_prefix), 0, 120, 48, 300, 5)
    theirs = megatron_dataset(documents_prefix, 0, 120, 48, 300, 5, *flags)
    positions, documents, keep = document_inputs(
        torch.from_numpy(np.stack([ours[i] for i in range(len(ours))]))[:, :-1],
        DocumentFlags(StubTokenizer.eod, *flags),
    )
    causal = torch.ones(48, 48, dtype=torch.bool).tril()
    for i in range(len(ours)):
        want = theirs[i]
        assert torch.equal(torch.from_numpy(ours[i][:-1]), want["tokens"])
        assert torch.equal(positions[i] if flags[0] else torch.arange(48), want["position_ids"])
        allowed = causal & (documents[i][:, None] == documents[i][None, :]) if flags[1] else causal
        assert torch.equal(~want["attention_mask"][0], allowed)
        assert torch.equal(keep[i].float() if flags[2] else torch.ones(48), want["loss_mask"])
    assert flags[1] is False or any(len(set(documents[i].tolist())) > 2 for i in range(len(ours)))  # documents packed


def test_split_matches_megatron():
    """The split matrix and rounding of megatron-core's BlendedMegatronDatasetBuilder."""
    for split, n in (("969,30,1", 1786), ("98,2,0", 1001), ("1", 10), ("1,1,1", 10), ("80,20", 7), ("1,1,1", 7)):
        ranges = split_ranges(parse_split(split), n)
        matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
        expected = [
            (int(round(lo * float(n))), int(round(hi * float(n)))) if (lo, hi) != (None, None) else None
            for lo, hi in [m if m is not None else (None, None) for m in matrix]
        ]
        assert [r if r[0] != r[1] else None for r in ranges] == [e if e and e[0] != e[1] else None for e in expected]


def test_bad_split_strings():
    for bad in ("a,b", "-1,2", "0,0,0", "1,2,3,4"):
        with pytest.raises(CookbookError):
            parse_split(bad)


@pytest.mark.parametrize(
    "weights,size",
    [
        ([0.3, 0.7], 1000),
        ([1, 1, 1], 777),
        ([0.5, 0.25, 0.125, 0.125], 3000),
        ([1.0], 10),
        ([0.001, 0.999], 5000),
    ],
)
def test_blending_equals_megatron_helper(weights, size):
    from megatron.core.datasets import helpers_cpp

    from cookbook.data.gpt_dataset import blend_indices, normalize_weights

    w = normalize_weights(weights)
    dataset_index = np.zeros(size, dtype=np.int16)
    sample_index = np.zeros(size, dtype=np.int64)
    helpers_cpp.build_blending_indices(dataset_index, sample_index, np.array(w, dtype=np.float64), len(w), size, False)
    ours = blend_indices(w, size)
    assert np.array_equal(ours[0], dataset_index) and np.array_equal(ours[1], sample_index)


def test_samples_per_dataset_matches_megatron_builder():
    from megatron.core.datasets.blended_megatron_dataset_builder import _get_size_per_split_per_dataset

    from cookbook.data.gpt_dataset import normalize_weights, samples_per_dataset

    for weights, target in (([0.3, 0.7], 1000), ([1, 2, 3], 12345), ([5], 7)):
        w = normalize_weights(weights)
        theirs = _get_size_per_split_per_dataset(w, [target], 0.005)
        assert samples_per_dataset(w, target) == [row[0] for row in theirs]


def test_blended_samples_draw_from_each_dataset(prefix):
    from cookbook.data.gpt_dataset import BlendedSamples

    ds = IndexedDataset(prefix)
    a, b = GPTSamples(ds, 0, 75, 16, 200, 1), GPTSamples(ds, 75, 150, 16, 200, 2)
    blend = BlendedSamples([a, b], [0.25, 0.75], 200)
    counts = np.bincount(blend.dataset_index, minlength=2)
    assert counts.tolist() == [50, 150]
    assert np.array_equal(blend[0], (a if blend.dataset_index[0] == 0 else b)[int(blend.dataset_sample_index[0])])
    with pytest.raises(CookbookError):
        BlendedSamples([a], [-1.0], 10)


def test_a_dataset_too_small_for_a_split(prefix, tmp_path):
    """A blend's small dataset (20 documents: 969,30,1 gives it one valid document and no test one) is left out of the
    splits it has no documents in, the others' weights kept, with a note naming it and --split; an empty train
    share is refused, naming the dataset and --split."""
    from cookbook.data.loader import SplitSizes, build_splits

    rng = np.random.default_rng(1)
    small = megatron_build(tmp_path / "small", [[list(rng.integers(1, 1000, 40))] for _ in range(20)])
    notes: list[str] = []
    splits = build_splits(["0.5", prefix, "0.5", small], "969,30,1", 16, 1, SplitSizes(100, 40, 40), notes)
    assert len(splits["valid"]) == 40 and np.bincount(splits["valid"].dataset_index).tolist() == [20, 20]
    assert splits["test"] is None and notes == []  # neither has test documents; both have valid ones
    splits = build_splits(["0.5", prefix, "0.5", small], "95,2,3", 16, 1, SplitSizes(100, 40, 40), notes)
    assert isinstance(splits["valid"], GPTSamples) and splits["valid"].dataset.prefix == str(
        prefix
    )  # the big one alone
    assert len(splits["test"]) == 40 and np.bincount(splits["test"].dataset_index).tolist() == [20, 20]
    assert len(notes) == 1 and str(small) in notes[0] and "--split 95,2,3" in notes[0] and "20 documents" in notes[0]
    with pytest.raises(CookbookError, match=r"--split 1,98,1 leaves the train split of .*small without documents"):
        build_splits(["0.5", prefix, "0.5", small], "1,98,1", 16, 1, SplitSizes(100, 40, 40))
