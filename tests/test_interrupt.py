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


def test_an_interrupt_waits_for_a_held_import(tmp_path):
    """A module that imports with interrupts held (torch, whose C module imports numpy and goes on without it if that
    fails) runs to its end; the interrupt comes after it."""
    (tmp_path / "self_interrupting.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)\nfor _ in range(1000):\n    pass\nprint('ran to the end')\n"
    )
    script = (
        "import sys\n"
        "from cookbook.errors import hold_interrupts_while_importing\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "hold_interrupts_while_importing(*sys.argv[1:])\n"
        "try:\n"
        "    import self_interrupting\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted')\n"
    )
    # as a user's shell starts it: a test run in the background starts with SIGINT ignored, and so would its children
    as_a_user = dict(capture_output=True, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    held = subprocess.run([sys.executable, "-c", script, "self_interrupting"], **as_a_user)
    assert held.stdout.split("\n") == ["ran to the end", "interrupted", ""], held
    not_held = subprocess.run([sys.executable, "-c", script], **as_a_user)
    assert not_held.stdout == "interrupted\n", not_held


def test_a_command_started_ignoring_ctrl_c_goes_on_ignoring_it(tmp_path):
    """``nohup cookbook ... &``: a process started with SIGINT ignored is not stopped by it, as Python itself does."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cookbook", "sample-corpus", str(tmp_path / "sample.jsonl"), "--max-mb", "8"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    for delay in (0.3, 0.5, 0.5):  # as the CLI imports, and after
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert (tmp_path / "sample.jsonl").stat().st_size > 1_000_000
