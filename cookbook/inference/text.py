"""Text <-> token ids for generation, serving and evaluation, as vLLM's tokenizer endpoints see them.

- ``encode(text, add_special_tokens)``: Megatron-LM's ``tokenize`` (BOS and the like as the tokenizer adds them)
  or, without special tokens, the text's own ids. As in Hugging Face tokenizers (and so vLLM), the literal strings
  of the tokenizer's bos and eos tokens in the text become those tokens (``"</s>"`` -> eos): lm-evaluation-harness
  finds the eos id by tokenizing the eos string. Where the tokenizer's own encoder does not (SentencePiece, GPT-2's
  BPE), the text is split on those strings first.
- ``decode(ids)``: the text, without bos and eos (as vLLM's ``skip_special_tokens``) and without ids beyond the
  tokenizer's vocabulary (a model's vocabulary may be padded past it).
- ``token_texts(ids, context)`` (``Detokenizer`` one token at a time): the text each token adds, read after
  ``context``, so that the pieces join into the decoded text: a SentencePiece word keeps its leading space, and a
  character whose bytes span several tokens comes whole with its last token (the others add "").
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from cookbook.data.tokenizer import Tokenizer

WINDOW = 8  # tokens of context decoded with each token (vLLM's detokenizer reads a few too)


def _piece_reader(tokenizer: Tokenizer):
    """id -> the token's own string (``</s>``, ``<|endoftext|>``), for the special tokens at least."""
    if tokenizer.type == "Llama2Tokenizer":  # SentencePiece decodes control pieces to ""
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=tokenizer.path)
        return lambda i: sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else ""
    return lambda i: tokenizer.decode([i])


class TextCodec:
    """A tokenizer as the server and the evaluation harness use it (see the module's docstring)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = min(vocab_size or tokenizer.vocab_size, tokenizer.vocab_size)  # ids it can decode
        self.eos, self.bos = tokenizer.eod, tokenizer.bos
        piece = _piece_reader(tokenizer)
        self.eos_text = piece(self.eos) if self.eos is not None else None
        self.bos_text = piece(self.bos) if self.bos is not None else None
        # the bos/eos strings the tokenizer's own encoder does not turn into those tokens (SentencePiece, GPT-2 BPE)
        specials = {
            t: i
            for t, i in ((self.bos_text, self.bos), (self.eos_text, self.eos))
            if t and list(tokenizer.exact(t)) != [i]
        }
        self.specials = specials
        longest_first = sorted(specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if specials else None
        self._pieces: dict[int, str] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        tok = self.tokenizer
        if self._split is None:
            ids = list(tok.exact(text))
        else:
            ids = []
            for part in self._split.split(text):
                if part in self.specials:
                    ids.append(self.specials[part])
                elif part:
                    ids += tok.exact(part)
        return tok.prefix + ids + tok.suffix if add_special_tokens else ids

    def decode(self, ids: Sequence[int]) -> str:
        skip = (self.eos, self.bos)
        return self.tokenizer.decode([t for t in ids if 0 <= t < self.vocab_size and t not in skip])

    def piece(self, token: int) -> str:
        """One token's text on its own (what ``top_logprobs`` names the alternatives by)."""
        if token not in self._pieces:
            self._pieces[token] = self.decode([token])
        return self._pieces[token]

    def continuation(self, prompt: Sequence[int], new: Sequence[int]) -> str:
        """The text of ``new`` as it reads after ``prompt`` (a leading space kept, as vLLM's detokenizer does)."""
        new = [t for t in new if t != self.eos]
        if not new:
            return ""
        head, full = self.decode(prompt), self.decode(list(prompt) + new)
        return full[len(head) :] if full.startswith(head) else self.decode(new)

    def token_texts(self, ids: Sequence[int], context: Sequence[int] = (), final: bool = True) -> list[str]:
        """The text each of ``ids`` adds after ``context`` and the ids before it (see the module's docstring);
        ``final``: the last token also takes what is still pending (bytes that never made a whole character)."""
        reader = Detokenizer(self, context)
        return [reader.add(t, final and n == len(ids)) for n, t in enumerate(ids, 1)]

    def info(self, max_model_len: int) -> dict:
        """What ``GET /tokenizer_info`` answers (the fields vLLM sends that lm-evaluation-harness reads)."""
        return {
            "tokenizer_class": self.tokenizer.type,
            "eos_token": self.eos_text,
            "bos_token": self.bos_text,
            "pad_token": None,
            "unk_token": None,
            "chat_template": None,
            "model_max_length": max_model_len,
            "vocab_size": self.vocab_size,
            "add_bos_token": self.bos is not None and self.bos in self.tokenizer.prefix,
        }


class Detokenizer:
    """The text each token adds, one token at a time: each is decoded with the few tokens before it (a window), and
    a token that leaves a character unfinished adds "" (its bytes come with the token that finishes it). The pieces
    depend only on the tokens up to them, so a stream of them agrees with a whole answer's."""

    def __init__(self, codec: TextCodec, context: Sequence[int] = ()):
        self.codec = codec
        self.window = list(context[-WINDOW:])
        self.before = codec.decode(self.window)

    def add(self, token: int, final: bool = False) -> str:
        self.window.append(token)
        text = self.codec.decode(self.window)
        if text.endswith("\ufffd") and not final:
            return ""
        piece = text[len(self.before) :] if text.startswith(self.before) else self.codec.decode([token])
        if len(self.window) > WINDOW:
            self.window = self.window[-WINDOW:]
            text = self.codec.decode(self.window)
        self.before = text
        return piece
