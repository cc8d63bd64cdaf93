"""Quality filters for distillation: minimum length, n-gram repetition, exact duplicates."""

from __future__ import annotations

import doctest

import pytest

import inference_distill.filters as filters
from cookbook.errors import CookbookError
from cookbook.inference.sampling import Completion
from inference_distill.filters import Filter, FilterConfig, repeat_ratio, text_hash


def done(text: str, tokens: int = 10) -> Completion:
    return Completion(text=text, tokens=tokens, finish_reason="stop")


@pytest.mark.parametrize(
    "text, n, ratio",
    [
        ("a b a b a b", 2, 3 / 5),  # ab ba ab ba ab: 2 unique of 5
        ("a a a a", 1, 3 / 4),  # a: 1 unique of 4
        ("a a a a", 2, 2 / 3),  # aa aa aa: 1 of 3
        ("the cat sat on the mat", 2, 0.0),
        ("the cat sat on the mat", 1, 1 / 6),  # "the" twice
        ("x y z x y z x y z", 3, 4 / 7),  # xyz yzx zxy xyz yzx zxy xyz: 3 unique of 7
        ("  a\tb\n a   b ", 2, 1 / 3),  # whitespace of any kind splits words: ab ba ab
        ("two words", 3, 0.0),  # fewer words than n
        ("", 1, 0.0),
    ],
)
def test_repeat_ratio_by_hand(text, n, ratio):
    assert repeat_ratio(text, n) == pytest.approx(ratio)


def test_repeat_ratio_docstring_examples_hold():
    assert doctest.testmod(filters).failed == 0


def test_each_reason():
    f = Filter(FilterConfig(min_tokens=5, max_repeat_ratio=0.5, ngram=2))
    assert f.keep("prompt then a fine answer", done("then a fine answer", tokens=5)) is None
    assert f.keep("prompt and x", done("and x", tokens=4)) == "short"
    assert f.keep("go go go go go go", done("go go go", tokens=9)) == "repetitive"  # 4 of 5 bigrams repeat
    assert (
        f.keep("the record text", done("  then a fine answer\n", tokens=7)) == "duplicate"
    )  # same continuation, stripped
    assert f.keep("the record text", done("then a fine answer!", tokens=7)) is None
    assert f.counts == {"short": 1, "repetitive": 1, "duplicate": 1} and f.kept == 2


def test_repetition_is_judged_on_the_record_text_and_the_limit_is_inclusive():
    f = Filter(FilterConfig(max_repeat_ratio=0.6, ngram=2))
    assert f.keep("a b a b a b", done("b a b")) is None  # 0.6: not above the limit
    assert f.keep("a b a b a b a", done("b a b a")) == "repetitive"  # 4/6
    assert Filter(FilterConfig(ngram=2)).keep("a a a a a a", done("a a a")) is None  # off by default


def test_duplicates_are_remembered_across_calls_and_shards_and_seeded_by_seen():
    f = Filter(FilterConfig())
    assert [f.keep(t, done(t)) for t in ("x", "y", "x", "z")] == [None, None, "duplicate", None]
    stats, hashes = f.end_shard()
    assert stats == {
        "completions": 4,
        "generated_tokens": 40,
        "filtered": {"short": 0, "repetitive": 0, "duplicate": 1},
    }
    assert hashes == [text_hash("x"), text_hash("y"), text_hash("z")]
    assert f.keep("y", done("y")) == "duplicate"  # a later shard
    assert f.end_shard()[1] == []
    resumed = Filter(FilterConfig(), seen=set(hashes))  # what a resumed run starts from
    assert resumed.keep("x", done("x ")) == "duplicate" and resumed.keep("w", done("w")) is None


def test_only_kept_completions_are_remembered():
    f = Filter(FilterConfig(min_tokens=3))
    assert f.keep("x", done("x", tokens=1)) == "short"
    assert f.keep("x", done("x", tokens=3)) is None  # the short one did not enter the dedup set


def test_dedup_off_keeps_duplicates():
    f = Filter(FilterConfig(dedup=False))
    assert [f.keep("x", done("x")) for _ in range(3)] == [None] * 3
    assert f.end_shard()[1] == [] and f.counts["duplicate"] == 0


def test_text_hash_is_16_bytes_of_the_stripped_text():
    assert len(text_hash("abc")) == 16
    assert text_hash(" abc\n") == text_hash("abc") != text_hash("abd")


@pytest.mark.parametrize(
    "cfg, needle",
    [
        (FilterConfig(min_tokens=-1), "--min-tokens -1"),
        (FilterConfig(max_repeat_ratio=1.5), "--max-repeat-ratio 1.5"),
        (FilterConfig(ngram=0), "--ngram 0"),
    ],
)
def test_bad_config_is_a_one_line_error(cfg, needle):
    with pytest.raises(CookbookError, match=needle):
        Filter(cfg)
