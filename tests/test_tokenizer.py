"""The batch encoder (gigatoken where it is exact) equals the reference tokenizer document by document."""

from __future__ import annotations

import json
import random

import megatron_oracle as oracle
import numpy as np
import pytest
from conftest import TRICKY

from cookbook.data.tokenizer import PROBES, flat_to_ragged, gigatoken_scope, load_tokenizer
from cookbook.errors import CookbookError

ALPHABETS = {
    "ascii": [chr(i) for i in range(128)] + ["  ", "\r\n", "\n\n"] * 8,
    "text": list("abcdefghij klmnop  QRS\n\t.,;:'\"()<>/_-0123456789"),
    "unicode": list("aé€日本語😀\u034f\u0301\u200b\u00a0\u2028 \n<s>|")
    + ["<s>", "</s>", "<unk>", "<|end_of_text|>", "<EOD>"],
}


def random_texts(seed: int, n: int = 1500) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        alphabet = list(ALPHABETS)[i % len(ALPHABETS)]
        texts.append("".join(rng.choice(ALPHABETS[alphabet]) for _ in range(rng.randint(0, 60))))
    return texts + TRICKY + list(PROBES)


def megatron_for(kind, path):
    return {
        "Llama2Tokenizer": oracle.Llama2,
        "SentencePieceTokenizer": oracle.SentencePiece,
        "HuggingFaceTokenizer": oracle.HuggingFace,
    }[kind](path)


@pytest.mark.parametrize(
    "kind,fixture",
    [
        ("Llama2Tokenizer", "sp_model"),
        ("Llama2Tokenizer", "sp_unigram"),
        ("Llama2Tokenizer", "sp_nfkc"),
        ("SentencePieceTokenizer", "sp_nfkc"),
        ("Llama2Tokenizer", "sp_odd"),
        ("SentencePieceTokenizer", "sp_model"),
        ("HuggingFaceTokenizer", "hf_tokenizer"),
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_batch_encoding_equals_megatron_per_document(request, kind, fixture, seed, corpus_texts):
    path = request.getfixturevalue(fixture)
    tok = load_tokenizer(path, kind, threads=2)
    ref = megatron_for(kind, path)
    texts = random_texts(seed) + corpus_texts[:20]
    flat, lengths = tok.encode_batch(texts)
    got = [list(map(int, x)) for x in flat_to_ragged(flat, lengths)]
    assert got == [ref.tokenize(t) for t in texts]
    assert tok.vocab_size == ref.vocab_size and tok.eod == ref.eod


def test_gigatoken_is_used_where_exact(sp_model, sp_nfkc, sp_odd, hf_tokenizer):
    pytest.importorskip("gigatoken")
    assert [gigatoken_scope(p) for p in (sp_model, sp_nfkc, sp_odd)] == ["all", "ascii", "none"]
    assert load_tokenizer(sp_model, threads=2).backend == "gigatoken"
    assert load_tokenizer(sp_nfkc, threads=2).backend == "gigatoken"
    assert load_tokenizer(sp_odd, threads=2).backend == "sentencepiece"
    assert load_tokenizer(hf_tokenizer, threads=2).backend == "gigatoken"
    assert load_tokenizer(sp_model, backend="reference").backend == "sentencepiece"


def test_type_is_inferred_from_the_file(sp_model, hf_tokenizer):
    assert load_tokenizer(sp_model).type == "Llama2Tokenizer"
    assert load_tokenizer(hf_tokenizer).type == "HuggingFaceTokenizer"
    assert load_tokenizer(hf_tokenizer / "tokenizer.json").type == "HuggingFaceTokenizer"


def test_hf_tokenizer_that_declares_add_bos_and_eos_follows_transformers(tmp_path, hf_tokenizer):
    """With add_bos_token/add_eos_token in tokenizer_config.json, transformers decides what is added."""
    from transformers import AutoTokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text((hf_tokenizer / "tokenizer.json").read_text())
    config = json.loads((hf_tokenizer / "tokenizer_config.json").read_text())
    config.update(add_bos_token=True, add_eos_token=True)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours = load_tokenizer(folder, threads=2)
    theirs = AutoTokenizer.from_pretrained(str(folder))
    for text in ["hello world", "", "x <|end_of_text|> y"]:
        assert ours.tokenize(text) == theirs(text).input_ids
    assert ours.eod == theirs.eos_token_id


def test_decode_round_trips(sp_model, hf_tokenizer):
    text = "def f(x):\n    return x * 2  # ünïcode\n"
    for path in (sp_model, hf_tokenizer):
        tok = load_tokenizer(path)
        ids = tok.tokenize(text)
        assert tok.decode(ids[len(tok.prefix) :]) == text


@pytest.mark.parametrize("bad", ["unknown-type", "missing", "not-a-model", "folder-without-json"])
def test_bad_tokenizers_raise_one_clear_error(tmp_path, sp_model, bad):
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a sentencepiece model")
    args = {
        "unknown-type": (sp_model, "FancyTokenizer"),
        "missing": (tmp_path / "nope.model", None),
        "not-a-model": (junk, None),
        "folder-without-json": (tmp_path, "HuggingFaceTokenizer"),
    }[bad]
    with pytest.raises(CookbookError) as e:
        load_tokenizer(args[0], args[1])
    assert "\n" not in str(e.value)


def test_wrap_and_routing_keep_order(sp_nfkc):
    """Mixed batches (gigatoken for ASCII, sentencepiece for the rest) come back in input order."""
    tok = load_tokenizer(sp_nfkc, threads=2)
    texts = ["plain ascii", "ünï", "", "<s> control", "more ascii text", "日本"] * 5
    flat, lengths = tok.encode_batch(texts)
    assert [list(map(int, x)) for x in flat_to_ragged(flat, lengths)] == [tok.tokenize(t) for t in texts]
    assert np.all(lengths >= 1)


def test_append_eod_without_an_eos_token_is_a_clear_error(tmp_path, hf_tokenizer):
    """A bare tokenizer.json names no EOS: --append-eod must say so, and write nothing."""
    from helpers_data import write_jsonl

    from recipes.preprocess import PreprocessConfig, run

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_text((hf_tokenizer / "tokenizer.json").read_text())
    jsonl = write_jsonl(tmp_path / "in.jsonl", ["some text"])
    with pytest.raises(CookbookError, match="no EOS token"):
        run(
            PreprocessConfig([str(jsonl)], str(tmp_path / "out" / "ds"), str(bare), append_eod=True),
            show_progress=False,
        )
    assert list((tmp_path / "out").iterdir()) == []
    summary = run(PreprocessConfig([str(jsonl)], str(tmp_path / "out" / "ds"), str(bare)), show_progress=False)
    assert summary.documents == 1
