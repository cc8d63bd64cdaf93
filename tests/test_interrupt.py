"""An interrupted preprocess (Ctrl-C or SIGTERM) leaves nothing behind, not even temporary files."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from conftest import stdlib_texts
from helpers_data import write_jsonl


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_leaves_no_output(tmp_path, sp_model, sig):
    texts = stdlib_texts(200)
    jsonl = write_jsonl(tmp_path / "big.jsonl", texts * 6)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cookbook", "preprocess", "-i", str(jsonl), "-o", str(out / "ds"), "-t", str(sp_model),
         "--workers", "1", "--tokenizer-backend", "reference", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    deadline = time.time() + 60
    while not any(out.iterdir()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be interrupted; make the input larger"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert list(out.iterdir()) == []
    assert b"Traceback" not in err
