"""Training a tokenizer offline on jsonl: SentencePiece (BPE or unigram, byte fallback) or HF byte-level BPE.

SentencePiece models follow Llama 2's settings (identity normalization, dummy prefix, digits split,
byte fallback, unk/bos/eos = 0/1/2, no pad). Hugging Face BPE follows Llama 3's shape (byte-level
BPE, ``<|begin_of_text|>`` added as BOS by the post-processor, ``<|end_of_text|>`` as EOS) and writes
``tokenizer.json`` + ``tokenizer_config.json`` so transformers' ``AutoTokenizer`` loads the folder.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cookbook.data.jsonl import parse_lines, read_lines
from cookbook.data.sources import expand_inputs
from cookbook.errors import CookbookError
from cookbook.fileio import check_writable

KINDS = ("sentencepiece", "hf-bpe")


@dataclass
class TokenizerTrainConfig:
    inputs: list[str]
    output: str
    kind: str = "sentencepiece"
    model_type: str = "bpe"  # sentencepiece only: bpe or unigram
    normalization: str = "identity"  # sentencepiece only: identity (Llama 2), nmt_nfkc, nfkc, ...
    vocab_size: int = 8000
    json_key: str = "text"
    max_documents: int | None = None
    max_lines: int = 2_000_000  # sentencepiece: lines sampled for training
    seed: int = 1234
    threads: int = max(1, os.cpu_count() or 1)
    special_tokens: list[str] = field(default_factory=list)


def _documents(cfg: TokenizerTrainConfig) -> Iterator[str]:
    n = 0
    for path in expand_inputs(cfg.inputs):
        for first, lines, _ in read_lines(path):
            texts, _ = parse_lines(path, first, lines, [cfg.json_key], skip_bad=True)
            for value in texts[cfg.json_key]:
                for text in [value] if isinstance(value, str) else value:
                    if cfg.max_documents is not None and n >= cfg.max_documents:
                        return
                    n += 1
                    yield text


def train_tokenizer(cfg: TokenizerTrainConfig) -> Path:
    """Train and save; return the path a user passes as ``--tokenizer-model``."""
    if cfg.kind not in KINDS:
        raise CookbookError(f"unknown tokenizer kind {cfg.kind!r}; choose one of {', '.join(KINDS)}")
    if cfg.vocab_size < 64:
        raise CookbookError(f"--vocab-size {cfg.vocab_size} is too small; use at least 64")
    check_writable(Path(cfg.output).parent, "--output", folder=True)
    docs = list(_documents(cfg))
    if not any(docs):
        raise CookbookError(f"no text under key {cfg.json_key!r} in {', '.join(map(str, cfg.inputs))}")
    if cfg.kind == "sentencepiece":
        return _train_sentencepiece(cfg, docs)
    return _train_hf_bpe(cfg, docs)


def _train_sentencepiece(cfg: TokenizerTrainConfig, docs: list[str]) -> Path:
    import sentencepiece as spm

    if cfg.model_type not in ("bpe", "unigram"):
        raise CookbookError(f"--model-type must be bpe or unigram, got {cfg.model_type!r}")
    out = Path(cfg.output)
    out = out if out.suffix == ".model" else out.with_name(out.name + ".model")
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = [line for d in docs for line in d.split("\n") if line.strip()]
    random.Random(cfg.seed).shuffle(lines)
    lines = lines[: cfg.max_lines]
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".sp-train-") as tmp:
        prefix = os.path.join(tmp, "sp")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines),
                model_prefix=prefix,
                model_type=cfg.model_type,
                vocab_size=cfg.vocab_size,
                byte_fallback=True,
                character_coverage=0.99995,
                normalization_rule_name=cfg.normalization,
                # Llama 2 keeps extra whitespace; with a normalization rule, sentencepiece's default removes it
                remove_extra_whitespaces=cfg.normalization != "identity",
                split_digits=True,
                allow_whitespace_only_pieces=True,
                unk_id=0,
                bos_id=1,
                eos_id=2,
                pad_id=-1,
                user_defined_symbols=cfg.special_tokens or [],
                num_threads=cfg.threads,
                max_sentence_length=1 << 16,
                minloglevel=2,
                hard_vocab_limit=False,
            )
        except RuntimeError as e:
            raise CookbookError(f"SentencePiece training failed: {str(e).splitlines()[-1]}") from e
        os.replace(prefix + ".model", out)
        os.replace(prefix + ".vocab", out.with_suffix(".vocab"))
    return out


BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def _train_hf_bpe(cfg: TokenizerTrainConfig, docs: list[str]) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise CookbookError(f"{out} exists and is not a folder; a Hugging Face tokenizer is saved as a folder")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, *cfg.special_tokens]
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "model_max_length": 1 << 20,
        "clean_up_tokenization_spaces": False,
    }
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        tok.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
