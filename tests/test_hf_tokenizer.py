"""convert --to hf writes tokenizer files that transformers' AutoTokenizer loads and that give our tokenizer's ids.

The oracle is ``AutoTokenizer.from_pretrained`` on the written folder against ``load_tokenizer(path, kind).tokenize``
(Megatron-LM's semantics, tests/test_tokenizer.py holds them to Megatron-LM's own tokenizers).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch
from conftest import TRICKY, stdlib_texts
from helpers_data import run_cli

from cookbook.data.tokenizer import load_tokenizer
from cookbook.formats.hf import write_side_files
from cookbook.formats.hf_tokenizer import read_sentencepiece
from cookbook.formats.stream import Checkpoint, tokenizer_files
from cookbook.model import ModelConfig

transformers = pytest.importorskip("transformers")

PIECES = [
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n\n",
    "\r\n",
    "a",
    "b",
    "word",
    "Word",
    "x1",
    "42",
    "3.14",
    "é",
    "ß",
    "日本",
    "😀",
    "👍🏽",
    "👨\u200d👩",
    "🇫🇷",
    "\u00a0",
    "\u3000",
    "\u034f",
    "\u0301",
    "\ufe0f",
    "\u200b",
    "\u200d",
    "ﬁ",
    "ｆｕｌｌ",
    "½",
    "가",
    "\u1100\u1161",
    "ㄱㅏ",
    "<s>",
    "</s>",
    "<unk>",
    "<EOD>",
    "<CLS>",
    "<0x41>",
    "▁",
    "▁▁",
    "def",
    "return",
    "(",
    ")",
    ":",
    "#",
    "'",
]
LITERAL = [
    " leading",
    "  two leading",
    "trailing ",
    "a  b   c    d",
    "\tx\n y ",
    "<s>",
    "</s>",
    "x<s>y",
    "<s> hi </s>",
    " <s>",
    "<EOD>",
    "a<EOD> b",
    "😀",
    "12345",
    "   ",
    "\u00a8 a \u00a8",
    "▁x",
    "<0x41>",
]


def varied_texts(n: int = 300, seed: int = 0) -> list[str]:
    """Random mixes of whitespace runs, words, digits, unicode, emoji and special-token strings, then
    hand-written cases, the conftest TRICKY texts, lines and whole files of the standard library."""
    rng = random.Random(seed)
    texts = ["".join(rng.choice(PIECES) for _ in range(rng.randint(0, 25))) for _ in range(n)]
    files = stdlib_texts(12)
    lines = [line for text in files for line in text.split("\n")[:40]]
    return texts + LITERAL + TRICKY + lines[::4] + files


TEXTS = varied_texts()
CASES = [
    (f, k)
    for f in ("sp_model", "sp_unigram", "sp_nfkc", "sp_odd")
    for k in ("Llama2Tokenizer", "SentencePieceTokenizer")
]
LOSSLESS = {"sp_model", "sp_unigram"}  # identity normalization, whitespace kept: decode(encode(text)) == text


def write_folder(folder: Path, carried: dict[str, Path], kind: str | None, note: str | None = None, **model) -> Path:
    """What convert --to hf writes beside the weights: config.json and the tokenizer files; no note for the user,
    or one that says ``note``."""
    folder.mkdir()
    cfg = ModelConfig(
        vocab_size=640,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=96,
        max_seq_len=256,
        **model,
    )
    ckpt = Checkpoint(cfg, tensors=lambda: iter(()), dtypes={}, hf_files=carried, tokenizer_type=kind)
    write_side_files(folder, ckpt, torch.float32)
    assert len(ckpt.notes) == (note is not None) and all(note in n for n in ckpt.notes), ckpt.notes
    return folder


def assert_backed_by(theirs, tokenizer_json: Path) -> None:
    """A fast tokenizer running tokenizer.json's pipeline, not one transformers rebuilt or converted."""
    from tokenizers import Tokenizer

    written = json.loads(Tokenizer.from_file(str(tokenizer_json)).to_str())
    backend = json.loads(theirs.backend_tokenizer.to_str())
    assert theirs.is_fast and all(backend[k] == written[k] for k in ("normalizer", "pre_tokenizer", "model", "decoder"))


def table_safe(text: str) -> bool:
    """No combining mark and no Hangul jamo: tokenizers' Precompiled normalizer applies a normalization table
    (NFKC) as sentencepiece does. (It maps a grapheme cluster by its first mapped character, dropping the marks
    after it, and does not compose jamo across characters.)"""
    return not any(
        unicodedata.category(c).startswith("M")
        or unicodedata.name(c, "").startswith(
            ("HANGUL CHOSEONG", "HANGUL JUNGSEONG", "HANGUL JONGSEONG", "HANGUL LETTER", "HALFWIDTH HANGUL")
        )
        for c in text
    )


def assert_same_ids(theirs, ours, texts: list[str], unigram: bool) -> None:
    """AutoTokenizer's ids are ours. Unigram: or the same pieces in another order, where two segmentations
    tie (sentencepiece sums scores in float32, tokenizers in float64, so a tie can fall either way)."""
    reordered = []
    for text in texts:
        want, got = ours.tokenize(text), theirs(text).input_ids
        if got != want:
            assert unigram and sorted(got) == sorted(want), (text[:80], got[:20], want[:20])
            reordered.append(text)
    assert len(reordered) <= len(texts) // 50, f"{len(reordered)} of {len(texts)} texts tie differently"


@pytest.mark.parametrize("fixture,kind", CASES)
def test_sentencepiece_folder_gives_our_ids(request, tmp_path, fixture, kind):
    """tokenizer.json + tokenizer_config.json written from a SentencePiece model: AutoTokenizer loads tokenizer.json
    itself (a fast tokenizer, nothing converted from tokenizer.model) and gives the ids of our tokenizer of that
    kind on every text (BOS or not, literal "<s>" as text or Megatron's special tokens split out, leading and
    repeated spaces, NFKC), and decodes them back to the text, or to the normalized text."""
    path = request.getfixturevalue(fixture)
    folder = write_folder(tmp_path / "hf", tokenizer_files(path), kind)
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ]
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_tokenizer(path, kind, backend="reference")
    assert_backed_by(theirs, folder / "tokenizer.json")
    model = read_sentencepiece(path)
    claimed = [t for t in TEXTS if table_safe(t)] if model.charsmap else TEXTS
    assert len(claimed) > 200
    assert_same_ids(theirs, ours, claimed, unigram=model.model_type == 1)
    assert theirs.eos_token_id == ours.eod and len(theirs) == ours.vocab_size
    for text in TEXTS:
        ids = ours.tokenize(text)
        if set(ids) & set(ours.special.values()):  # Megatron's special strings: cookbook decodes each run on its own
            continue
        decoded = theirs.decode(ids, skip_special_tokens=True)
        if not (model.remove_extra_whitespaces and text.lstrip(" ").startswith("\u2581")):
            assert decoded == ours.decode(ids)  # (there sentencepiece drops every leading "▁" piece, we one space)
        assert decoded == text or fixture not in LOSSLESS or "\u2581" in text  # a literal "▁" comes back as " "


def test_literal_special_strings(sp_model, tmp_path):
    """Llama2Tokenizer: "<s>" in a text is text, as in sentencepiece, and BOS comes first; SentencePieceTokenizer:
    Megatron's special strings become their ids, and no BOS."""
    llama = transformers.AutoTokenizer.from_pretrained(
        write_folder(tmp_path / "llama", tokenizer_files(sp_model), "Llama2Tokenizer")
    )
    ids = llama("<s>x</s>").input_ids
    assert ids[0] == llama.bos_token_id == 1 and ids.count(1) == 1 and 2 not in ids
    megatron = transformers.AutoTokenizer.from_pretrained(
        write_folder(tmp_path / "sp", tokenizer_files(sp_model), "SentencePieceTokenizer")
    )
    ours = load_tokenizer(sp_model, "SentencePieceTokenizer")
    ids = megatron("<s>x<EOD>").input_ids
    assert ids[0] == 1 and ids[-1] == ours.eod == megatron.eos_token_id and ids == ours.tokenize("<s>x<EOD>")


@pytest.mark.parametrize("config", [True, False])
def test_huggingface_tokenizer_travels_as_it_is(hf_tokenizer, tmp_path, config):
    """A tokenizer.json folder is carried byte for byte; a tokenizer_config.json is added only when missing, and then
    AutoTokenizer (which would pick LlamaTokenizer for a llama config.json) runs the tokenizer.json as it is."""
    carried = tokenizer_files(hf_tokenizer)
    if not config:
        carried = {"tokenizer.json": carried["tokenizer.json"]}
    folder = write_folder(tmp_path / "hf", carried, "HuggingFaceTokenizer")
    for name, path in carried.items():
        assert (folder / name).read_bytes() == path.read_bytes()
    assert (folder / "tokenizer_config.json").is_file()
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_tokenizer(hf_tokenizer, "HuggingFaceTokenizer")
    assert_backed_by(theirs, folder / "tokenizer.json")
    assert_same_ids(theirs, ours, TEXTS, unigram=False)
    for text in TEXTS[:50]:
        assert theirs.decode(theirs(text).input_ids, skip_special_tokens=True) == text


def test_our_tokenizer_of_the_written_folder_is_the_sentencepiece_one(sp_model, tmp_path):
    """A cookbook checkpoint converted back from the HF folder names it as a HuggingFaceTokenizer: that tokenizer
    (tokenizers on our tokenizer.json, split_special_tokens honoured) gives the SentencePiece model's ids."""
    folder = write_folder(tmp_path / "hf", tokenizer_files(sp_model), "Llama2Tokenizer")
    via_json = load_tokenizer(folder, "HuggingFaceTokenizer", backend="reference")
    ours = load_tokenizer(sp_model, "Llama2Tokenizer", backend="reference")
    assert [via_json.tokenize(t) for t in TEXTS] == [ours.tokenize(t) for t in TEXTS]
    assert (via_json.eod, via_json.bos) == (ours.eod, ours.bos)


NO_PROTOBUF = """
import json, sys
for name in ("sentencepiece", "google.protobuf"):  # what converting a tokenizer.model would need
    sys.modules[name] = None
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
texts = json.loads(open(sys.argv[2]).read())
print(json.dumps({"fast": tok.is_fast, "class": type(tok).__name__, "ids": [tok(t).input_ids for t in texts]}))
"""


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_convert_to_hf_output_loads_in_autotokenizer_without_protobuf(tmp_path, sp_model):
    """`cookbook convert --from cookbook --to hf` of a trained save whose config.toml names a SentencePiece
    tokenizer and its type (SentencePieceTokenizer: no BOS, Megatron's special tokens; tests/test_convert.py
    has the default, Llama2Tokenizer): the output folder loads in AutoTokenizer in a process where neither
    sentencepiece nor protobuf can be imported, as a fast tokenizer, and gives our ids."""
    from cookbook.engine.checkpoint import Checkpointer
    from cookbook.model import Transformer

    cfg = ModelConfig(
        vocab_size=640, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96, max_seq_len=64
    )
    model = Transformer(cfg)
    sections = {
        "model": {k: v for k, v in cfg.to_dict().items() if v is not None},
        "data": {"tokenizer_model": str(sp_model), "tokenizer_type": "SentencePieceTokenizer"},
    }
    Checkpointer(tmp_path / "run", keep_last=0, is_main=True).save(
        3, model, torch.optim.AdamW(model.parameters()), sections, {"step": 3}
    )
    proc = run_cli(
        "convert", "--from", "cookbook", "--to", "hf", "--load-dir", tmp_path / "run", "--save-dir", tmp_path / "hf"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp_path / "hf"
    assert (out / "tokenizer.model").read_bytes() == sp_model.read_bytes()
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 64
    texts = LITERAL + TRICKY + stdlib_texts(2)
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    proc = subprocess.run(
        [sys.executable, "-c", NO_PROTOBUF, str(out), str(tmp_path / "texts.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["fast"] and loaded["class"] in ("TokenizersBackend", "PreTrainedTokenizerFast")  # transformers 5, 4
    ours = load_tokenizer(sp_model, "SentencePieceTokenizer")
    assert loaded["ids"] == [ours.tokenize(t) for t in texts]


def test_a_model_without_a_tokenizer_json_equivalent_keeps_tokenizer_model(tmp_path, sp_model):
    """A SentencePiece model tokenizer.json cannot express (whitespace as suffix) converts with tokenizer.model
    only and a note that says why."""
    import sentencepiece as spm

    lines = [line for t in stdlib_texts(10) for line in t.split("\n") if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(tmp_path / "suffix"),
        vocab_size=300,
        model_type="bpe",
        treat_whitespace_as_suffix=True,
        minloglevel=2,
    )
    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copyfile(tmp_path / "suffix.model", folder / "tokenizer.model")
    cfg = ModelConfig(vocab_size=640, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96)
    ckpt = Checkpoint(cfg, tensors=lambda: iter(()), dtypes={}, hf_files={"tokenizer.model": tmp_path / "suffix.model"})
    write_side_files(folder, ckpt, torch.float32)
    assert not (folder / "tokenizer.json").exists()
    assert len(ckpt.notes) == 1 and "treat_whitespace_as_suffix" in ckpt.notes[0]


def test_user_defined_symbols(tmp_path, train_jsonl):
    """User-defined symbols (cookbook tokenizer train --special-tokens) are added tokens: a text without one gets our
    ids, a text with one gets the symbol's id, and the conversion says that the text after one differs."""
    from cookbook.data.tokenizer_train import TokenizerTrainConfig, train_tokenizer

    path = train_tokenizer(
        TokenizerTrainConfig(
            [str(train_jsonl)], str(tmp_path / "ud.model"), vocab_size=400, special_tokens=["<sym>", "<|im_end|>"]
        )
    )
    folder = write_folder(tmp_path / "hf", tokenizer_files(path), "Llama2Tokenizer", note="(<sym>, <|im_end|>)")
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    ours = load_tokenizer(path, "Llama2Tokenizer")
    assert_same_ids(theirs, ours, [t for t in TEXTS if "<sym>" not in t and "<|im_end|>" not in t], unigram=False)
    assert theirs("x <|im_end|>").input_ids == ours.tokenize("x <|im_end|>")


def test_qwen2_shaped_model_says_how_to_load_its_tokenizer(sp_model, tmp_path):
    """A model with q/k/v biases is written as Qwen2ForCausalLM, whose tokenizer transformers 5 always loads as
    Qwen2Tokenizer: the conversion says so, and PreTrainedTokenizerFast loads the folder with our ids."""
    folder = write_folder(
        tmp_path / "hf", tokenizer_files(sp_model), "Llama2Tokenizer", note="PreTrainedTokenizerFast", qkv_bias=True
    )
    theirs = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    assert_same_ids(theirs, load_tokenizer(sp_model, "Llama2Tokenizer"), TEXTS, unigram=False)
