"""``cookbook pretrain`` with Megatron-LM's packed-document flags, in real processes.

``--reset-position-ids --reset-attention-mask --eod-mask-loss`` on data whose documents end with an EOD (as
``preprocess --append-eod`` writes them): the flags change the run, the attention kernel is recorded in the metrics,
and pipeline parallel (positions and document ids through the schedule, masked targets to the last stage, eval
included) and context parallel (documents across the balanced chunks, ranks scoring different token counts) equal
one process in every train and valid loss and gradient norm. Bad combinations stop with one line before training.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers_data import assert_one_line_error
from helpers_train import VOCAB, check, pretrain, train_flags
from test_trainer import LAYOUT_FLAGS, assert_same_metrics

from cookbook.data.indexed import IndexedDatasetWriter
from cookbook.engine.metrics import read_metrics
from cookbook.errors import CookbookError

EOD = VOCAB - 1
DOCUMENTS = ["--reset-position-ids", "--reset-attention-mask", "--eod-mask-loss", "--eod-id", str(EOD)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Documents of 3 to 40 tokens from a noisy counting rule, each ending with the EOD: about 8 per sample of 32."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 41, size=400)
    docs = [
        np.append((rng.integers(0, EOD) + np.cumsum(rng.choice([1, 1, 1, 2], size=n - 1))) % EOD, EOD) for n in lengths
    ]
    prefix = tmp_path_factory.mktemp("documents") / "docs"
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        w.add_documents(np.concatenate(docs), lengths)
    return str(prefix)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data):
    """One process, 4 layers, 4 micro batches of 2 per iteration, the three flags: the oracle of the layouts."""
    save = tmp_path_factory.mktemp("documents") / "one"
    check(pretrain(train_flags(data, save, 10, **LAYOUT_FLAGS) + DOCUMENTS))
    return save


def test_flags_change_the_run_and_the_kernel_is_recorded(tmp_path, data, reference):
    plain = tmp_path / "plain"
    check(pretrain(train_flags(data, plain, 10, **LAYOUT_FLAGS)))
    ours, theirs = read_metrics(reference / "metrics.jsonl"), read_metrics(plain / "metrics.jsonl")
    train = [r for r in ours if r.get("split", "train") == "train"]
    assert train and all(r["attention"] == "sdpa" for r in train)  # auto on CPU
    # Another run: at initialisation every token costs about log(vocab) either way, so the runs part as they learn.
    plain_train = [r for r in theirs if r.get("split", "train") == "train"]
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(train, plain_train)) > 1e-2
    assert train[-1]["loss"] < train[0]["loss"] - 0.3  # and it learns
    assert any(r.get("split") == "valid" for r in ours)


def test_pipeline_parallel_with_documents_equals_one_process(tmp_path, data, reference):
    pp = tmp_path / "pp"
    check(pretrain(train_flags(data, pp, 10, pipeline_model_parallel_size=2, **LAYOUT_FLAGS) + DOCUMENTS, nproc=2))
    assert_same_metrics(reference, pp)


def test_context_parallel_with_documents_equals_one_process(tmp_path, data, reference):
    cp = tmp_path / "cp"
    check(pretrain(train_flags(data, cp, 10, context_parallel_size=2, **LAYOUT_FLAGS) + DOCUMENTS, nproc=2))
    assert_same_metrics(reference, cp)


def test_bad_document_and_backend_flags_are_one_line(tmp_path, data):
    flags = train_flags(data, tmp_path / "x", 2)
    assert_one_line_error(
        pretrain(flags + ["--reset-attention-mask"]),
        "need the end-of-document token: give --tokenizer-model (its EOD) or --eod-id",
    )
    assert_one_line_error(
        pretrain(flags + ["--attention-backend", "flash"]), "--attention-backend flash needs a CUDA GPU"
    )
    assert not (tmp_path / "x").exists()


def test_eod_id_must_be_a_token_and_is_the_tokenizer_eod_by_default(tmp_path):
    from cookbook.data.loader import document_flags
    from cookbook.engine.config import DataConfig

    with pytest.raises(CookbookError, match="--eod-id 500 is not a token of the model's vocabulary of 96"):
        document_flags(DataConfig(eod_mask_loss=True, eod_id=500), 96)
    assert document_flags(DataConfig(eod_id=5), 96) is None  # every flag off
    flags = document_flags(DataConfig(reset_position_ids=True, eod_id=EOD), 96)
    assert (flags.eod, flags.reset_position_ids, flags.reset_attention_mask, flags.eod_mask_loss) == (
        EOD,
        True,
        False,
        False,
    )


def test_the_default_eod_is_the_tokenizer_s(sp_model):
    import sentencepiece

    from cookbook.data.loader import document_flags
    from cookbook.engine.config import DataConfig

    flags = document_flags(DataConfig(reset_attention_mask=True, tokenizer_model=str(sp_model)), 1000)
    assert flags.eod == sentencepiece.SentencePieceProcessor(model_file=str(sp_model)).eos_id()
