"""cookbook convert streams: a model larger than the memory a conversion is allowed converts anyway.

Each conversion runs in its own process under an address-space limit (RLIMIT_AS). The readers never
memory-map (safetensors and torch pickles are read with seek + readinto, DCP reads byte ranges), and
the process runs one compute thread (OMP_NUM_THREADS=1: a second thread's stack and malloc arena would
add ~100 MB of address space that holds no data), so the limit counts what the conversion holds. The
limit is the address space the same command needs on a tiny model plus half the big model's size: the
big model converts in every direction under it, while holding the model's tensors at once fails.

    python tests/test_convert_memory.py [--hidden-size 2048 --num-layers 16 ...]

prints peak resident memory against model size for every direction (the table in docs/convert.md).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from cookbook.formats import hf
from cookbook.formats.stream import Checkpoint, expected_shapes
from cookbook.model.config import ModelConfig

# Peak resident (VmHWM) and address space (VmPeak) of the process, printed when it exits.
PEAK = """
import atexit, re, sys
def peak():
    status = open("/proc/self/status").read()
    print("PEAK", *(int(re.search(k + r":\\s+(\\d+)", status).group(1)) * 1024 for k in ("VmHWM", "VmPeak")))
atexit.register(peak)
"""
CONVERT = PEAK + "from cookbook.cli import main\nmain(sys.argv[1:])\n"
# the control: the same imports, then the big model's tensors all at once
HOLD_ALL = (
    PEAK + "import recipes.convert\nfrom cookbook.formats import hf\nheld = list(hf.read(sys.argv[1]).tensors())\n"
)


def big_config(hidden: int = 768, layers: int = 10, vocab: int = 8000) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=hidden // 64,
        num_kv_heads=hidden // 128,
        intermediate_size=8 * hidden // 3 // 64 * 64,
        max_seq_len=256,
    )


TINY = ModelConfig(
    vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, max_seq_len=64
)


def write_random_hf(folder: Path, cfg: ModelConfig) -> int:
    """A Hugging Face folder of random fp32 weights, written one tensor at a time; its size in bytes."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)

    def tensors():
        for name, shape in expected_shapes(cfg).items():
            yield name, torch.randn(shape, generator=g) * 0.02

    dtypes = {name: torch.float32 for name in expected_shapes(cfg)}
    ckpt = Checkpoint(cfg, tensors, dtypes, hf_files={})
    hf.write(folder, ckpt, tensors(), dtypes)
    return sum(torch.Size(s).numel() * 4 for s in expected_shapes(cfg).values())


def measure(code: str, *args, limit: int | None = None) -> tuple[int, int, int, str]:
    """(exit code, peak resident bytes, peak address space bytes, output) of ``python -c code args``."""

    def limited():
        if limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        preexec_fn=limited,
        cwd=Path(__file__).parents[1],
        env=env,
        timeout=600,
    )
    peaks = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("PEAK")]
    hwm, vm = map(int, peaks[-1]) if peaks else (0, 0)
    return proc.returncode, hwm, vm, proc.stdout + proc.stderr


CHAIN = [  # every reader and every writer once: hf -> megatron (torch) -> megatron (torch_dist) -> cookbook -> hf
    ("hf", "megatron", "hf", "megatron", ["--tp", "2", "--pp", "2"]),
    ("megatron", "megatron", "megatron", "megatron_dist", ["--ckpt-format", "torch_dist", "--tp", "2"]),
    ("megatron", "cookbook", "megatron_dist", "cookbook", []),
    ("cookbook", "hf", "cookbook", "hf_back", []),
]


def convert_args(root: Path, source: str, target: str, load: str, save: str, extra: list[str]) -> list[str]:
    return [
        "convert",
        "-q",
        "--from",
        source,
        "--to",
        target,
        "--load-dir",
        root / load,
        "--save-dir",
        root / save,
        *extra,
    ]


def test_a_model_larger_than_the_memory_limit_converts(tmp_path):
    """A 300 MB model converts hf -> megatron (torch, TP 2, PP 2) -> megatron (torch_dist) -> cookbook -> hf with
    150 MB of address space beyond what a tiny model's conversion needs, and comes back bit for bit."""
    cfg = big_config()
    size = write_random_hf(tmp_path / "big" / "hf", cfg)
    write_random_hf(tmp_path / "tiny" / "hf", TINY)
    rc, _, baseline, out = measure(CONVERT, *convert_args(tmp_path / "tiny", *CHAIN[0]))
    assert rc == 0, out
    limit = baseline + size // 2
    for step in CHAIN:
        rc, hwm, vm, out = measure(CONVERT, *convert_args(tmp_path / "big", *step), limit=limit)
        assert rc == 0, f"{step[:2]} under {limit / 1e6:.0f} MB: {out[-3000:]}"
        assert vm <= limit
    # the limit binds: holding the model's tensors at once does not fit under it
    rc, _, _, out = measure(HOLD_ALL, tmp_path / "big" / "hf", limit=limit)
    assert rc != 0 and ("MemoryError" in out or "alloc" in out.lower()), out[-2000:]
    # and what came back is the model that went in
    want, got = hf.read(tmp_path / "big" / "hf").tensors(), hf.read(tmp_path / "big" / "hf_back").tensors()
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(want, got, strict=True))


def main() -> None:
    """Peak resident memory of each direction against the model's size, for docs/convert.md."""
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--hidden-size", type=int, default=2048)
    p.add_argument("--num-layers", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--dir", default="convert_memory")
    a = p.parse_args()
    root = Path(a.dir)
    rows = []
    for name, cfg in (("tiny", TINY), ("big", big_config(a.hidden_size, a.num_layers, a.vocab_size))):
        size = write_random_hf(root / name / "hf", cfg)
        layer = sum(torch.Size(s).numel() * 4 for n, s in expected_shapes(cfg).items() if n.startswith("layers.0."))
        for step in CHAIN + [
            ("hf", "cookbook", "hf", "cookbook_direct", []),
            ("megatron", "hf", "megatron", "hf_from_megatron", []),
            ("megatron", "megatron", "megatron", "megatron_tp1", []),
            ("hf", "megatron", "hf", "dist_direct", ["--ckpt-format", "torch_dist", "--tp", "2"]),
            ("megatron", "hf", "megatron_dist", "hf_from_dist", []),
        ]:
            start = time.perf_counter()
            rc, hwm, vm, out = measure(CONVERT, *convert_args(root / name, *step))
            assert rc == 0, out
            direction = f"{step[0]}{' (torch_dist)' if step[2] == 'megatron_dist' else ''} -> {step[1]} {' '.join(step[4])}".strip()
            rows.append(
                dict(
                    model=name,
                    direction=direction,
                    model_mb=size / 1e6,
                    layer_mb=layer / 1e6,
                    peak_rss_mb=hwm / 1e6,
                    peak_vm_mb=vm / 1e6,
                    seconds=time.perf_counter() - start,
                )
            )
    base = {r["direction"]: r for r in rows if r["model"] == "tiny"}
    print("| direction | model | one layer | peak RSS | RSS over the tiny model's | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["model"] == "big":
            over = r["peak_rss_mb"] - base[r["direction"]]["peak_rss_mb"]
            print(
                f"| {r['direction']} | {r['model_mb']:,.0f} MB | {r['layer_mb']:,.0f} MB | {r['peak_rss_mb']:,.0f} MB "
                f"| {over:,.0f} MB ({over / r['layer_mb']:.1f} layers) | {r['seconds']:.1f} |"
            )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
