"""Shared fixtures: tiny tokenizers and an adversarial corpus, made here; nothing is downloaded."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
from helpers_data import write_jsonl

from cookbook.data.sample_corpus import stdlib_sources
from cookbook.data.tokenizer_train import TokenizerTrainConfig, train_tokenizer

# --dtype auto means fp32 on every CPU in the suite (cookbook/engine/precision.py): a test means the same whether or
# not this machine has bf16 units; the commands' subprocesses inherit it. tests/test_precision.py injects capabilities.
os.environ["COOKBOOK_CPU_BF16"] = "0"

# Texts that have tripped tokenizers up: literal control tokens, Megatron's special strings,
# HF added tokens, combining characters, odd whitespace, empty and whitespace-only documents.
TRICKY = [
    "",
    " ",
    "\n\n",
    "a <s> b </s> c <unk> d",
    "<s>",
    "x<|end_of_text|>y <|begin_of_text|> z",
    "<EOD>hi<CLS> there<MASK> <SEP><PAD>",
    "('A\u034fB \u057e\u0576\u0333AA\u031d') # combining marks",
    "Ünïcödé — “quotes” ½ ﬁ ｆｕｌｌｗｉｄｔｈ 日本語のテキスト 😀👍🏽",
    "\u00a0nbsp\u2003em space\r\nwindows\rline\ttab",
    "   leading and trailing   ",
    "\x00\x01\x7f control bytes",
    "numbers 1234567890 3.14159 1e-10",
    "'s 't 're 've 'm 'll 'd I'M YOU'RE",
]


def stdlib_texts(n: int, offset: int = 0) -> list[str]:
    out = []
    for path in stdlib_sources()[offset:]:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if 2_000 < len(text) < 40_000:
            out.append(text)
        if len(out) == n:
            break
    return out


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    """Real text (stdlib sources, some non-ASCII) interleaved with the tricky cases."""
    texts = stdlib_texts(60)
    return list(itertools.chain.from_iterable(zip(texts, itertools.cycle(TRICKY)))) + TRICKY


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokenizers")


@pytest.fixture(scope="session")
def train_jsonl(tok_dir) -> Path:
    return write_jsonl(tok_dir / "train.jsonl", stdlib_texts(80, offset=200) + TRICKY)


@pytest.fixture(scope="session")
def sp_model(tok_dir, train_jsonl) -> Path:
    return train_tokenizer(TokenizerTrainConfig([str(train_jsonl)], str(tok_dir / "sp_bpe.model"), vocab_size=600))


@pytest.fixture(scope="session")
def sp_unigram(tok_dir, train_jsonl) -> Path:
    return train_tokenizer(
        TokenizerTrainConfig([str(train_jsonl)], str(tok_dir / "sp_uni.model"), model_type="unigram", vocab_size=600)
    )


@pytest.fixture(scope="session")
def sp_nfkc(tok_dir, train_jsonl) -> Path:
    """A SentencePiece model with a normalization table (gigatoken only gets its ASCII texts)."""
    return train_tokenizer(
        TokenizerTrainConfig(
            [str(train_jsonl)], str(tok_dir / "sp_nfkc.model"), vocab_size=600, normalization="nmt_nfkc"
        )
    )


@pytest.fixture(scope="session")
def sp_odd(tok_dir, train_jsonl) -> Path:
    """Identity normalization with extra whitespace removed: gigatoken is not exact, sentencepiece does all."""
    import sentencepiece as spm

    lines = [line for t in stdlib_texts(80, offset=200) for line in t.split("\n") if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(tok_dir / "sp_odd"),
        vocab_size=600,
        model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=True,
        minloglevel=2,
    )
    return tok_dir / "sp_odd.model"


@pytest.fixture(scope="session")
def hf_tokenizer(tok_dir, train_jsonl) -> Path:
    return train_tokenizer(
        TokenizerTrainConfig([str(train_jsonl)], str(tok_dir / "hf_bpe"), kind="hf-bpe", vocab_size=700)
    )


@pytest.fixture(scope="session")
def gpt2_files(tok_dir, hf_tokenizer) -> tuple[Path, Path]:
    """GPT-2 style vocab.json + merges.txt (with <|endoftext|>) from a byte-level BPE."""
    from tokenizers import Tokenizer

    model = json.loads(Tokenizer.from_file(str(hf_tokenizer / "tokenizer.json")).to_str())["model"]
    vocab = dict(model["vocab"])
    vocab["<|endoftext|>"] = len(vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tok_dir / "vocab.json").write_text(json.dumps(vocab))
    (tok_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return tok_dir / "vocab.json", tok_dir / "merges.txt"


@pytest.fixture(scope="session")
def teacher(tmp_path_factory, sp_model) -> dict:
    """The distillation tests' random tiny teacher (helpers_distill.make_teacher): HF folder and cookbook checkpoint."""
    from helpers_distill import make_teacher

    return make_teacher(tmp_path_factory.mktemp("teacher"), sp_model)


@pytest.fixture(scope="session")
def local(teacher):
    """The teacher loaded in our generator (inference_distill.local.LocalGenerator), on CPU."""
    from cookbook.inference.generator import LocalGenerator

    return LocalGenerator.load(teacher["cookbook"], device="cpu")
