"""Hugging Face tokenizer files for a converted model, so that ``AutoTokenizer.from_pretrained(folder)``
gives the ids our tokenizer gives.

A SentencePiece ``tokenizer.model`` becomes a ``tokenizer.json`` built with the ``tokenizers`` library
(as Llama 2's published one is laid out), plus ``tokenizer_config.json`` and ``special_tokens_map.json``:

    normalizer      sentencepiece's, from the model's NormalizerSpec: its precompiled character map (NFKC
                    and the like) when it has one; leading, trailing and repeated spaces removed when
                    ``remove_extra_whitespaces``; the dummy prefix as ``Prepend("▁")`` (not a Metaspace
                    pre-tokenizer, which skips it when the text starts with a space); spaces as "▁"
    pre-tokenizer   none: the whole text is one word, as sentencepiece sees it
    model           BPE with merges derived from the pieces and their scores (a pair merges when its
                    concatenation is a piece, higher score first), or Unigram with the scores; byte fallback
    post-processor  BOS first when the tokenizer type adds it (Llama2Tokenizer)
    decoder         "▁" -> " ", byte fallback, fused, the dummy prefix's space stripped

sentencepiece never produces a control piece (``<s>``, ``</s>``, ``<unk>``) or a byte piece from text.
With Llama2Tokenizer the control pieces are special tokens that are not split out of the text
(``split_special_tokens``) and have no merges, so a literal "<s>" stays text; a Unigram model would
match them in text, so their scores are set below anything a real segmentation uses. With Megatron's
SentencePieceTokenizer, its special tokens (``<CLS> <SEP> <EOD> <MASK>``, pad, bos, eos; the new ones
after the model's pieces) are split out of the text first, as Megatron-LM's tokenizer splits them.

``tokenizer_class`` is ``PreTrainedTokenizerFast``: transformers 4 and 5 then run ``tokenizer.json`` as it
is. (transformers 5's ``LlamaTokenizer`` rebuilds the pipeline from the vocabulary with a Metaspace
pre-tokenizer and no normalizer, which is not sentencepiece: " a" loses its dummy prefix, NFKC and
whitespace removal are lost, and it cannot hold a Unigram model.)

A Hugging Face tokenizer (``tokenizer.json``) travels as it is; a ``tokenizer_config.json`` is added
only when it has none, so that transformers does not pick a tokenizer class by the model's type.

Where a tokenizers pipeline cannot be sentencepiece (tests/test_hf_tokenizer.py measures each; docs/convert.md):
a normalization table is applied by tokenizers' ``Precompiled``, which maps a grapheme cluster by its first
mapped character and drops the combining marks after it, and does not compose Hangul jamo across characters;
a Unigram model's segmentations that tie in score (the same pieces in another order) can come out in the
other order, since sentencepiece sums scores in float32; user-defined pieces are added tokens, split out of
the text first, so the text after one gets a dummy prefix of its own ("a<sym>b": sentencepiece ▁a <sym> b,
tokenizer.json ▁a <sym> ▁b).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from cookbook.data.tokenizer import Tokenizer, load_tokenizer, protobuf_fields
from cookbook.errors import CookbookError

SPACE = "\u2581"  # sentencepiece's whitespace symbol
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # ModelProto.SentencePiece.Type
SENTENCEPIECE_TYPES = ("Llama2Tokenizer", "SentencePieceTokenizer")
NEVER = -1e9  # a Unigram score no segmentation of real text chooses over normal pieces


@dataclass
class SentencePieceModel:
    """What a SentencePiece ``.model`` (a serialized ModelProto) says about encoding."""

    pieces: list[tuple[str, float, int]]  # (piece, score, type) by id
    model_type: int  # TrainerSpec.ModelType: 1 unigram, 2 bpe, 3 word, 4 char
    byte_fallback: bool
    whitespace_as_suffix: bool
    charsmap: bytes  # the precompiled normalization map; empty for identity
    add_dummy_prefix: bool
    remove_extra_whitespaces: bool
    escape_whitespaces: bool


def read_sentencepiece(path: Path) -> SentencePieceModel:
    """The ModelProto's pieces (field 1: piece 1, score 2, type 3), TrainerSpec (field 2: model_type 3,
    treat_whitespace_as_suffix 24, byte_fallback 35) and NormalizerSpec (field 3: precompiled_charsmap 2,
    add_dummy_prefix 3, remove_extra_whitespaces 4, escape_whitespaces 5), with proto2's defaults."""
    try:
        top = list(protobuf_fields(Path(path).read_bytes()))
        pieces = []
        for number, value in top:
            if number == 1:
                piece = dict(protobuf_fields(value))
                score = struct.unpack("<f", piece[2])[0] if 2 in piece else 0.0
                pieces.append((piece[1].decode("utf-8"), score, piece.get(3, NORMAL)))
        trainer = dict(protobuf_fields(next((v for n, v in top if n == 2), b"")))
        normalizer = dict(protobuf_fields(next((v for n, v in top if n == 3), b"")))
    except (ValueError, IndexError, KeyError, struct.error, UnicodeDecodeError) as e:
        raise CookbookError(f"{path} is not a SentencePiece model ({e})") from e
    return SentencePieceModel(
        pieces=pieces,
        model_type=trainer.get(3, 1),
        byte_fallback=bool(trainer.get(35, 0)),
        whitespace_as_suffix=bool(trainer.get(24, 0)),
        charsmap=normalizer.get(2, b""),
        add_dummy_prefix=bool(normalizer.get(3, 1)),
        remove_extra_whitespaces=bool(normalizer.get(4, 1)),
        escape_whitespaces=bool(normalizer.get(5, 1)),
    )


def bpe_merges(pieces: list[tuple[str, float, int]]) -> list[tuple[str, str]]:
    """sentencepiece's BPE as ranked merges: two symbols merge when their concatenation is a normal piece,
    the highest-scoring piece first. Each split of a piece into two normal pieces is a merge, ranked by
    the piece's score and then by the ids of its two halves."""
    ids = {piece: i for i, (piece, _, kind) in enumerate(pieces) if kind == NORMAL}
    ranked = []
    for piece, i in ids.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in ids and right in ids:
                ranked.append((-pieces[i][1], i, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def sentencepiece_tokenizer(path: Path, ours: Tokenizer):
    """A ``tokenizers.Tokenizer`` that encodes text as ``ours``, our tokenizer of the SentencePiece model
    at ``path`` (a Llama2Tokenizer or a SentencePieceTokenizer), does."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    sp = read_sentencepiece(path)
    if sp.model_type not in (1, 2):
        raise CookbookError(
            f"{path} is a SentencePiece {'word' if sp.model_type == 3 else 'char'} model; "
            "only BPE and Unigram models have a tokenizer.json equivalent"
        )
    if sp.whitespace_as_suffix:
        raise CookbookError(
            f"{path} puts whitespace after words (treat_whitespace_as_suffix), which tokenizer.json cannot express"
        )
    unk = next((i for i, (_, _, kind) in enumerate(sp.pieces) if kind == UNKNOWN), None)
    if sp.model_type == 2:
        vocab = {piece: i for i, (piece, _, _) in enumerate(sp.pieces)}
        model = models.BPE(
            vocab=vocab,
            merges=bpe_merges(sp.pieces),
            unk_token=None if unk is None else sp.pieces[unk][0],
            fuse_unk=True,
            byte_fallback=sp.byte_fallback,
        )
    else:
        scores = [(piece, score if kind in (NORMAL, USER_DEFINED) else NEVER) for piece, score, kind in sp.pieces]
        model = models.Unigram(scores, unk_id=unk, byte_fallback=sp.byte_fallback)
    tok = HFTokenizer(model)

    space = SPACE if sp.escape_whitespaces else " "
    steps = [normalizers.Precompiled(sp.charsmap)] if sp.charsmap else []
    if sp.remove_extra_whitespaces:  # leading and repeated " " (after the character map; no other whitespace)
        steps += [normalizers.Replace(Regex(r"\A +"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if sp.add_dummy_prefix:
        steps.append(normalizers.Prepend(space))  # Prepend leaves an empty text empty, as sentencepiece does
    if sp.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
    if sp.remove_extra_whitespaces:  # trailing: after escaping, so a literal "▁" at the end goes too
        steps.append(normalizers.Replace(Regex(space + r"+\z"), ""))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None
    steps = [decoders.Replace(SPACE, " ")] if sp.escape_whitespaces else []
    steps += [decoders.ByteFallback()] if sp.byte_fallback else []
    steps += [decoders.Fuse()] + ([decoders.Strip(" ", 1, 0)] if sp.add_dummy_prefix else [])
    tok.decoder = decoders.Sequence(steps)

    if ours.special:  # SentencePieceTokenizer: Megatron's special tokens, split out of the text
        specials = [token for token, _ in sorted(ours.special.items(), key=lambda item: item[1])]
    else:  # Llama2Tokenizer: the control pieces, kept as text by split_special_tokens
        specials = [piece for piece, _, kind in sp.pieces if kind in (UNKNOWN, CONTROL)]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens(
        [AddedToken(piece, special=False, normalized=False) for piece, _, kind in sp.pieces if kind == USER_DEFINED]
    )
    for token, i in ours.special.items():
        if tok.token_to_id(token) != i:
            raise CookbookError(
                f"internal error: {token} has id {tok.token_to_id(token)} in tokenizer.json but {i} in cookbook"
            )
    if ours.prefix:
        bos = tok.id_to_token(ours.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, ours.bos)]
        )
    return tok


def sentencepiece_files(path: Path, tokenizer_type: str, model_max_length: int) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json (name -> text) for a SentencePiece
    model used as ``tokenizer_type`` (Llama2Tokenizer or SentencePieceTokenizer)."""
    import sentencepiece

    ours = load_tokenizer(path, tokenizer_type, backend="reference")
    tok = sentencepiece_tokenizer(path, ours)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
    named = {"bos_token": sp.bos_id(), "eos_token": ours.eod}  # eos: what ends a document, as in training
    if not ours.special:  # Megatron's SentencePieceTokenizer treats "<unk>" as text; transformers would split it out
        named["unk_token"] = sp.unk_id()
    tokens = {key: tok.id_to_token(i) for key, i in named.items() if i is not None and i >= 0}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **tokens,
        "add_bos_token": bool(ours.prefix),
        "add_eos_token": False,
        "split_special_tokens": not ours.special,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    return {
        "tokenizer.json": tok.to_str(pretty=True),
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps(tokens, indent=2, ensure_ascii=False) + "\n",
    }


def huggingface_config(tokenizer_json: Path, model_max_length: int) -> dict[str, str]:
    """A tokenizer_config.json for a tokenizer.json that came without one: transformers runs the file as it is
    (its post-processor adds what our HuggingFaceTokenizer adds); bos_token is what the post-processor puts first."""
    ours = load_tokenizer(tokenizer_json, "HuggingFaceTokenizer", backend="reference")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    if len(ours.prefix) == 1:
        from tokenizers import Tokenizer

        config["bos_token"] = Tokenizer.from_file(str(tokenizer_json)).id_to_token(ours.prefix[0])
    return {"tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n"}


def write_tokenizer_files(
    folder: Path, carried: dict[str, Path], tokenizer_type: str | None, model_max_length: int
) -> list[str]:
    """Write what AutoTokenizer needs beside the ``carried`` tokenizer files (already in ``folder``, never
    replaced): for a SentencePiece model, the files of ``sentencepiece_files`` (``tokenizer_type``
    Llama2Tokenizer when it names no SentencePiece kind); for a tokenizer.json, a tokenizer_config.json
    when it has none. Returns notes for the user."""
    notes = []
    try:
        if "tokenizer.json" in carried:
            files = (
                {}
                if "tokenizer_config.json" in carried
                else huggingface_config(carried["tokenizer.json"], model_max_length)
            )
        elif "tokenizer.model" in carried:
            kind = tokenizer_type if tokenizer_type in SENTENCEPIECE_TYPES else "Llama2Tokenizer"
            files = sentencepiece_files(carried["tokenizer.model"], kind, model_max_length)
            symbols = [p for p, _, t in read_sentencepiece(carried["tokenizer.model"]).pieces if t == USER_DEFINED]
            if symbols:
                notes.append(
                    f"tokenizer.json splits the user-defined symbols ({', '.join(symbols[:3])}{', ...' if len(symbols) > 3 else ''}) "
                    "out of a text first, so the text after one gets a dummy prefix that sentencepiece does not add"
                )
        else:
            files = {}
    except CookbookError as e:
        return [f"no tokenizer.json written: {e}"]
    for name, text in files.items():
        if name not in carried:
            (folder / name).write_text(text, encoding="utf-8")
    config = folder / "config.json"
    if "tokenizer.json" in files and config.is_file() and json.loads(config.read_text()).get("model_type") == "qwen2":
        notes.append(
            "transformers 5 loads a qwen2 model's tokenizer as Qwen2Tokenizer whatever tokenizer_config.json names, "
            "which is not this SentencePiece tokenizer: load it with PreTrainedTokenizerFast.from_pretrained"
        )
    return notes
