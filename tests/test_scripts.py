"""The scale-up recipes (scripts/pretrain, the context-extension and distillation ones) validate without GPUs (--dry-run),
and refuse a bad layout; the CPU experiments (scripts/prune_demo.sh, distill_demo.sh, extend_experiment.sh) run to the end in
their smoke mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def dry_run(script: str, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}", **env)
    path = (
        ROOT / "scripts" / script if "stretch" in script or "distill" in script else ROOT / "scripts/pretrain" / script
    )
    return subprocess.run(["bash", str(path), "--dry-run"], env=e, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("size, processes", [("31b", 64), ("65b", 128), ("108b", 256), ("132b", 256)])
def test_recipe_dry_run_is_valid(size, processes):
    proc = dry_run(f"llama-{size}.sh")
    assert proc.returncode == 0, proc.stderr
    assert f"dry run: the job is valid for {processes} processes" in proc.stderr
    assert (
        "(fits)" in proc.stderr and f'preset = "llama-{size}"' not in proc.stderr
    )  # the preset's shapes are printed resolved


def test_recipe_dry_run_refuses_a_bad_layout():
    proc = dry_run("llama-65b.sh", TP="3")
    assert (
        proc.returncode == 2
        and "not divisible by pp x dp_replicate x cp x tp = 3" in proc.stderr.strip().splitlines()[-1]
    )
    proc = dry_run("llama-65b.sh", MICRO_BATCH="3")
    assert proc.returncode == 2 and "not a multiple of micro batch 3" in proc.stderr.strip().splitlines()[-1]
    proc = dry_run("llama-65b.sh", NNODES="1", TP="1", RECOMPUTE="none")  # 65B on one node: out of memory
    assert proc.returncode == 2 and "more than one A100-80GB holds" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "script, processes, scaling, seq",
    [
        ("llama2-7b-stretch-8k.sh", 8, 'rope_scaling = { rope_type = "linear", factor = 2.0 }', "seq_length = 8192"),
        (
            "llama2-13b-stretch-32k.sh",
            32,
            'rope_scaling = { rope_type = "linear", factor = 8.0 }',
            "seq_length = 32768",
        ),
    ],
)
def test_stretch_recipe_dry_run_is_valid(script, processes, scaling, seq):
    proc = dry_run(script, LOAD="/nonexistent/ckpt")  # the preset stands in for a checkpoint not on this machine
    assert proc.returncode == 0, proc.stderr
    assert f"dry run: the job is valid for {processes} processes" in proc.stderr and "(fits)" in proc.stderr
    assert scaling in proc.stderr and seq in proc.stderr


def test_distill_recipes_dry_run(tmp_path):
    """distill-generate.sh: the Megatron Cookbook's sampling settings, vLLM TP 8 (or the servers of ENDPOINTS);
    distill-train-13b.sh: a valid 32-GPU job blending synthetic with original data."""
    proc = dry_run("distill-generate.sh")
    assert proc.returncode == 0, proc.stderr
    assert "via vllm, tensor parallel 8" in proc.stderr and "dry run: the generation job is valid" in proc.stderr
    for setting in (
        '"max_tokens": 4096',
        '"temperature": 0.7',
        '"top_p": 0.9',
        '"frequency_penalty": 0.5',
        '"repetition_penalty": 2.0',
        '"stop": ["<|endoftext|>"]',
    ):
        assert setting in proc.stderr, setting
    proc = dry_run("distill-generate.sh", ENDPOINTS="http://node1:8000,http://node2:8000")
    assert proc.returncode == 0 and "via openai at http://node1:8000, http://node2:8000" in proc.stderr, proc.stderr
    proc = dry_run("distill-train-13b.sh", LOAD="/nonexistent/ckpt", SAVE=str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "dry run: the job is valid for 32 processes" in proc.stderr and "(fits)" in proc.stderr
    assert f'"0.5", "data/pile_text_document", "0.5", "{tmp_path}/out/synthetic/synthetic_text_document"' in " ".join(
        proc.stderr.split()
    )


def experiment(script: str, out: Path, **env) -> dict:
    """A CPU experiment in its SMOKE mode (tiny shapes, a few iterations, a 1 MB corpus, two seeds): it runs to the
    end and writes its results JSON."""
    e = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        SMOKE="1",
        SEEDS="1 2",
        **env,
    )
    e.pop("COOKBOOK_DEBUG", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / script), str(out)], env=e, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_prune_experiment_over_seeds(tmp_path):
    import json

    printed = experiment("prune_demo.sh", tmp_path, STEPS="4", HEAL_STEPS="2")
    results = json.loads((tmp_path / "prune_results.json").read_text())
    assert results["seeds"] == ["1", "2"] and set(results["perplexity"]) >= {"base", "activation + KD", "scratch"}
    assert all(len(v) == 2 and all(x > 0 for x in v) for v in results["perplexity"].values())
    assert "activation + KD vs random + KD" in results["comparisons"] and "| importance |" in printed
    assert (tmp_path / "prune_recovery.png").is_file()


def test_distill_experiment_over_seeds(tmp_path):
    import json

    printed = experiment("distill_demo.sh", tmp_path, STEPS="4", BASE_STEPS="2", STUDENT_STEPS="2", PROMPTS="8")
    results = json.loads((tmp_path / "distill_results.json").read_text())
    assert set(results["perplexity"]) == {"student", "real", "synthetic_only", "blend", "kd"}
    assert all(len(v) == 2 and all(x > 0 for x in v) for v in results["perplexity"].values())
    assert results["teacher_ppl"] > 0 and "blend vs real" in results["comparisons"] and "| model |" in printed


def test_extension_experiment(tmp_path):
    import json

    printed = experiment("extend_experiment.sh", tmp_path, STEPS="4", EXT_STEPS="2", TRIALS="1")
    results = json.loads((tmp_path / "extend_results.json").read_text())
    assert set(results["results"]) == {"base", "pi0", "ntk0", "pi", "ntk", "yarn", "nopi"}
    for row in results["results"].values():
        assert set(row["ppl"]) == set(row["passkey"]) == set(row["recall"]) == {"128", "256", "512"}
        assert all(0 <= a <= 1 for task in ("passkey", "recall") for a in row[task].values())
    assert "| model |" in printed and (tmp_path / "extend_passkey.png").is_file()
    assert (tmp_path / "extend_recall.png").is_file()
