"""Nothing lost silently: the table "What survives a conversion" in docs/convert.md, walked row by row.

For each setting (row) and each format that can express it (a "yes" cell), a tiny model with that setting is made
in that format (saved by transformers, then converted); it then converts to every format (column): where the
table says "yes" the result reads back with the same config and the same tensors, where it says "no" the
conversion is refused with one line and nothing is written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers_convert import make_hf

from cookbook.errors import CookbookError
from recipes.convert import READERS, ConvertConfig, run

pytest.importorskip("transformers")

DOC = Path(__file__).parents[1] / "docs" / "convert.md"
FORMATS = {
    "hf": ("hf", {}),
    "cookbook": ("cookbook", {}),
    "megatron torch": ("megatron", {"ckpt_format": "torch"}),
    "megatron torch_dist": ("megatron", {"ckpt_format": "torch_dist"}),
}
TINY = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2)
# each row's model: (helpers_convert kind, transformers config changes)
ROWS = {
    "vocabulary of 100 tokens (not a multiple of 128)": ("llama-gqa", {}),
    "tied embeddings": ("llama-gqa", {"tie_word_embeddings": True}),
    "head_dim other than hidden / heads": ("llama-gqa", {"head_dim": 16}),
    "q/k/v biases": ("qwen2-bias", {"tie_word_embeddings": False}),
    "norm epsilon 1e-6": ("llama-gqa", {"rms_norm_eps": 1e-6}),
    "RoPE theta 500000": ("llama-gqa", {"rope_theta": 500000.0}),
    "RoPE scaling linear": ("linear-rope", {"num_key_value_heads": 2}),
    "RoPE scaling llama3 (low 1, high 4, original 8192)": ("llama3-rope", {}),
    "RoPE scaling llama3 with other constants": (
        "llama3-rope",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 2.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }
        },
    ),
    "RoPE scaling dynamic": ("llama-gqa", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    "RoPE scaling yarn": (
        "llama-gqa",
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}},
    ),
}


def table() -> tuple[list[str], dict[str, dict[str, bool]]]:
    """(columns, {setting: {column: expressible}}) from docs/convert.md."""
    text = DOC.read_text().split("## What survives a conversion", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    header, rows = cells[0], cells[2:]
    assert header[0] == "setting"
    expressible = {}
    for row in rows:
        assert all(re.match(r"(yes|no)\b", cell) for cell in row[1:]), row
        expressible[row[0]] = {col: cell.startswith("yes") for col, cell in zip(header[1:], row[1:])}
    return header[1:], expressible


COLUMNS, TABLE = table()


def test_the_table_names_every_format_and_setting():
    assert COLUMNS == list(FORMATS)
    assert sorted(TABLE) == sorted(ROWS)


def convert(source: str, column: str, load: Path, save: Path) -> None:
    target, extra = FORMATS[column]
    run(ConvertConfig(source, target, str(load), str(save), **extra), show_progress=False)


def contents(fmt: str, path: Path):
    ckpt = READERS[fmt](path)
    return ckpt.config, list(ckpt.tensors())


@pytest.mark.parametrize("setting", list(ROWS))
def test_every_direction_keeps_the_setting_or_refuses(setting, tmp_path, hf_tokenizer):
    kind, changes = ROWS[setting]
    hf = make_hf(tmp_path / "hf", kind, hf_tokenizer, **{**TINY, **changes})
    for column, ok in TABLE[setting].items():
        source = FORMATS[column][0]
        if not ok:
            continue
        made = hf if column == "hf" else tmp_path / f"source-{column}"
        if column != "hf":
            convert("hf", column, hf, made)
        config, tensors = contents(source, made)
        for target, keeps in TABLE[setting].items():
            out = tmp_path / f"{column}-to-{target}"
            if not keeps:
                with pytest.raises(CookbookError, match="has no Megatron-LM equivalent") as e:
                    convert(source, target, made, out)
                assert "\n" not in str(e.value) and not out.exists(), (column, target)
                continue
            convert(source, target, made, out)
            got_config, got = contents(FORMATS[target][0], out)
            assert got_config == config, (setting, column, target, got_config, config)
            assert [n for n, _ in got] == [n for n, _ in tensors]
            assert all(torch.equal(a, b) for (_, a), (_, b) in zip(got, tensors)), (setting, column, target)
