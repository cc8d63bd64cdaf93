"""bench/gpu.sh cannot rot: its --smoke run goes through every rung at tiny shapes on the CPU.

The GPU figures themselves come from the real run on a GPU (docs/benchmarks.md); here each rung must finish with
the status the CPU allows (measured, or refused with its one line), the table must hold one plain line per rung,
and the JSON every figure. A rung that hangs or dies is its own row, and the run still ends with its table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu import RUNGS  # noqa: E402


def bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu.sh"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=ROOT.parent,
    )


def test_smoke_run_reports_every_rung(tmp_path):
    out = tmp_path / "gpu.json"
    proc = bench("--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    payload = json.loads(out.read_text())
    rows = payload["rungs"]
    assert set(rows) == {r.name for r in RUNGS} | {"memory"}
    status = {name: r["status"] for name, r in rows.items()}
    measured = {"sdpa", "hf", "docs sdpa", "loss", "docs loss", "generate", "memory"}
    assert {name for name, s in status.items() if s == "ok"} == measured, status
    assert all(s == "skipped" for name, s in status.items() if name not in measured), status  # refusals, no failure
    assert "cannot train on CPU" in rows["docs flex"]["note"] and "compile" in rows["sdpa compile"]["note"]
    for name in ("sdpa", "docs sdpa", "hf"):
        assert rows[name]["tokens_per_s"] > 0 and rows[name]["step_s"] > 0 and rows[name]["memory_gib"] > 0
    assert rows["sdpa"]["vs_hf"] > 0 and rows["sdpa"]["attention"] == "sdpa"
    assert rows["memory"]["plan_gib"] > 0
    for name in ("loss", "docs loss"):  # bf16 (CPU autocast here) against fp32 from the same weights
        assert len(rows[name]["bf16_losses"]) == len(rows[name]["fp32_losses"]) == 3
        assert rows[name]["max_rel_diff"] < 0.02
    assert rows["generate"]["vs_hf"] > 0 and "same greedy tokens: yes" in rows["generate"]["agreement"]
    assert payload["machine"]["torch"] and payload["smoke"] is True

    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("rung "))
    table = lines[header + 2 : header + 2 + len(rows)]
    assert [line.split()[0] for line in table] == [name.split()[0] for name in rows]
    assert "\x1b[" not in proc.stdout  # plain text on a pipe


def test_a_rung_that_hangs_is_its_row_and_the_budget_skips_the_rest(tmp_path):
    """Isolated rungs: one that outlives its timeout is killed and reported; once the budget is spent the next rung
    is skipped with the flag that reruns it; the table and the JSON come out all the same."""
    out = tmp_path / "gpu.json"
    proc = bench(
        "--smoke", "--isolate", "--rungs", "sdpa,hf", "--rung-timeout", "0.5", "--budget", "0.2", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rungs"]
    assert rows["sdpa"]["status"] == "failed" and "timed out after 0.5 s" in rows["sdpa"]["note"]
    assert rows["hf"]["status"] == "skipped" and "budget" in rows["hf"]["note"] and "--rungs" in rows["hf"]["note"]
    assert "timed out" in proc.stdout


def test_an_isolated_rung_reports_from_its_own_process(tmp_path):
    out = tmp_path / "gpu.json"
    proc = bench("--smoke", "--isolate", "--rungs", "docs flex", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    row = json.loads(out.read_text())["rungs"]["docs flex"]
    assert row["status"] == "skipped" and "cannot train on CPU" in row["note"] and row["seconds"] > 0


def test_unknown_rung_is_one_line():
    proc = bench("--smoke", "--rungs", "sdpa,warp")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: unknown rung(s) warp; known: " + ", ".join(r.name for r in RUNGS)
    )
