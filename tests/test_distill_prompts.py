"""Prompts for distillation: prefixes of pretraining documents, from indexed data or jsonl, in a seeded order."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers_data import documents, make_texts, preprocess, write_jsonl

from cookbook.data.indexed import IndexedDatasetWriter
from cookbook.data.tokenizer import load_tokenizer
from cookbook.errors import CookbookError
from inference_distill.prompts import Prompt, PromptSource

N = 8  # prefix tokens in most tests


@pytest.fixture(scope="module")
def tok(sp_model):
    return load_tokenizer(sp_model)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, sp_model):
    """(jsonl path, indexed prefix with --append-eod, its documents' ids) for 60 documents of 1 to 40 words,
    with a blank line in the jsonl (preprocess skips it, so do prompts)."""
    folder = tmp_path_factory.mktemp("prompts")
    texts = make_texts(60, seed=3, min_words=1, max_words=40)
    texts[5] = "short"
    path = folder / "corpus.jsonl"
    write_jsonl(path, texts[:10])
    with open(path, "a", encoding="utf-8") as f:
        f.write("\n")
        for t in texts[10:]:
            f.write(json.dumps({"text": t}) + "\n")
    prefix = preprocess([path], folder / "corpus", sp_model, append_eod=True)
    return path, prefix, documents(prefix)


def content(doc: list[int], tok) -> list[int]:
    return [t for t in doc if t not in (tok.bos, tok.eod)]


def line_of(doc: int) -> int:
    """The jsonl line of indexed document ``doc`` (line 11 is blank)."""
    return doc + 1 if doc < 10 else doc + 2


def test_prefix_is_the_first_tokens_of_the_document_without_bos_or_eod(corpus, tok):
    _, prefix, docs = corpus
    assert all(d[0] == tok.bos and d[-1] == tok.eod for d in docs)  # what the prompts must leave out
    source = PromptSource(prefix, tok, prefix_tokens=N)
    prompts = source.prompts(0, source.count())
    assert prompts and all(isinstance(p, Prompt) for p in prompts)
    for p in prompts:
        ids = content(docs[p.doc_id], tok)
        assert p.tokens == N
        assert source._corpus.fetch(p.doc_id, N)[1].tolist() == ids[:N]
        assert p.text == tok.decode(ids[:N])
    assert [p.index for p in prompts] == list(range(len(prompts)))
    whole = PromptSource(prefix, tok, prefix_fraction=1.0, min_doc_tokens=0)  # prompts that reach the EOD
    for p in whole.prompts(0, whole.count()):
        assert whole._corpus.fetch(p.doc_id, p.tokens)[1].tolist() == content(docs[p.doc_id], tok)


def test_jsonl_and_indexed_data_give_the_same_prompts(corpus, tok):
    path, prefix, _ = corpus
    for kw in ({"prefix_tokens": N}, {"prefix_fraction": 0.3}, {"prefix_tokens": 5, "min_doc_tokens": 20}):
        a = PromptSource(prefix, tok, seed=7, **kw)
        b = PromptSource(path, tok, seed=7, **kw)
        assert (a.kind, b.kind) == ("indexed", "jsonl")
        pa, pb = a.prompts(0, a.count()), b.prompts(0, b.count())
        assert len(pa) == len(pb) > 10
        assert [(p.index, p.text, p.tokens) for p in pa] == [(p.index, p.text, p.tokens) for p in pb]
        assert [f"corpus.jsonl:{line_of(p.doc_id)}" for p in pa] == [p.doc_id for p in pb]
        assert a.identity()["prompt_order"] == b.identity()["prompt_order"]


def test_only_documents_longer_than_the_prefix_or_min_doc_tokens_are_used(corpus, tok):
    _, prefix, docs = corpus
    lengths = [len(content(d, tok)) for d in docs]
    used = lambda s: sorted(p.doc_id for p in s.prompts(0, s.count()))  # noqa: E731
    default = PromptSource(prefix, tok, prefix_tokens=N)
    assert used(default) == [d for d, n in enumerate(lengths) if n > N]
    assert 0 < default.count() < len(docs)  # the corpus has documents too short for the prefix
    at_least = PromptSource(prefix, tok, prefix_tokens=N, min_doc_tokens=20)
    assert used(at_least) == [d for d, n in enumerate(lengths) if n >= 20]
    exact = PromptSource(prefix, tok, prefix_tokens=N, min_doc_tokens=0)  # the whole document may be the prompt
    assert used(exact) == [d for d, n in enumerate(lengths) if n >= N]


def test_prefix_fraction_takes_a_share_of_each_document(corpus, tok):
    _, prefix, docs = corpus
    source = PromptSource(prefix, tok, prefix_fraction=0.25)
    prompts = source.prompts(0, source.count())
    assert len({p.tokens for p in prompts}) > 3
    for p in prompts:
        ids = content(docs[p.doc_id], tok)
        assert p.tokens == max(1, math.floor(0.25 * len(ids))) < len(ids)
        assert p.text == tok.decode(ids[: p.tokens])
    whole = PromptSource(prefix, tok, prefix_fraction=1.0, min_doc_tokens=0)
    assert whole.count() == len(docs)
    for p in whole.prompts(0, 5):
        assert p.text == tok.decode(content(docs[p.doc_id], tok))


def test_order_is_a_seeded_permutation_of_the_eligible_documents(corpus, tok):
    _, prefix, docs = corpus

    def order(seed, **kw):
        s = PromptSource(prefix, tok, prefix_tokens=N, seed=seed, **kw)
        return [p.doc_id for p in s.prompts(0, s.count())]

    first = order(1)
    eligible = [d for d, doc in enumerate(docs) if len(content(doc, tok)) > N]
    assert sorted(first) == eligible and len(set(first)) == len(first)
    assert first != eligible  # shuffled
    assert order(1) == first  # stable
    assert order(2) != first
    perm = np.random.default_rng(1).permutation(len(docs)).tolist()
    assert first == [d for d in perm if d in set(eligible)]
    stricter = order(1, min_doc_tokens=25)  # the same order, minus the documents it drops
    assert stricter == [d for d in first if d in set(stricter)] and len(stricter) < len(first)


def test_prompts_by_index_do_not_depend_on_what_was_asked_before(corpus, tok):
    path, prefix, _ = corpus
    for data in (prefix, path):
        source = PromptSource(data, tok, prefix_tokens=N, seed=3)
        n = source.count()
        whole = source.prompts(0, n)
        assert source.prompts(0, 7) + source.prompts(7, 20) + source.prompts(20, n + 100) == whole
        assert PromptSource(data, tok, prefix_tokens=N, seed=3).prompts(13, 21) == whole[13:21]  # a resumed run
        assert source.prompts(n, n + 5) == [] and source.prompts(4, 4) == []
        capped = PromptSource(data, tok, prefix_tokens=N, seed=3, num_prompts=9)
        assert capped.count() == 9 and capped.prompts(0, 100) == whole[:9]
        assert PromptSource(data, tok, prefix_tokens=N, seed=3, num_prompts=10**6).count() == n


def test_a_document_of_several_sequences_is_one_document(tmp_path, tok):
    """Preprocess with split sentences writes one sequence per sentence ([BOS s1] [BOS s2 EOD]): the prompt runs
    across the boundary, without the inner BOS."""
    sentences = [
        [f"sentence {d} {k}: " + " ".join(make_texts(1, seed=d * 10 + k, min_words=6, max_words=9)) for k in range(3)]
        for d in range(6)
    ]
    seqs = [[tok.tokenize(s) for s in doc] for doc in sentences]
    for doc in seqs:
        doc[-1].append(tok.eod)
    flat = np.array([t for doc in seqs for s in doc for t in s])
    with IndexedDatasetWriter(tmp_path / "split", np.uint16) as w:
        w.add_documents(flat, [len(s) for doc in seqs for s in doc], [len(doc) for doc in seqs])
    first = min(len(doc[0]) for doc in seqs) - 1  # content tokens of the shortest first sentence
    source = PromptSource(tmp_path / "split", tok, prefix_tokens=first + 5)
    assert source.count() == 6
    for p in source.prompts(0, 6):
        ids = [t for s in seqs[p.doc_id] for t in s if t not in (tok.bos, tok.eod)]
        assert p.text == tok.decode(ids[: first + 5])
    jsonl = write_jsonl(
        tmp_path / "split.jsonl", [{"text": doc} for doc in sentences]
    )  # lists of sentences, as preprocess reads them
    same = PromptSource(jsonl, tok, prefix_tokens=first + 5)
    assert [p.text for p in same.prompts(0, 6)] == [p.text for p in source.prompts(0, 6)]


def test_jsonl_doc_ids_are_the_id_field_or_file_and_line(tmp_path, tok):
    folder = tmp_path / "docs"
    folder.mkdir()
    long = make_texts(4, seed=9, min_words=30, max_words=30)
    write_jsonl(folder / "a.jsonl", [{"text": long[0], "id": "doc-a"}, {"text": long[1], "id": 17}])
    (folder / "b.jsonl").write_text(
        "\n" + json.dumps({"text": long[2], "id": [1]}) + "\n" + json.dumps({"text": long[3]}) + "\n"
    )
    (folder / "notes.txt").write_text("not read")
    source = PromptSource(folder, tok, prefix_tokens=4)
    assert source.kind == "jsonl" and source.documents == 4
    assert sorted(map(str, (p.doc_id for p in source.prompts(0, 4)))) == ["17", "b.jsonl:2", "b.jsonl:3", "doc-a"]


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({}, "exactly one of --prefix-tokens"),
        ({"prefix_tokens": 4, "prefix_fraction": 0.5}, "exactly one of --prefix-tokens"),
        ({"prefix_tokens": 0}, "--prefix-tokens 0 must be at least 1"),
        ({"prefix_fraction": 0.0}, "--prefix-fraction 0.0 is not in (0, 1]"),
        ({"prefix_fraction": 1.5}, "--prefix-fraction 1.5 is not in (0, 1]"),
        ({"prefix_tokens": 4, "num_prompts": 0}, "--num-prompts 0"),
        ({"prefix_tokens": 4, "min_doc_tokens": -1}, "--min-doc-tokens -1"),
    ],
)
def test_bad_options_are_one_line_errors(corpus, tok, kw, needle):
    with pytest.raises(CookbookError, match="^[^\n]*$") as e:
        PromptSource(corpus[1], tok, **kw)
    assert needle in str(e.value)


def test_bad_inputs_are_one_line_errors(tmp_path, corpus, tok):
    def error(path, **kw) -> str:
        with pytest.raises(CookbookError) as e:
            s = PromptSource(path, tok, **{"prefix_tokens": N, **kw})
            s.count()
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "does not exist" in error(tmp_path / "nothing")
    assert "no document in" in error(corpus[1], prefix_tokens=1000)
    assert "no document in" in error(corpus[0], min_doc_tokens=10**6)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"content": "elsewhere"}) + "\n")
    assert f"{bad}:2: has no key 'text'" in error(bad)
    assert "has no key 'body'" in error(corpus[0], text_key="body")
    gz = tmp_path / "c.jsonl.gz"
    gz.write_bytes(b"")
    assert "decompress it" in error(gz)
