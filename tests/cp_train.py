"""A few AdamW steps of a tiny model under a context-parallel layout, for test_context_parallel.py.

    python tests/cp_train.py OUT                                                 # one process: the oracle
    torchrun --standalone --nproc-per-node N tests/cp_train.py OUT --cp C [--tp T] [--dp-replicate R] [--variants base,sp]

The world is dp x cp x tp with dp = N / (C * T) (``--dp-replicate R``: HSDP, R replicas of dp / R shards), on the mesh (pp, dp_replicate, dp_shard, cp, tp). Every
step trains on tp_train.py's fixed global batch: each data-parallel rank takes its rows, each cp rank its two
chunks of every row (``shard_batch``), every tp rank of a group the same tokens. The model is built as
``build_model`` (the Trainer's):

    Transformer on meta -> apply_tp(mesh["tp"]) -> apply_cp(mesh["cp"]) -> apply_fsdp(dp_mesh(mesh, dims))
    -> to_empty -> tie_weights -> init_parameters

FSDP2 shards over dp_shard x cp flattened, so its gradient reduce-scatter averages over the cp ranks too. Rank 0
writes ``torch.save`` of {variant: {"losses", "grad_norms", "initial", "first_grads", "final"}}, tensors full,
so the one-process run (a plain model, no context parallel) is the oracle for any layout.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from helpers_train import save_result
from tp_train import GLOBAL_BATCH, SEED, STEPS, TINY, counting_batches, full_grads, full_state

from cookbook.engine.distributed import ParallelDims, init_distributed, shutdown
from cookbook.engine.optim import OptimizerConfig, build_optimizer, clip_grad_norm
from cookbook.engine.parallelize import build_model
from cookbook.engine.trainer import next_token_loss
from cookbook.model import ModelConfig

CFG = ModelConfig(**TINY)
VARIANTS = {"base": False, "sp": True}  # name -> sequence parallel (under tp > 1)


def train(dims: ParallelDims, mesh) -> dict:
    model = build_model(CFG, mesh, dims, torch.device("cpu"), "fp32", SEED)
    initial = full_state(model)
    # eps 1e-6: see tp_train.py (fp32 rounding of near-zero gradients, amplified by lr / eps at the first step)
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-3, weight_decay=0.1, adam_eps=1e-6))
    batches = counting_batches()
    dp_rank = mesh.get_local_rank("dp_replicate") * dims.dp_shard + mesh.get_local_rank("dp_shard")
    cp_rank = mesh.get_local_rank("cp")
    per_rank = GLOBAL_BATCH // dims.dp
    losses, grad_norms = [], []
    for step in range(STEPS):
        rows = batches[step, dp_rank * per_rank : (dp_rank + 1) * per_rank]
        loss = next_token_loss(model, rows, cp_rank, dims.cp)  # the mean over this rank's tokens (shard_batch)
        loss.backward()
        if step == 0:
            first_grads = full_grads(model)
        grad_norms.append(float(clip_grad_norm(model.parameters(), 0.5)))  # small enough to clip
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        dist.all_reduce(total)  # equal token counts everywhere: the world's mean is the global batch's mean
        losses.append(float(total) / mesh.size())
    return {"losses": losses, "grad_norms": grad_norms, "initial": initial, "first_grads": first_grads,
            "final": full_state(model)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--dp-replicate", type=int, default=1)
    parser.add_argument("--variants", default="base")
    args = parser.parse_args()
    torch.manual_seed(0)
    d = init_distributed("cpu")
    mesh = ParallelDims(args.dp_replicate, cp=args.cp, tp=args.tp).resolve(d.world_size).build_mesh("cpu")
    results = {}
    for name in args.variants.split(","):
        dims = ParallelDims(args.dp_replicate, cp=args.cp, tp=args.tp, sequence_parallel=VARIANTS[name]).resolve(d.world_size)
        results[name] = train(dims, mesh)
    save_result(d.is_main, results, args.out)
    shutdown()


if __name__ == "__main__":
    main()
