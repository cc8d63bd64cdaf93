"""Megatron-LM's preprocessing, rebuilt as the oracle: its tokenizers' semantics
(``megatron/training/tokenizer``: Llama2Tokenizer, SentencePieceTokenizer, HuggingFaceTokenizer via
transformers, GPT2BPETokenizer's OpenAI BPE), its ``Encoder.encode`` loop one document at a time,
and megatron-core's own ``IndexedDatasetBuilder`` writing the files."""

from __future__ import annotations

import json
from functools import lru_cache

import regex
import sentencepiece as spm
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder


class Llama2:
    def __init__(self, path):
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.vocab_size()
        self.eod = self.sp.eos_id()

    def tokenize(self, text):
        return [self.sp.bos_id()] + self.sp.encode(text)


class SentencePiece:
    """Megatron-LM's _SentencePieceTokenizer with vocab_extra_ids=0."""

    def __init__(self, path):
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab = {self.sp.id_to_piece(i): i for i in range(len(self.sp))}
        self.special = {}

        def add(t):
            if t not in self.vocab:
                self.vocab[t] = len(self.vocab)
            self.special[t] = self.vocab[t]

        for t in ("<CLS>", "<SEP>", "<EOD>", "<MASK>"):
            add(t)
        for getter, default in ((self.sp.pad_id, "<PAD>"), (self.sp.bos_id, "<BOS>"), (self.sp.eos_id, "<EOS>")):
            try:
                add(self.sp.id_to_piece(getter()))
            except IndexError:
                add(default)
        self.eod = self.vocab["<EOD>"]
        self.vocab_size = len(self.vocab)

    def tokenize(self, text):
        ids, idx = [], 0
        while True:
            indices = {}
            for token in self.special:
                try:
                    indices[token] = text[idx:].index(token)
                except ValueError:
                    continue
            if not indices:
                break
            nxt = min(indices, key=indices.get)
            at = idx + indices[nxt]
            ids.extend(self.sp.encode_as_ids(text[idx:at]))
            ids.append(self.special[nxt])
            idx = at + len(nxt)
        ids.extend(self.sp.encode_as_ids(text[idx:]))
        return ids


class HuggingFace:
    def __init__(self, path):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(path))
        self.vocab_size = len(self.tok)
        self.eod = self.tok.eos_token_id

    def tokenize(self, text):
        return self.tok(text).input_ids


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class GPT2:
    """OpenAI's GPT-2 BPE, which Megatron-LM's GPT2BPETokenizer runs: no special tokens in text."""

    PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self, vocab_file, merge_file):
        self.encoder = json.loads(open(vocab_file, encoding="utf-8").read())
        merges = open(merge_file, encoding="utf-8").read().split("\n")[1:-1]
        self.ranks = {tuple(m.split()): i for i, m in enumerate(merges)}
        self.byte_encoder = _bytes_to_unicode()
        self.vocab_size = len(self.encoder)
        self.eod = self.encoder["<|endoftext|>"]
        self.bpe = lru_cache(maxsize=None)(self._bpe)

    def _bpe(self, token):
        word = tuple(token)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    new.append(word[i] + word[i + 1])
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
        return word

    def tokenize(self, text):
        ids = []
        for token in regex.findall(self.PAT, text):
            token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(token))
        return ids


def megatron_preprocess(jsonl, prefix, tokenizer, json_keys=("text",), append_eod=False):
    """tools/preprocess_data.py for one input file, one document at a time."""
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builders = {k: IndexedDatasetBuilder(f"{prefix}_{k}_document.bin", dtype=dtype) for k in json_keys}
    with open(jsonl, encoding="utf-8") as fin:
        for line in fin:
            data = json.loads(line)
            for key in json_keys:
                text = data[key]
                sentences = text if isinstance(text, list) else [text]
                doc_ids, lens = [], []
                for sentence in sentences:
                    ids = tokenizer.tokenize(sentence)
                    if ids:
                        doc_ids.extend(ids)
                        lens.append(len(ids))
                if doc_ids and append_eod:
                    doc_ids.append(tokenizer.eod)
                    lens[-1] += 1
                builders[key].add_document(doc_ids, lens)
    for k in json_keys:
        builders[k].finalize(f"{prefix}_{k}_document.idx")
