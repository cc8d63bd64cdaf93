"""The retrieval tasks of ``cookbook eval --passkey`` and ``--recall`` (cookbook/inference/retrieval.py).

Prompts are exact in length with the asked needle at its depth and the tokenizer's BOS only at the start; recall's
distractors carry other names and values; answers are read and scored; a model that reads the asked needle scores
1 on both tasks, and one that copies the first number it saw scores 1 on passkey but not on recall. Training
documents are exact in length and end with their answer and EOD. (The command itself: tests/test_extend.py.)
"""

from __future__ import annotations

import random
import re

import pytest
import torch

from cookbook.data.tokenizer import load_tokenizer
from cookbook.errors import CookbookError
from cookbook.inference import retrieval
from cookbook.inference.retrieval import (
    accuracy,
    accuracy_by_length,
    document,
    draw,
    passkey_prompt,
    prompt,
    read_answer,
    retrieval_eval,
    score,
)


@pytest.fixture(scope="module")
def tok(sp_model):
    return load_tokenizer(sp_model)


def _find(ids: list[int], part: list[int]) -> int:
    return next(i for i in range(len(ids)) if ids[i : i + len(part)] == part)


def test_passkey_prompts_are_exact_with_the_key_at_its_depth(tok):
    needle = list(tok.exact(retrieval.NEEDLE.format(key="48213")))
    positions = []
    for depth in (0.0, 0.5, 1.0):
        ids = passkey_prompt(tok, 300, depth, "48213")
        assert len(ids) == 300
        assert ids[: len(tok.prefix)] == tok.prefix and tok.bos is not None and ids.count(tok.bos) == 1
        positions.append(_find(ids, needle))
        assert tok.decode(ids).endswith("The pass key is")
    assert positions[0] < positions[1] < positions[2]
    with pytest.raises(CookbookError, match="too short"):
        passkey_prompt(tok, 20, 0.5, "48213")


def test_recall_prompts_hide_named_values_and_ask_one(tok):
    rng = random.Random(3)
    for depth in (0.0, 0.3, 1.0):
        needles = draw("recall", rng, depth, digits=5, keys=4)
        ids = prompt(tok, "recall", 400, needles)
        text = tok.decode(ids)
        assert len(ids) == 400 and ids.count(tok.bos) == 1
        found = re.findall(r"The value of (\w+) is (\d+)\.", text)
        assert len(found) == 4 and len({n for n, _ in found}) == 4
        asked = re.search(r"What is the value of (\w+)\? The value of \1 is$", text).group(1)
        assert dict(found)[asked] == needles.key
        # the asked needle sits among the others in the order of their depths
        at = _find(ids, list(tok.exact(retrieval.RECALL_NEEDLE.format(name=asked, key=needles.key))))
        others = [d for d, _ in needles.sentences[1:]]
        before = sum(d < depth for d in others)
        starts = sorted(_find(ids, list(tok.exact(s))) for _, s in needles.sentences)
        assert starts.index(at) in range(before, before + 1 + sum(d == depth for d in others))
    with pytest.raises(CookbookError, match="--recall-keys"):
        draw("recall", rng, 0.5, keys=0)
    with pytest.raises(CookbookError, match="unknown retrieval task"):
        draw("haystack", rng, 0.5)
    with pytest.raises(CookbookError, match="not in"):
        draw("passkey", rng, 1.5)
    with pytest.raises(CookbookError, match="--digits 0"):
        draw("passkey", rng, 0.5, digits=0)
    for measure in (retrieval_eval, retrieval.needle_attention):
        with pytest.raises(CookbookError, match="--trials 0"):
            measure(None, tok, "passkey", [256], [0.5], trials=0)


def test_answers_are_read_and_scored():
    assert read_answer(" 48213. Remember") == "48213"
    assert read_answer(" the key is 4821") == "4821"
    assert read_answer(" none") == ""
    trials = [
        score(64, 0.5, "12", " 12."),
        score(64, 0.5, "34", " 31"),
        score(64, 1.0, "56", " 56"),
        score(128, 0, "78", ""),
    ]
    assert [t.correct for t in trials] == [True, False, True, False]
    assert [t.digits_right for t in trials] == [1.0, 0.5, 1.0, 0.0]
    assert score(64, 0, "48213", " 82413").digits_right == 0.4  # the digits, partly out of place
    assert score(64, 0, "48213", " 482").digits_right == 0.6 and not score(64, 0, "48213", " 482130").correct
    assert accuracy(trials) == {(64, 0.5): 0.5, (64, 1.0): 1.0, (128, 0.0): 0.0}
    assert accuracy_by_length(trials) == {64: 2 / 3, 128: 0.0}
    assert (
        accuracy(trials, "digits_right")[(64, 0.5)] == 0.75
        and accuracy_by_length(trials, "digits_right")[64] == 2.5 / 3
    )


def _reader(tok, pick):
    """A stand-in for greedy generation that answers with the number ``pick`` chooses from the prompt's text."""

    def generate(model, prompts, new_tokens, temperature):
        assert temperature == 0.0
        return [list(tok.exact(" " + pick(tok.decode(p)))) for p in prompts]

    return generate


def test_reading_the_asked_needle_scores_one_and_copying_the_first_does_not_on_recall(tok, monkeypatch):
    import cookbook.inference.generator as generator

    def asked(text: str) -> str:
        name = re.search(r"What is the value of (\w+)\?", text)
        if name is None:
            return re.search(r"The pass key is (\d+)", text).group(1)
        return re.search(rf"The value of {name.group(1)} is (\d+)", text).group(1)

    def first(text: str) -> str:
        return re.search(r"\d+", text).group(0)

    depths, lengths = [0.0, 0.5, 1.0], [256, 384]
    monkeypatch.setattr(generator, "generate", _reader(tok, asked))
    for task in ("passkey", "recall"):
        trials = retrieval_eval(None, tok, task, lengths, depths, trials=4, keys=4, seed=1, batch_size=3)
        assert len(trials) == 24 and all(t.correct for t in trials), task
        assert [t.length for t in trials] == [256] * 12 + [384] * 12
    monkeypatch.setattr(generator, "generate", _reader(tok, first))
    assert all(t.correct for t in retrieval_eval(None, tok, "passkey", lengths, depths, trials=4))
    recall = retrieval_eval(None, tok, "recall", lengths, depths, trials=8, keys=4, seed=1)
    at_start = [t.correct for t in recall if t.depth == 0.0]
    assert all(at_start)  # the asked needle is first in the filler
    assert sum(t.correct for t in recall) / len(recall) < 0.7  # elsewhere a distractor usually comes first
    # the same seed draws the same keys
    assert [t.key for t in recall] == [t.key for t in retrieval_eval(None, tok, "recall", lengths, depths, 8, seed=1)]


def test_training_documents_end_with_their_answers(tok):
    rng = random.Random(0)
    for task, length, keys in (("passkey", 200, 4), ("recall", 300, 4), ("recall", 257, 2)):
        ids = document(tok, task, length, rng, keys=keys)
        assert len(ids) == length and ids[-1] == tok.eod and ids.count(tok.bos) == 1
        text = tok.decode(ids[:-1])
        if task == "passkey":
            answer = re.search(r"The pass key is (\d+)$", text).group(1)
            assert f"The pass key is {answer}. Remember it." in text
            continue
        hidden = dict(re.findall(r"The value of (\w+) is (\d+)\.\n", text))
        asked = re.findall(r"What is the value of (\w+)\? The value of \1 is (\d+)", text)
        assert len(hidden) == keys and sorted(asked) == sorted(hidden.items())  # every value asked once, rightly


class _Attention(torch.nn.Module):
    def attend(self, q, k, v, cache=None, mask=None):
        return torch.softmax(q @ k.transpose(-1, -2), -1) @ v


class _CopyingModel(torch.nn.Module):
    """One head that looks only at the needle's copy of the token it is about to write (its first copy): an oracle
    induction head, built from the tokens (queries and keys one-hot in the position)."""

    def __init__(self, tok):
        super().__init__()
        self.layers = torch.nn.ModuleDict({"0": torch.nn.Module()})
        self.layers["0"].attention = _Attention()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.last = tok.exact(retrieval.QUESTION)[-1]  # both questions end "... is"
        assert tok.exact(retrieval.RECALL_QUESTION.format(name="node"))[-1] == self.last

    def forward(self, tokens):
        ids = tokens[0].tolist()
        end = max(i for i, t in enumerate(ids) if t == self.last) + 1  # the answer starts here
        tail = ids[end:]
        at = _find(ids, tail)
        keys = torch.eye(len(ids))[None, None]
        queries = torch.zeros_like(keys)
        for r in range(len(tail)):
            queries[0, 0, end - 1 + r, at + r] = 1e4
        self.layers["0"].attention.attend(queries, keys, keys)
        return torch.zeros(1, len(ids), 8)


def test_needle_attention_finds_a_copying_head_and_chance_for_a_head_that_looks_everywhere(tok):
    from cookbook.inference.retrieval import needle_attention
    from cookbook.model.config import preset
    from cookbook.model.model import Transformer

    lengths, depths = [192, 320], [0.0, 0.5, 1.0]
    model = _CopyingModel(tok)
    for task in ("passkey", "recall"):
        found = needle_attention(model, tok, task, lengths, depths, trials=3, keys=3, seed=2)
        assert {(r.length, r.depth) for r in found} == {(n, d) for n in lengths for d in depths}
        assert all(r.share > 0.999 and r.copy > 0.999 for r in found), found
        assert all(r.copy_chance < r.share_chance < 0.5 for r in found)
        by_depth = {(r.length, r.depth): r.distance for r in found}
        assert all(by_depth[n, 0.0] > by_depth[n, 0.5] > by_depth[n, 1.0] > 0 for n in lengths)
        assert "attend" not in model.layers["0"].attention.__dict__  # the recording is gone
    # queries of zero: every head spreads its attention evenly over what it can see
    model = Transformer(preset("tiny", vocab_size=tok.vocab_size, hidden_size=32, num_heads=2, num_kv_heads=1,
                               intermediate_size=64, num_layers=2, max_seq_len=512))  # fmt: skip
    with torch.no_grad():
        for layer in model.layers.values():
            layer.attention.wq.weight.zero_()
    for task in ("passkey", "recall"):
        found = needle_attention(model, tok, task, lengths, depths, trials=2, keys=3, seed=2)
        assert len(found) == len(lengths) * len(depths) * 2 * 2
        for r in found:
            assert r.share == pytest.approx(r.share_chance, rel=1e-4)
            assert r.copy == pytest.approx(r.copy_chance, rel=1e-4)
            assert r.length / 2 < r.distance < r.length / 2 + 6  # half of what each answer position sees
