"""A few AdamW steps of a tiny model under a given tensor-parallel layout, for test_tensor_parallel.py.

    torchrun --standalone --nproc-per-node N tests/tp_train.py OUT --tp T [--cp C] [--dp-replicate R] [--variants base,sp,tied]

The world is dp x cp x tp with dp = N / (C x T) (FSDP2 over dp, and cp; ``--dp-replicate R`` makes it HSDP).
Every step trains on the same fixed global batch whatever the layout: each data-parallel rank takes its slice,
each cp rank its share of every sequence (``shard_batch``), every tp rank of a group the same tokens. Rank 0 writes ``torch.save`` of {variant: {"losses", "grad_norms",
"initial", "first_grads", "final"}} to OUT, tensors full (gathered), so a run in one process is the oracle
for any layout. A variant names a model config, whether sequence parallel is on (off at tp = 1) and whether the
rows are packed documents trained with Megatron-LM's three document flags (``docs``: positions restart after each
EOD, attention stays within documents, no loss on predicting a document's first token).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from helpers_train import save_result
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from cookbook.data.gpt_dataset import DocumentFlags
from cookbook.engine.config import OptimizerConfig, ParallelDims
from cookbook.engine.distributed import init_distributed, shutdown
from cookbook.engine.optim import build_optimizer, clip_grad_norm
from cookbook.engine.parallelize import build_model
from cookbook.engine.trainer import next_token_loss
from cookbook.errors import CookbookError
from cookbook.model import ModelConfig

STEPS, GLOBAL_BATCH, SEQ, VOCAB, SEED = 12, 4, 16, 96, 7
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=128,
    max_seq_len=64,
    qkv_bias=True,
)
DOCS = DocumentFlags(eod=VOCAB - 1, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)
# name -> (model config, sequence parallel, document flags)
VARIANTS = {
    "base": (ModelConfig(**TINY), False, None),
    "sp": (ModelConfig(**TINY), True, None),
    "tied": (ModelConfig(**TINY, tie_embeddings=True), True, None),
    "docs": (ModelConfig(**TINY), True, DOCS),
}


def counting_batches() -> torch.Tensor:
    """[steps, global batch, seq + 1] token rows of a noisy counting rule (next = previous + 1, or + 2 one time in
    four, mod vocab): learnable, so the loss falls within the run."""
    g = torch.Generator().manual_seed(SEED)
    start = torch.randint(0, VOCAB, (STEPS, GLOBAL_BATCH, 1), generator=g)
    steps = 1 + (torch.rand(STEPS, GLOBAL_BATCH, SEQ, generator=g) < 0.25).long()
    return torch.cat([start, start + steps.cumsum(-1)], dim=-1) % VOCAB


def document_batches() -> torch.Tensor:
    """``counting_batches`` with about one token in six replaced by the EOD: rows packed from documents of 1 to 17
    tokens (some rows start or end with one)."""
    g = torch.Generator().manual_seed(SEED + 1)
    batches = counting_batches() % (VOCAB - 1)
    return batches.masked_fill(torch.rand(batches.shape, generator=g) < 1 / 6, DOCS.eod)


def full_state(model) -> dict[str, torch.Tensor]:
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).clone() for k, v in state.items()}


def full_grads(model) -> dict[str, torch.Tensor]:
    # full_tensor() may return the local tensor itself (a mesh of one): clone before the clip scales it in place
    return {
        name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
        for name, p in model.named_parameters()
    }


def train(cfg: ModelConfig, dims: ParallelDims, mesh, world: int, documents: DocumentFlags | None = None) -> dict:
    model = build_model(cfg, mesh, dims, torch.device("cpu"), "fp32", SEED)
    meshes = {
        (p.device_mesh.mesh_dim_names, p.device_mesh.shape) if isinstance(p, DTensor) else None
        for p in model.parameters()
    }
    assert len(meshes) == 1, f"parameters on several meshes: {meshes}"
    initial = full_state(model)
    # Adam's first update is lr * g / (|g| + eps): in an element whose gradient is near zero, fp32 rounding (which
    # differs between layouts) moves the update by up to lr * rounding / eps. eps 1e-6 (not 1e-8) keeps that far
    # below the test's tolerance; the gradients themselves are compared directly at the first step.
    optimizer = build_optimizer(model, OptimizerConfig(lr=1e-3, weight_decay=0.1, adam_eps=1e-6))
    batches = counting_batches() if documents is None else document_batches()
    dp_rank = mesh.get_local_rank("dp_replicate") * dims.dp_shard + mesh.get_local_rank("dp_shard")
    per_rank = GLOBAL_BATCH // dims.dp
    # with a masked loss each micro batch's loss is the mean over its own scored tokens (Megatron-LM's), so every
    # layout takes micro batches of one row, accumulated, as the Trainer does with --micro-batch-size 1
    micro = 1 if documents is not None else per_rank
    losses, grad_norms = [], []
    for step in range(STEPS):
        rows = batches[step, dp_rank * per_rank : (dp_rank + 1) * per_rank]
        total = torch.zeros(())
        for part in rows.split(micro):
            # under cp: this rank's tokens, its loss sum divided by the row's scored tokens / cp
            loss = next_token_loss(model, part, mesh.get_local_rank("cp"), dims.cp, documents) / (per_rank // micro)
            loss.backward()
            total += loss.detach()
        if step == 0:
            first_grads = full_grads(model)
        grad_norms.append(float(clip_grad_norm(model.parameters(), 0.5)))  # small enough to clip
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(
            total
        )  # tp ranks hold their group's loss, cp ranks' losses average to the rows': the world's mean is the batch's
        losses.append(float(total) / world)
    result = {
        "losses": losses,
        "grad_norms": grad_norms,
        "initial": initial,
        "first_grads": first_grads,
        "final": full_state(model),
    }
    if dims.sequence_parallel:  # a sequence the tp ranks cannot split evenly is refused, on every rank alike
        try:
            model(batches[0, :per_rank, : dims.tp + 1])
        except CookbookError as e:
            result["uneven_sequence_error"] = str(e)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--dp-replicate", type=int, default=1)
    parser.add_argument("--cp", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    torch.manual_seed(0)
    d = init_distributed("cpu")
    mesh = ParallelDims(args.dp_replicate, cp=args.cp, tp=args.tp).resolve(d.world_size).build_mesh("cpu")
    results = {}
    for name in args.variants.split(","):
        cfg, sp, documents = VARIANTS[name]
        dims = ParallelDims(args.dp_replicate, cp=args.cp, tp=args.tp, sequence_parallel=sp).resolve(d.world_size)
        results[name] = train(cfg, dims, mesh, d.world_size, documents)
    save_result(d.is_main, results, args.out)
    shutdown()


if __name__ == "__main__":
    main()
