"""Helpers for the training tests: a learnable token dataset, tiny-model flags, running
``cookbook pretrain`` in one or several real processes, and reading metrics.jsonl."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cookbook.data.indexed import IndexedDatasetWriter
from cookbook.engine.metrics import read_metrics

VOCAB = 96


def write_token_dataset(prefix: Path, documents: int = 200, vocab: int = VOCAB, seed: int = 0) -> str:
    """Documents from a noisy counting rule (next = prev + 1 or + 2 mod vocab): a model can learn it,
    so the loss falls, yet no two documents are the same."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 120, size=documents)
    docs = []
    for n in lengths:
        steps = rng.choice([1, 1, 1, 2], size=n)
        docs.append((rng.integers(0, vocab) + np.cumsum(steps)) % vocab)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        w.add_documents(np.concatenate(docs), lengths)
    return str(prefix)


# a 2-layer model of hidden size 64 (its flags; TINY: on the tiny preset, with the tests' vocabulary)
SMALL = "--num-layers 2 --hidden-size 64 --num-attention-heads 4 --num-query-groups 2 --ffn-hidden-size 128".split()
SMALL += ["--max-position-embeddings", "64"]
TINY = ["--preset", "tiny", *SMALL, "--vocab-size", str(VOCAB)]
# a short fp32 run on the CPU, every step logged, no evaluation
CPU_RUN = "--seq-length 32 --micro-batch-size 2 --dtype fp32 --device cpu --eval-interval 0 --log-interval 1".split()


def train_flags(data: str, save: Path | None, iters: int, **extra) -> list[str]:
    flags = [*TINY, "--data-path", data, *CPU_RUN, "--train-iters", str(iters)]
    flags += "--lr 3e-3 --lr-warmup-iters 2 --min-lr 3e-4 --seed 7".split()
    if save is not None:
        flags += ["--save", str(save)]
    for key, value in extra.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def env(threads: int = 1) -> dict:
    e = dict(os.environ)
    e.pop("COOKBOOK_DEBUG", None)
    e.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return e


def command(flags: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "cookbook", "pretrain", *flags]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "cookbook",
        "pretrain",
        *flags,
    ]


def pretrain(flags: list[str], nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(command(flags, nproc), env=env(), capture_output=True, text=True, timeout=timeout)
    return proc


def start(flags: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command(flags), env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 120) -> int:
    """Poll metrics.jsonl until it logs ``step`` (or later); the last step logged."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before step {step}:\n{proc.stdout.read()}")
        if metrics.is_file():
            text = metrics.read_text()
            steps = [int(line.split('"step": ')[1].split(",")[0]) for line in text.splitlines() if '"step": ' in line]
            if steps and max(steps) >= step:
                return max(steps)
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout} s")


def losses(save: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(save / "metrics.jsonl") if r.get("split", "train") == "train"}


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def run_script(script: Path, out: Path, nproc: int, *args: str) -> dict:
    """Run a layout script (tests/tp_train.py, tests/pp_train.py) in ``nproc`` processes; its saved results."""
    import torch

    cmd = [sys.executable, str(script), str(out), *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *cmd[1:]]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-5000:]}"
    return torch.load(out, weights_only=True)


def save_result(is_main: bool, result, out: str) -> None:
    """A layout script's results, written by rank 0 under a temporary name and renamed (``run_script`` reads them)."""
    import torch

    if is_main:
        torch.save(result, out + ".tmp")
        os.replace(out + ".tmp", out)


def max_diff(a: dict, b: dict) -> tuple[float, str]:
    """The largest absolute difference between two state dicts with the same names, and where."""
    assert sorted(a) == sorted(b)
    return max(((x - b[k]).abs().max().item(), k) for k, x in a.items())


def assert_same_run(want: dict, got: dict) -> None:
    """A layout's run equals the one-process run: the same initial weights (bitwise), first-step
    gradients, losses, clipped grad norms and final weights to fp32 rounding."""
    import math

    assert max_diff(want["initial"], got["initial"])[0] == 0.0
    for name, g in want["first_grads"].items():  # relative to each tensor's largest entry
        diff = (g - got["first_grads"][name]).abs().max().item()
        assert diff <= 1e-5 * g.abs().max().item() + 1e-12, (name, diff)
    assert want["losses"][-1] < want["losses"][0] - 0.3  # it learns
    for step, (a, b) in enumerate(zip(want["losses"], got["losses"], strict=True)):
        assert abs(a - b) <= 1e-5, (step, a, b)
    for step, (a, b) in enumerate(zip(want["grad_norms"], got["grad_norms"], strict=True)):
        assert a > 0.5 and math.isclose(a, b, rel_tol=1e-5), (step, a, b)  # > 0.5: the clip is active
    diff, name = max_diff(want["final"], got["final"])
    assert diff <= 1e-5, (name, diff)
