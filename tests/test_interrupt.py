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
        [
            sys.executable,
            "-m",
            "cookbook",
            "preprocess",
            "-i",
            str(jsonl),
            "-o",
            str(out / "ds"),
            "-t",
            str(sp_model),
            "--workers",
            "1",
            "--tokenizer-backend",
            "reference",
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # a shell without job control starts background jobs with SIGINT ignored, and so would this child: give it
        # the default disposition, as a terminal's foreground process has, so that Ctrl-C is what it receives
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
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


def test_failure_while_finishing_leaves_no_output(tmp_path, monkeypatch):
    """If writing the .idx fails, neither the .bin nor a temporary file is left at the prefix."""
    import numpy as np

    from cookbook.data import indexed

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(indexed, "write_index", broken)
    with pytest.raises(OSError, match="disk full"):
        with indexed.IndexedDatasetWriter(tmp_path / "ds", np.uint16) as w:
            w.add_documents(np.arange(10), np.array([4, 6]))
    assert list(tmp_path.iterdir()) == []
