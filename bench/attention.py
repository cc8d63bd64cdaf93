"""Benchmark: what attention within documents costs, per kernel, against plain causal SDPA in the same run.

One attention call of a Llama layer (``AttentionMask.attend``, the seam every block uses) over a batch of rows
packed from documents of 100-1,000 tokens (Megatron-LM's ``--reset-attention-mask``), for each kernel the device
runs, against the baseline: SDPA ``is_causal`` over the whole row (attention across documents, what training
without the flag does). Reported per kernel: the median time of a forward, of a forward + backward (where the
kernel has a backward on the device: FlexAttention has none on CPU), the time to prepare the mask once per
forward (shared by every layer), and the bytes the mask holds (SDPA: a boolean [b, s, s]).

The kernels also agree: every output is checked against the SDPA reference before timing (fp32: 1e-4).

    python bench/attention.py                          # CPU, fp32, sequences 1024 2048 4096, 2 threads
    python bench/attention.py --device cuda --dtype bf16 --seq 4096 8192 16384 --batch 2 --threads 0
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.train import OtherLoad, timed  # noqa: E402
from cookbook.engine.attention import AttentionMask, Flex, installed_flash  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def packed_documents(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """Document ids [batch, seq] of rows cut from documents of 100-1,000 tokens laid end to end."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        lengths = []
        while sum(lengths) < seq:
            lengths.append(int(rng.integers(100, 1001)))
        rows.append(np.repeat(np.arange(len(lengths)), lengths)[:seq])
    return torch.from_numpy(np.stack(rows)).to(torch.int32)


def mask_bytes(mask: AttentionMask) -> int:
    """The bytes a prepared mask holds: SDPA's booleans, FlexAttention's block indices, flash-attn's cu_seqlens."""
    total = 0
    for prepared in mask.prepared.values():
        if prepared is None:
            continue
        if isinstance(prepared, torch.Tensor):
            tensors = [prepared]
        elif isinstance(prepared, Flex):
            tensors = [t for t in prepared.block_mask.as_tuple() if isinstance(t, torch.Tensor)]
        else:
            tensors = [t for t in vars(prepared).values() if isinstance(t, torch.Tensor)]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0: leave torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    kernels = ["sdpa", "flex"]
    version = installed_flash(device)
    if version:
        kernels.append(f"flash{version}")
    backward = {k: device.type == "cuda" or k != "flex" for k in kernels}
    print(
        f"attention: batch {args.batch}, {args.heads} heads ({args.kv_heads} kv), head dim {args.head_dim}, {args.dtype}, "
        f"{device.type}; documents of 100-1,000 tokens; threads {torch.get_num_threads()}; cpus {os.cpu_count()}; "
        f"{platform.processor() or platform.machine()}; torch {torch.__version__}"
        + ("" if version else "; flash-attn not installed")
    )
    print(
        f"\n{'seq':>6s} {'kernel':14s} {'prepare ms':>10s} {'fwd ms':>9s} {'vs causal':>9s} {'fwd+bwd ms':>10s} "
        f"{'vs causal':>9s} {'mask bytes':>12s}"
    )
    other = OtherLoad()
    other.start()
    for seq in args.seq:
        g = torch.Generator().manual_seed(seq)
        q = torch.randn(args.batch, args.heads, seq, args.head_dim, generator=g).to(device, dtype)
        k, v = (
            torch.randn(args.batch, args.kv_heads, seq, args.head_dim, generator=g).to(device, dtype) for _ in range(2)
        )
        documents = packed_documents(args.batch, seq).to(device)
        causal = AttentionMask("sdpa", None, {0: seq}, args.batch, device)  # no documents: is_causal over the row
        reference = AttentionMask("sdpa", documents, {0: seq}, args.batch, device).attend(q, k, v)
        masks = {"causal (sdpa)": causal}
        prepare = {"causal (sdpa)": 0.0}
        for kernel in kernels:
            prepare[kernel] = statistics.median(
                timed(
                    lambda: masks.__setitem__(kernel, AttentionMask(kernel, documents, {0: seq}, args.batch, device)),
                    device,
                )[0]
                for _ in range(args.repeats)
            )
            out = masks[kernel].attend(q, k, v)
            tolerance = 1e-4 if dtype == torch.float32 else 2e-2
            if not torch.allclose(out.float(), reference.float(), atol=tolerance, rtol=0):
                raise SystemExit(
                    f"{kernel} differs from the SDPA reference by {(out - reference).abs().max():.2e} at seq {seq}"
                )

        def forward(mask):
            with torch.no_grad():
                return mask.attend(q, k, v)

        def forward_backward(mask):
            qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
            mask.attend(qq, kk, vv).sum().backward()

        times = {name: {"fwd": [], "bwd": []} for name in masks}
        for r in range(args.repeats + 1):  # the first round warms up (FlexAttention compiles on GPU)
            for name in list(masks) if r % 2 == 0 else list(masks)[::-1]:
                fwd = timed(lambda: forward(masks[name]), device)[0]
                bwd = timed(lambda: forward_backward(masks[name]), device)[0] if backward.get(name, True) else None
                if r:
                    times[name]["fwd"].append(fwd)
                    times[name]["bwd"].append(bwd)
        base = {key: statistics.median(times["causal (sdpa)"][key]) for key in ("fwd", "bwd")}
        for name, mask in masks.items():
            fwd = statistics.median(times[name]["fwd"])
            bwd = statistics.median(times[name]["bwd"]) if backward.get(name, True) else None
            print(
                f"{seq:6d} {name:14s} {1e3 * prepare[name]:10.2f} {1e3 * fwd:9.2f} {fwd / base['fwd']:8.2f}x "
                + (f"{1e3 * bwd:10.2f} {bwd / base['bwd']:8.2f}x" if bwd else f"{'no backward':>10s} {'':>9s}")
                + f" {mask_bytes(mask):12,d}"
            )
    share = other.stop()
    if share is not None:
        print(
            f"\nother processes used {100 * share:.0f}% of the machine's CPU time; above a few % the figures are disturbed"
        )


if __name__ == "__main__":
    main()
