"""`cookbook preprocess` writes the same bytes as Megatron-LM's tools/preprocess_data.py.

The oracle (tests/megatron_oracle.py) tokenizes one document at a time with Megatron-LM's tokenizer
semantics and writes with megatron-core's IndexedDatasetBuilder."""

from __future__ import annotations

import json

import megatron_oracle as oracle
import numpy as np
import pytest
from helpers_data import write_jsonl
from megatron.core.datasets.indexed_dataset import IndexedDataset as MegatronIndexedDataset

from cookbook.data.indexed import IndexedDataset
from recipes.preprocess import PreprocessConfig, run


def assert_same_files(ours: str, theirs: str) -> None:
    for ext in (".bin", ".idx"):
        a, b = open(ours + ext, "rb").read(), open(theirs + ext, "rb").read()
        assert a == b, f"{ext} differs ({len(a)} vs {len(b)} bytes)"


def preprocess_both(tmp_path, jsonl, megatron_tok, **kwargs):
    keys = kwargs.get("json_keys", ["text"])
    oracle.megatron_preprocess(jsonl, str(tmp_path / "megatron"), megatron_tok, keys, kwargs.get("append_eod", False))
    summary = run(
        PreprocessConfig(inputs=[str(jsonl)], output_prefix=str(tmp_path / "ours"), **kwargs), show_progress=False
    )
    return summary, keys


CASES = {
    "Llama2Tokenizer": lambda f: (str(f["sp_model"]), oracle.Llama2(f["sp_model"])),
    "Llama2Tokenizer-unigram": lambda f: (str(f["sp_unigram"]), oracle.Llama2(f["sp_unigram"])),
    "Llama2Tokenizer-nfkc": lambda f: (str(f["sp_nfkc"]), oracle.Llama2(f["sp_nfkc"])),
    "Llama2Tokenizer-odd": lambda f: (str(f["sp_odd"]), oracle.Llama2(f["sp_odd"])),
    "SentencePieceTokenizer": lambda f: (str(f["sp_model"]), oracle.SentencePiece(f["sp_model"])),
    "HuggingFaceTokenizer": lambda f: (str(f["hf_tokenizer"]), oracle.HuggingFace(f["hf_tokenizer"])),
}


@pytest.fixture
def fixtures(request):
    return {
        name: request.getfixturevalue(name) for name in ("sp_model", "sp_unigram", "sp_nfkc", "sp_odd", "hf_tokenizer")
    }


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("append_eod", [True, False])
@pytest.mark.parametrize("case", list(CASES))
def test_byte_identical_to_megatron(tmp_path, fixtures, corpus_texts, case, append_eod, backend):
    path, megatron_tok = CASES[case](fixtures)
    jsonl = write_jsonl(tmp_path / "in.jsonl", corpus_texts)
    summary, _ = preprocess_both(
        tmp_path,
        jsonl,
        megatron_tok,
        tokenizer_model=path,
        tokenizer_type=case.split("-")[0],
        append_eod=append_eod,
        tokenizer_backend=backend,
        block_mb=0.01,
        workers=2,
    )
    assert_same_files(summary.outputs["text"], str(tmp_path / "megatron_text_document"))
    assert summary.documents == len(corpus_texts)


def test_gpt2_bpe_byte_identical(tmp_path, gpt2_files, corpus_texts):
    vocab, merges = gpt2_files
    jsonl = write_jsonl(tmp_path / "in.jsonl", corpus_texts + ["literal <|endoftext|> stays text"])
    summary, _ = preprocess_both(
        tmp_path,
        jsonl,
        oracle.GPT2(vocab, merges),
        tokenizer_type="GPT2BPETokenizer",
        vocab_file=str(vocab),
        merge_file=str(merges),
        append_eod=True,
    )
    assert_same_files(summary.outputs["text"], str(tmp_path / "megatron_text_document"))


def test_empty_documents_repeat_document_indices(tmp_path, sp_model):
    """SentencePieceTokenizer adds no BOS: an empty text adds no sequence but a document index."""
    jsonl = write_jsonl(tmp_path / "in.jsonl", ["hello", "", "world", "", ""])
    summary, _ = preprocess_both(
        tmp_path,
        jsonl,
        oracle.SentencePiece(sp_model),
        tokenizer_model=str(sp_model),
        tokenizer_type="SentencePieceTokenizer",
        append_eod=True,
    )
    assert_same_files(summary.outputs["text"], str(tmp_path / "megatron_text_document"))
    ds = MegatronIndexedDataset(summary.outputs["text"])
    assert len(ds) == 2 and list(ds.document_indices) == [0, 1, 1, 2, 2, 2]
    assert summary.empty == 3 and summary.sequences == 2


def test_several_keys_and_sentence_lists(tmp_path, sp_model, corpus_texts):
    records = [{"text": t, "title": corpus_texts[-(i + 1)], "meta": i} for i, t in enumerate(corpus_texts[:40])] + [
        {"text": ["first sentence.", "", " second one", "<s> third"], "title": ["", ""]}
    ]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary, keys = preprocess_both(
        tmp_path,
        jsonl,
        oracle.Llama2(sp_model),
        tokenizer_model=str(sp_model),
        json_keys=["text", "title"],
        append_eod=True,
    )
    for key in keys:
        assert_same_files(summary.outputs[key], str(tmp_path / f"megatron_{key}_document"))


def test_smallest_sufficient_dtype(tmp_path, hf_tokenizer, corpus_texts):
    """A vocabulary of 65,500 ids or more needs int32, as megatron-core's DType.optimal_dtype says."""
    from tokenizers import AddedToken, Tokenizer

    big = tmp_path / "big_tok"
    big.mkdir()
    tok = Tokenizer.from_file(str(hf_tokenizer / "tokenizer.json"))
    tok.add_tokens([AddedToken(f"<extra_{i}>", special=False) for i in range(65500)])
    tok.save(str(big / "tokenizer.json"))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        (big / name).write_text((hf_tokenizer / name).read_text())
    jsonl = write_jsonl(tmp_path / "in.jsonl", corpus_texts[:20] + ["uses <extra_65000> inside"])
    summary, _ = preprocess_both(tmp_path, jsonl, oracle.HuggingFace(big), tokenizer_model=str(big), append_eod=True)
    assert_same_files(summary.outputs["text"], str(tmp_path / "megatron_text_document"))
    assert IndexedDataset(summary.outputs["text"]).dtype == np.int32


def test_reader_matches_megatron_reader(tmp_path, sp_model, corpus_texts):
    jsonl = write_jsonl(tmp_path / "in.jsonl", corpus_texts)
    s = run(
        PreprocessConfig(inputs=[str(jsonl)], output_prefix=str(tmp_path / "o"), tokenizer_model=str(sp_model)),
        show_progress=False,
    )
    ours, theirs = IndexedDataset(s.outputs["text"]), MegatronIndexedDataset(s.outputs["text"])
    assert len(ours) == len(theirs)
    assert np.array_equal(ours.document_indices, theirs.document_indices)
    for i in range(len(ours)):
        assert np.array_equal(ours[i], theirs[i])
