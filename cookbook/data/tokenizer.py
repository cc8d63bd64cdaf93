"""Tokenizers with Megatron-LM's semantics, encoding whole batches in native threads.

Megatron-LM's ``tools/preprocess_data.py`` calls ``tokenizer.tokenize(text)`` once per document
and appends ``tokenizer.eod`` with ``--append-eod``. What ``tokenize`` and ``eod`` mean depends on
``--tokenizer-type`` (Megatron-LM's ``megatron/training/tokenizer/tokenizer.py``):

``Llama2Tokenizer``        SentencePiece ``.model``: ``[bos] + sp.encode(text)``; eod = eos;
                           vocab size = the model's piece count.
``SentencePieceTokenizer`` SentencePiece ``.model`` plus special tokens ``<CLS> <SEP> <EOD> <MASK>``,
                           pad, bos and eos, appended after the model's pieces when new; text is split
                           on those tokens' literal strings first; no bos; eod = ``<EOD>``.
``HuggingFaceTokenizer``   ``tokenizer.json`` or a folder: ``AutoTokenizer(text).input_ids`` (the
                           post-processor's bos/eos included); eod = ``eos_token_id``; vocab size =
                           ``len(tokenizer)``.
``GPT2BPETokenizer``       ``vocab.json`` + ``merges.txt``: GPT-2 byte-level BPE, no special tokens
                           in text; eod = ``<|endoftext|>``.

``Tokenizer.encode_batch`` returns the same ids as those per-document calls, for a whole batch at
once. Plain text goes through gigatoken only where it gives the reference's ids: it is checked on
probe strings when loaded, SentencePiece models use it only for the texts where it was measured
exact (``gigatoken_scope``), and texts holding a control-token or added-token string go to the
reference tokenizer. Everything else goes through sentencepiece's or tokenizers' own batch encoders.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np

from cookbook.errors import CookbookError

TOKENIZER_TYPES = ("Llama2Tokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer", "GPT2BPETokenizer")

# Strings on which a fast encoder is compared with the reference tokenizer when it is loaded.
PROBES = (
    "Hello world",
    "",
    " ",
    "  leading spaces and trailing  ",
    "def f(x):\n\treturn x ** 2  # comment\n\n\n",
    "Ünïcödé — “quotes” ½ ﬁ ｆｕｌｌｗｉｄｔｈ 日本語のテキスト 😀👍🏽",
    "\u00a0non-breaking\u2003em space\r\nwindows line",
    "numbers 1234567890 3.14159 1e-10 0x1F",
    "'s 't 're 've 'm 'll 'd I'M YOU'RE",
    "\x00\x01\x7f control bytes",
)


def _set_native_threads(threads: int) -> None:
    """Size the rayon pools of tokenizers and gigatoken (read once, at their first batch)."""
    os.environ.setdefault("RAYON_NUM_THREADS", str(max(1, threads)))
    os.environ.setdefault("RAYON_RS_NUM_CPUS", str(max(1, threads)))


def ragged_to_flat(lists: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids -> (flat int64 ids, int64 lengths)."""
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    flat = np.fromiter(chain.from_iterable(lists), dtype=np.int64, count=int(lengths.sum()))
    return flat, lengths


def flat_to_ragged(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []


# --------------------------------------------------------------------------- plain encoders
# A plain encoder turns a list of texts into (flat ids, lengths) with no special tokens added.


def _sentencepiece_encoder(sp, threads: int) -> Callable[[list[str]], tuple[np.ndarray, np.ndarray]]:
    def encode(texts: list[str]):
        return ragged_to_flat(sp.encode(texts, num_threads=threads) if texts else [])

    return encode


def _tokenizers_encoder(tok) -> Callable[[list[str]], tuple[np.ndarray, np.ndarray]]:
    def encode(texts: list[str]):
        return ragged_to_flat([e.ids for e in tok.encode_batch(texts, add_special_tokens=False)] if texts else [])

    return encode


def _gigatoken_encoder(gt) -> Callable[[list[str]], tuple[np.ndarray, np.ndarray]]:
    def encode(texts: list[str]):
        if not texts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        layout = gt.encode_batch(texts).layout
        offsets = np.asarray(layout.offsets.data)
        flat = np.asarray(layout.content.data)[offsets[0] : offsets[-1]]
        return flat, np.diff(offsets).astype(np.int64)  # the ids stay uint32 (a view, no copy)

    return encode


def _try_gigatoken(load: Callable, reference: Callable, backend: str, ascii_only: bool = False):
    """A gigatoken plain encoder when it is installed, loads, and agrees with ``reference`` on PROBES
    (on the ASCII ones when it will only be given ASCII texts)."""
    if backend == "reference":
        return None
    try:
        import gigatoken  # noqa: F401

        fast = _gigatoken_encoder(load(gigatoken))
        probes = [p for p in PROBES if p.isascii() or not ascii_only]
        a, b = fast(probes), reference(probes)
        if np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]):
            return fast
    except Exception:  # a model gigatoken does not support: use the reference encoder
        pass
    if backend == "gigatoken":
        raise CookbookError("gigatoken cannot reproduce this tokenizer exactly; use --tokenizer-backend reference")
    return None


# --------------------------------------------------------------------------- the tokenizer


@dataclass
class Tokenizer:
    """A tokenizer with Megatron-LM's ``tokenize`` / ``eod`` / ``vocab_size`` semantics."""

    type: str
    path: str
    vocab_size: int  # as Megatron-LM reports it: decides the indexed dataset's dtype
    eod: int | None
    bos: int | None
    prefix: list[int]  # ids Megatron's tokenize() puts before the text (BOS, post-processor)
    suffix: list[int]  # and after it
    plain: Callable[[list[str]], tuple[np.ndarray, np.ndarray]]  # fast batch encoder of plain text
    exact: Callable[[str], list[int]]  # reference encoder of one text, special strings handled
    needs_exact: Callable[[str], bool]  # texts ``plain`` cannot do: they go through ``exact``
    decode_ids: Callable[[list[int]], str]
    backend: str = "reference"
    special: dict[str, int] = field(
        default_factory=dict
    )  # strings split out of the text first (SentencePieceTokenizer)

    def tokenize(self, text: str) -> list[int]:
        """Exactly Megatron-LM's ``tokenizer.tokenize(text)``."""
        return self.prefix + list(self.exact(text)) + self.suffix

    def special_texts(self, texts: list[str]) -> list[int]:
        """The indices of the texts that ``plain`` cannot encode exactly (they go through ``exact``)."""
        return [i for i, t in enumerate(texts) if self.needs_exact(t)]

    def encode_batch(
        self, texts: list[str], end: int | None = None, dtype=np.int64, special: list[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``tokenize`` of every text, as (flat ids in ``dtype``, int64 lengths); with ``end``, that id is also
        appended to every non-empty result (``--append-eod``). ``special``: ``special_texts(texts)`` when the
        caller has it already (preprocess computes it in its reader thread)."""
        flat, lengths = self.plain(texts)
        special = self.special_texts(texts) if special is None else special
        if special:
            parts = flat_to_ragged(flat, lengths)
            for i in special:
                parts[i] = np.asarray(self.exact(texts[i]), dtype=np.int64)
            lengths = np.fromiter((len(p) for p in parts), np.int64, len(parts))
            flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        dtype = np.dtype(dtype)
        if dtype.itemsize < flat.dtype.itemsize and len(flat) and int(flat.max()) > np.iinfo(dtype).max:
            raise CookbookError(
                f"token id {int(flat.max())} does not fit {dtype.name}; the tokenizer's vocab size is wrong"
            )
        if self.prefix or self.suffix or end is not None:
            return _wrap(flat, lengths, self.prefix, self.suffix, end, dtype)
        return flat.astype(dtype, copy=False), lengths

    def decode(self, ids: Sequence[int]) -> str:
        return self.decode_ids([int(i) for i in ids])


def tokenizer_difference(a: Tokenizer, b: Tokenizer) -> str | None:
    """None when ``a`` and ``b`` turn text into the same ids (same vocabulary, the same text for every id, the
    same special ids and the same ids on the probe texts), else what differs: logit distillation compares
    the two models' distributions id by id, so it needs one tokenizer."""
    if a.vocab_size != b.vocab_size:
        return f"vocabularies of {a.vocab_size} and {b.vocab_size} ids"
    if (a.eod, a.bos) != (b.eod, b.bos):
        return f"end-of-document/BOS ids {a.eod}/{a.bos} and {b.eod}/{b.bos}"
    for i in range(a.vocab_size):
        if a.decode_ids([i]) != b.decode_ids([i]):
            return f"id {i} reads {a.decode_ids([i])!r} in one and {b.decode_ids([i])!r} in the other"
    for text in PROBES:
        if a.tokenize(text) != b.tokenize(text):
            return f"{text[:30]!r} tokenizes differently"
    return None


def scatter(out: np.ndarray, flat: np.ndarray, lengths: np.ndarray, starts: np.ndarray) -> None:
    """Copy the sequences of a flat batch into ``out`` at positions ``starts``."""
    src_starts = np.cumsum(lengths) - lengths
    out[np.arange(len(flat)) + np.repeat(starts - src_starts, lengths)] = flat


def _wrap(
    flat: np.ndarray, lengths: np.ndarray, prefix: list[int], suffix: list[int], end: int | None = None, dtype=None
):
    """Put ``prefix`` before and ``suffix`` after every sequence of a flat batch, and ``end`` after every
    non-empty one; the result in ``dtype``. The few fixed ids are placed by position and the text's ids copied
    in one masked assignment (a fancy-indexed scatter of every id costs several times more)."""
    n_pre, n_suf = len(prefix), len(suffix)
    new_lengths = lengths + (n_pre + n_suf)
    has_end = (new_lengths > 0) if end is not None else np.zeros(len(lengths), bool)
    new_lengths += has_end
    ends = np.cumsum(new_lengths)
    starts = ends - new_lengths
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=flat.dtype if dtype is None else dtype)
    own = np.ones(len(out), bool)  # where the texts' own ids go
    fixed = [(starts + j, t) for j, t in enumerate(prefix)]
    fixed += [(ends - has_end - n_suf + j, t) for j, t in enumerate(suffix)]
    if end is not None:
        fixed.append(((ends - 1)[has_end], end))
    for positions, t in fixed:
        out[positions] = t
        own[positions] = False
    out[own] = flat
    return out, new_lengths


def _routed(fast, reference, use_fast: Callable[[str], bool]):
    """A plain encoder that sends the texts ``use_fast`` accepts to ``fast``, the rest to ``reference``."""

    def encode(texts: list[str]):
        mask = np.fromiter(map(use_fast, texts), dtype=bool, count=len(texts))
        if mask.all():
            return fast(texts)
        if not mask.any():
            return reference(texts)
        groups = [(np.flatnonzero(m), enc) for m, enc in ((mask, fast), (~mask, reference))]
        encoded = [(idx, *enc([texts[i] for i in idx])) for idx, enc in groups]
        lengths = np.empty(len(texts), np.int64)
        for idx, _, lens in encoded:
            lengths[idx] = lens
        starts = np.cumsum(lengths) - lengths
        out = np.empty(int(lengths.sum()), np.int64)
        for idx, flat, lens in encoded:
            scatter(out, flat, lens, starts[idx])
        return out, lengths

    return encode


def _contains_any(triggers: tuple[str, ...]) -> Callable[[str], bool]:
    """A fast test for "does the text contain any of these strings" (grouped by their first two
    characters, so hundreds of ``<|reserved_special_token_N|>`` cost one search)."""
    groups: dict[str, list[str]] = {}
    for t in triggers:
        if t:
            groups.setdefault(t[:2], []).append(t)

    def contains(text: str) -> bool:
        return any(head in text and any(t in text for t in group) for head, group in groups.items())

    return contains


# --------------------------------------------------------------------------- SentencePiece kinds


def _load_sentencepiece(path: Path):
    try:
        import sentencepiece
    except ImportError as e:  # pragma: no cover - a dependency
        raise CookbookError("sentencepiece is not installed; pip install sentencepiece") from e
    try:
        return sentencepiece.SentencePieceProcessor(model_file=str(path))
    except Exception as e:
        raise CookbookError(f"{path} is not a SentencePiece model ({str(e).splitlines()[0]})") from e


def protobuf_fields(buf: bytes):
    """(field number, value) of a protobuf message's top level: an int for a varint, bytes otherwise
    (a length-delimited field's payload, or a fixed64/fixed32 field's 8/4 little-endian bytes)."""
    i = 0

    def varint():
        nonlocal i
        shift = result = 0
        while True:
            b = buf[i]
            i += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                return result

    while i < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, varint()
        elif wire == 1:
            yield number, buf[i : i + 8]
            i += 8
        elif wire == 2:
            n = varint()
            yield number, buf[i : i + n]
            i += n
        elif wire == 5:
            yield number, buf[i : i + 4]
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def gigatoken_scope(path: Path) -> str:
    """Which texts gigatoken encodes exactly as sentencepiece does, by the model's NormalizerSpec
    (ModelProto field 3: precompiled_charsmap 2, add_dummy_prefix 3, remove_extra_whitespaces 4,
    escape_whitespaces 5; the flags default to true). Measured against sentencepiece on fuzzed text:

    ``all``   no normalization table and extra whitespace kept (Llama 2's settings): every text;
    ``ascii`` a table (nmt_nfkc ...) and extra whitespace removed (sentencepiece's defaults): ASCII
              texts only; around some non-ASCII characters (a combining grapheme joiner) they differ;
    ``none``  any other combination (they differ even on ASCII whitespace).
    """
    try:
        spec = dict(protobuf_fields(next((v for n, v in protobuf_fields(path.read_bytes()) if n == 3), b"")))
    except (ValueError, IndexError):
        return "none"
    table = len(spec.get(2, b"")) > 0
    dummy, remove_ws, escape_ws = (bool(spec.get(k, 1)) for k in (3, 4, 5))
    if not (dummy and escape_ws):
        return "none"
    if not table and not remove_ws:
        return "all"
    if table and remove_ws:
        return "ascii"
    return "none"


def _sentencepiece_tokenizer(path: Path, kind: str, threads: int, backend: str) -> Tokenizer:
    sp = _load_sentencepiece(path)
    n = sp.get_piece_size()
    reference = _sentencepiece_encoder(sp, threads)
    # Control and unknown pieces are never produced from text by sentencepiece; a fast encoder
    # might match their literal strings (gigatoken turns a literal "<s>" into BOS), so texts that
    # contain them go through sentencepiece itself.
    controls = tuple(sp.id_to_piece(i) for i in range(n) if sp.is_control(i) or sp.is_unknown(i))
    scope = gigatoken_scope(path) if backend != "reference" else "none"
    fast = None
    if scope != "none":
        load = lambda g: g.Tokenizer.from_sentencepiece(str(path))  # noqa: E731
        fast = _try_gigatoken(load, reference, backend, ascii_only=scope == "ascii")
    elif backend == "gigatoken":
        raise CookbookError(
            f"gigatoken does not reproduce {path}'s normalization exactly; use --tokenizer-backend reference"
        )
    # gigatoken turns the literal text "<s>" into BOS, which sentencepiece never does: texts holding
    # a control-token string go to sentencepiece, and so do non-ASCII texts where scope is ascii.
    has_control = _contains_any(controls)
    if fast and scope == "ascii":
        plain = _routed(fast, reference, lambda t: t.isascii() and not has_control(t))
    elif fast:
        plain = _routed(fast, reference, lambda t: not has_control(t))
    else:
        plain = reference

    def decode(ids):
        return sp.decode([i for i in ids if i < n])

    if kind == "Llama2Tokenizer":
        return Tokenizer(
            type=kind,
            path=str(path),
            vocab_size=n,
            eod=sp.eos_id(),
            bos=sp.bos_id(),
            prefix=[sp.bos_id()],
            suffix=[],
            plain=plain,
            exact=lambda t: sp.encode(t),
            needs_exact=lambda t: False,
            decode_ids=decode,
            backend="gigatoken" if fast else "sentencepiece",
        )

    # Megatron-LM's _SentencePieceTokenizer: special tokens appended after the model's pieces.
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    special: dict[str, int] = {}

    def add(token: str) -> int:
        if token not in vocab:
            vocab[token] = len(vocab)
        special[token] = vocab[token]
        return vocab[token]

    for t in ("<CLS>", "<SEP>", "<EOD>", "<MASK>"):
        add(t)
    eod = vocab["<EOD>"]
    for pid, default in ((sp.pad_id(), "<PAD>"), (sp.bos_id(), "<BOS>"), (sp.eos_id(), "<EOS>")):
        add(sp.id_to_piece(pid) if 0 <= pid < n else default)
    inverse = {i: t for t, i in vocab.items()}

    def exact(text: str) -> list[int]:
        ids: list[int] = []
        idx = 0
        while True:
            found = {t: text.find(t, idx) for t in special}
            found = {t: i for t, i in found.items() if i >= 0}
            if not found:
                break
            token = min(found, key=found.get)  # first occurrence; ties go to the earlier-added token
            ids.extend(sp.encode(text[idx : found[token]]))
            ids.append(special[token])
            idx = found[token] + len(token)
        ids.extend(sp.encode(text[idx:]))
        return ids

    def decode_special(ids):
        out, run = [], []
        for i in ids:
            if i < n and inverse.get(i) not in special:
                run.append(i)
                continue
            out.append(sp.decode(run))
            run = []
            out.append(inverse.get(i, ""))
        out.append(sp.decode(run))
        return "".join(out)

    return Tokenizer(
        type=kind,
        path=str(path),
        vocab_size=len(vocab),
        eod=eod,
        bos=None,
        prefix=[],
        suffix=[],
        plain=plain,
        exact=exact,
        needs_exact=_contains_any(tuple(special)),
        decode_ids=decode_special,
        backend="gigatoken" if fast else "sentencepiece",
        special=special,
    )


# --------------------------------------------------------------------------- Hugging Face kinds


def _hf_files(path: Path) -> tuple[Path, Path]:
    """(tokenizer.json, folder holding the tokenizer's config files)."""
    if path.is_dir():
        if not (path / "tokenizer.json").exists():
            raise CookbookError(f"{path} has no tokenizer.json; give a folder saved by a Hugging Face fast tokenizer")
        return path / "tokenizer.json", path
    return path, path.parent


def _token_content(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _special_token_names(folder: Path) -> dict[str, str]:
    """bos/eos token strings from tokenizer_config.json or special_tokens_map.json."""
    names: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = folder / name
        if f.exists():
            try:
                cfg = json.loads(f.read_text(encoding="utf-8"))
            except (ValueError, OSError) as e:
                raise CookbookError(f"{f} is not valid JSON ({e})") from e
            for key in ("bos_token", "eos_token"):
                token = _token_content(cfg.get(key))
                if token:
                    names[key] = token
    return names


def _template(with_special: list[int], without: list[int]) -> tuple[list[int], list[int]] | None:
    """(prefix, suffix) such that ``with_special == prefix + without + suffix``, if they exist."""
    for k in range(len(with_special) - len(without) + 1):
        if with_special[k : k + len(without)] == without:
            return with_special[:k], with_special[k + len(without) :]
    return None


def _huggingface_tokenizer(path: Path, backend: str) -> Tokenizer:
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError as e:  # pragma: no cover - a dependency
        raise CookbookError("tokenizers is not installed; pip install tokenizers") from e
    tok_json, folder = _hf_files(path)
    if not tok_json.exists():
        raise CookbookError(f"tokenizer file {tok_json} does not exist")
    try:
        tok = HFTokenizer.from_file(str(tok_json))
    except Exception as e:
        raise CookbookError(f"{tok_json} is not a Hugging Face tokenizer.json ({str(e).splitlines()[0]})") from e
    probe = "Hello world"
    # transformers' Llama-style classes rebuild the post-processor from add_bos_token/add_eos_token
    # in tokenizer_config.json; only then is transformers (slow to import) asked what it adds.
    config = folder / "tokenizer_config.json"
    try:
        settings = json.loads(config.read_text(encoding="utf-8")) if config.exists() else {}
    except ValueError as e:
        raise CookbookError(f"{config} is not valid JSON ({e})") from e
    if not isinstance(settings, dict):
        raise CookbookError(f"{config} is not a JSON object")
    declares = "add_bos_token" in settings or "add_eos_token" in settings
    specials = _transformers_specials(folder, probe) if declares else None
    # split_special_tokens: AutoTokenizer keeps the special tokens' strings in a text as text
    tok.encode_special_tokens = bool(settings.get("split_special_tokens"))
    if specials is None:  # without transformers: tokenizer.json's post-processor and the config files
        names = _special_token_names(folder)
        template = _template(tok.encode(probe).ids, tok.encode(probe, add_special_tokens=False).ids)
        if template is None:
            raise CookbookError(f"cannot tell which special tokens {tok_json}'s post-processor adds")
        ids = {k: tok.token_to_id(v) for k, v in names.items()}
        for key, token in names.items():
            if ids[key] is None:
                raise CookbookError(f"the {key} {token!r} of {folder} is not in the vocabulary of {tok_json}")
        specials = (*template, ids.get("eos_token"), ids.get("bos_token"))
    prefix, suffix, eod, bos = specials
    reference = _tokenizers_encoder(tok)
    fast = _try_gigatoken(lambda g: g.Tokenizer(tok), reference, backend)
    # Added tokens are matched in the text before the model runs; texts holding one go through
    # tokenizers itself so that lstrip/rstrip/normalized flags are honoured exactly.
    added = tuple(t.content for t in tok.get_added_tokens_decoder().values())
    return Tokenizer(
        type="HuggingFaceTokenizer",
        path=str(path),
        vocab_size=tok.get_vocab_size(with_added_tokens=True),
        eod=eod,
        bos=bos,
        prefix=list(prefix),
        suffix=list(suffix),
        plain=fast or reference,
        exact=lambda t: tok.encode(t, add_special_tokens=False).ids,
        needs_exact=_contains_any(added) if fast else (lambda t: False),
        decode_ids=lambda ids: tok.decode(ids, skip_special_tokens=False),
        backend="gigatoken" if fast else "tokenizers",
    )


def _transformers_specials(folder: Path, probe: str):
    """(prefix, suffix, eos id, bos id) as transformers' AutoTokenizer, which Megatron-LM calls,
    sees them; None when transformers is not installed or cannot load the folder."""
    try:
        from transformers import AutoTokenizer
    except Exception:
        return None
    try:
        t = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception:
        return None
    template = _template(t(probe).input_ids, t(probe, add_special_tokens=False).input_ids)
    return None if template is None else (*template, t.eos_token_id, t.bos_token_id)


def _gpt2_tokenizer(vocab_file: Path, merge_file: Path, backend: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    for f, flag in ((vocab_file, "--vocab-file"), (merge_file, "--merge-file")):
        if f is None or not Path(f).exists():
            raise CookbookError(f"GPT2BPETokenizer needs {flag} (the GPT-2 vocab.json / merges.txt); {f} not found")
    try:
        vocab = json.loads(Path(vocab_file).read_text(encoding="utf-8"))
        tok = HFTokenizer(models.BPE.from_file(str(vocab_file), str(merge_file)))
    except Exception as e:
        raise CookbookError(f"cannot read the GPT-2 BPE files {vocab_file}, {merge_file} ({e})") from e
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if "<|endoftext|>" not in vocab:
        raise CookbookError(f"{vocab_file} has no <|endoftext|> token, the GPT-2 end of document")
    reference = _tokenizers_encoder(tok)
    fast = _try_gigatoken(lambda g: g.Tokenizer(tok), reference, backend)
    return Tokenizer(
        type="GPT2BPETokenizer",
        path=str(vocab_file),
        vocab_size=len(vocab),
        eod=vocab["<|endoftext|>"],
        bos=None,
        prefix=[],
        suffix=[],
        plain=fast or reference,
        exact=lambda t: tok.encode(t, add_special_tokens=False).ids,
        needs_exact=lambda t: False,
        decode_ids=lambda ids: tok.decode(ids, skip_special_tokens=False),
        backend="gigatoken" if fast else "tokenizers",
    )


# --------------------------------------------------------------------------- entry point


def infer_tokenizer_type(path: Path) -> str:
    """A SentencePiece ``.model`` is the Llama 2 family; anything else a Hugging Face tokenizer."""
    return "Llama2Tokenizer" if path.is_file() and path.suffix == ".model" else "HuggingFaceTokenizer"


def load_tokenizer(
    path: str | os.PathLike | None,
    tokenizer_type: str | None = None,
    *,
    vocab_file: str | os.PathLike | None = None,
    merge_file: str | os.PathLike | None = None,
    threads: int = 1,
    backend: str = "auto",
) -> Tokenizer:
    """Load a tokenizer by Megatron-LM's ``--tokenizer-type`` name (inferred from the file when None).

    ``backend``: ``auto`` (gigatoken when installed and exact on the probes), ``gigatoken`` (fail
    if it cannot be used) or ``reference`` (sentencepiece / tokenizers only).
    """
    if backend not in ("auto", "gigatoken", "reference"):
        raise CookbookError(f"unknown tokenizer backend {backend!r}; use auto, gigatoken or reference")
    _set_native_threads(threads)
    if tokenizer_type == "GPT2BPETokenizer":
        return _gpt2_tokenizer(vocab_file, merge_file, backend)
    if path is None:
        raise CookbookError("no tokenizer given; pass --tokenizer-model PATH (a .model file or a tokenizer folder)")
    path = Path(path)
    if not path.exists():
        raise CookbookError(
            f"tokenizer {path} does not exist; pass --tokenizer-model PATH (a .model file or a tokenizer folder)"
        )
    tokenizer_type = tokenizer_type or infer_tokenizer_type(path)
    if tokenizer_type in ("Llama2Tokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        if tokenizer_type == "GPTSentencePieceTokenizer":
            raise CookbookError(
                "GPTSentencePieceTokenizer is not supported; use Llama2Tokenizer or SentencePieceTokenizer"
            )
        return _sentencepiece_tokenizer(path, tokenizer_type, threads, backend)
    if tokenizer_type == "HuggingFaceTokenizer":
        return _huggingface_tokenizer(path, backend)
    raise CookbookError(f"unknown tokenizer type {tokenizer_type!r}; choose one of {', '.join(TOKENIZER_TYPES)}")


def encode_documents(tok: Tokenizer, values: list, append_eod: bool, dtype=np.int64, special: list[int] | None = None):
    """Tokenize documents as Megatron-LM does -> (flat ids in ``dtype``, sequence lengths, sequences per document).

    A value is a string (one sequence) or a list of strings (one sequence per string). Empty
    sequences are dropped; with ``append_eod`` the EOD goes after each non-empty document's last
    sequence. ``special``: ``tok.special_texts(values)``, if already known (all values strings).
    """
    if append_eod and tok.eod is None:
        raise CookbookError(
            f"tokenizer {tok.path} has no EOS token (eos_token in tokenizer_config.json); --append-eod needs one"
        )
    n_docs = len(values)
    if all(type(v) is str for v in values):  # one sequence per document: the EOD is appended with the ids
        flat, lengths = tok.encode_batch(values, end=tok.eod if append_eod else None, dtype=dtype, special=special)
        keep = lengths > 0
        return flat, lengths[keep], keep.astype(np.int64)
    texts = [s for v in values for s in ([v] if isinstance(v, str) else v)]
    sentence_doc = np.repeat(np.arange(n_docs), [1 if isinstance(v, str) else len(v) for v in values])
    flat, lengths = tok.encode_batch(texts, dtype=dtype)
    keep = lengths > 0
    seq_lengths, seq_doc = lengths[keep], sentence_doc[keep]
    if append_eod and len(seq_lengths):
        last = np.append(seq_doc[1:] != seq_doc[:-1], True)
        new_lengths = seq_lengths + last
        ends = np.cumsum(new_lengths)
        out = np.empty(int(ends[-1]), dtype=flat.dtype)
        scatter(out, flat, seq_lengths, ends - new_lengths)
        out[ends[last] - 1] = tok.eod
        flat, seq_lengths = out, new_lengths
    return flat, seq_lengths, np.bincount(seq_doc, minlength=n_docs)


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int = 1) -> int:
    """Megatron-LM's padding of a tokenizer's vocabulary: the next multiple of ``divisible_by x tp``."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple
