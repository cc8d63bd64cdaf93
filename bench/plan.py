"""Benchmark: how far ``cookbook plan``'s activation memory lies above the peak measured on this machine.

The planner must never be below the measured peak (tests/test_plan.py asserts that on every machine). How far
above it lies depends on which CPU kernels run and the workspaces they take, so the ratio is reported here:

    python bench/plan.py            # planned / measured peak, per recompute mode and vocabulary, bf16, CPU

Measured: forward + backward of a bf16 model (4 layers, hidden 128, GQA 4/2, seq 256, micro batch 2) under the
profiler's allocation events, less its bf16 gradients; planned: ``cookbook.engine.plan.estimate``'s activations.
"""

from __future__ import annotations

import argparse
import copy

import torch

from cookbook.engine.metrics import activation_memory
from cookbook.engine.plan import GIB, GPUS, estimate
from cookbook.engine.recompute import apply_activation_checkpointing
from cookbook.engine.trainer import next_token_loss
from cookbook.model import ModelConfig, Transformer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, nargs="+", default=[96, 8000])
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    print("| vocab | recompute | measured peak (MiB) | planned (MiB) | planned / measured |")
    print("|---|---|---|---|---|")
    for vocab in args.vocab:
        cfg = ModelConfig(
            vocab_size=vocab,
            hidden_size=128,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=352,
            max_seq_len=args.seq,
        )
        torch.manual_seed(0)
        plain = Transformer(cfg)
        plain.init_weights(0)
        plain = plain.to(torch.bfloat16)
        batch = torch.randint(0, vocab, (2, args.seq + 1))
        grads = 2 * sum(p.numel() for p in plain.parameters())
        for mode in ("none", "selective", "full"):
            model = copy.deepcopy(plain)
            apply_activation_checkpointing(model, mode)
            peak = activation_memory(lambda: next_token_loss(model, batch))[1] - grads
            planned = (
                estimate(
                    cfg, args.seq, 2, GPUS["A100-80GB"], 1, 8, tp=1, pp=1, mode=mode, micro_batch=2
                ).activations_gib
                * GIB
            )
            print(f"| {vocab} | {mode} | {peak / 2**20:.2f} | {planned / 2**20:.2f} | {planned / peak:.2f}x |")


if __name__ == "__main__":
    main()
