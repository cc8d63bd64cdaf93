"""Without the optional speed-ups (gigatoken, orjson), as on a machine that lacks them, the output
is the same bytes."""

from __future__ import annotations

import subprocess
import sys

from helpers_data import write_jsonl

from recipes.preprocess import PreprocessConfig, run

SCRIPT = """
import sys
sys.modules["gigatoken"] = None  # import fails
sys.modules["orjson"] = None
from recipes.preprocess import PreprocessConfig, run
s = run(PreprocessConfig([sys.argv[1]], sys.argv[2], tokenizer_model=sys.argv[3], append_eod=True), show_progress=False)
print(s.tokenizer)
"""


def test_same_bytes_without_gigatoken_and_orjson(tmp_path, sp_model, hf_tokenizer, corpus_texts):
    jsonl = write_jsonl(tmp_path / "in.jsonl", corpus_texts)
    for name, tok in (("sp", sp_model), ("hf", hf_tokenizer)):
        fast = run(
            PreprocessConfig([str(jsonl)], str(tmp_path / f"fast_{name}"), str(tok), append_eod=True),
            show_progress=False,
        )
        proc = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(jsonl), str(tmp_path / f"slow_{name}"), str(tok)],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "gigatoken" not in proc.stdout and "gigatoken" in fast.tokenizer
        for ext in (".bin", ".idx"):
            a = (tmp_path / f"fast_{name}_text_document{ext}").read_bytes()
            assert a == (tmp_path / f"slow_{name}_text_document{ext}").read_bytes()
