"""A few AdamW steps of a tiny model under a pipeline-parallel layout, for test_pipeline.py.

    python tests/pp_train.py OUT                                               # one process: the oracle
    torchrun --standalone --nproc-per-node N tests/pp_train.py OUT --pp 2 [--schedule Interleaved1F1B --chunks 2]
                                                                                 [--variants plain,docs]

The world is pp x dp with dp = N / pp (``build_pipeline_model``: FSDP2 over dp on each chunk). Every step trains on
the same fixed global batch whatever the layout: 8 rows, 4 micro batches per data-parallel rank (the oracle
accumulates over the same micro batches as the Trainer does: each micro batch's mean loss / 4, backward). Rank 0
writes ``torch.save`` of {variant: {"losses", "grad_norms", "evals", "initial", "first_grads", "final"}}, tensors full
(gathered from every stage by name), so the one-process run is the oracle for any layout. Variant ``docs`` trains on
rows packed from documents with Megatron-LM's three document flags: positions and document ids reach every stage
as keyword arguments, the masked targets the last stage's loss. Each of its rows has the same number of EODs, so
every micro batch scores as many tokens and the mean of the micro batches' means does not depend on how the rows
are grouped into micro batches (the layouts group them differently).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from helpers_train import save_result
from torch import nn
from torch.distributed.tensor import DTensor

from cookbook.data.gpt_dataset import DocumentFlags
from cookbook.engine.config import OptimizerConfig, ParallelDims
from cookbook.engine.distributed import init_distributed, shutdown
from cookbook.engine.loss import cross_entropy
from cookbook.engine.optim import build_optimizer, clip_grad_norm
from cookbook.engine.parallelize import build_model
from cookbook.engine.pipeline import (
    broadcast_from_last_stage,
    build_pipeline_model,
    build_schedule,
    clip_grad_norm_pp,
    pipeline_eval,
    pipeline_step,
    stage_ids,
)
from cookbook.engine.trainer import next_token_inputs, next_token_loss
from cookbook.model import ModelConfig

STEPS, GLOBAL_BATCH, MICRO_BATCHES, SEQ, VOCAB, SEED = 10, 8, 4, 16, 96, 7
CFG = ModelConfig(
    vocab_size=VOCAB,
    hidden_size=64,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=128,
    max_seq_len=64,
    qkv_bias=True,
)
CLIP = 0.5  # small enough to clip
EVAL_AFTER = (4, STEPS - 1)  # eval (forward only) after these steps: mid-run, then training goes on
DOCS = DocumentFlags(eod=VOCAB - 1, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)


def counting_batches() -> torch.Tensor:
    """[steps, global batch, seq + 1] rows of a noisy counting rule (next = previous + 1, or + 2 one time in four)."""
    g = torch.Generator().manual_seed(SEED)
    start = torch.randint(0, VOCAB, (STEPS, GLOBAL_BATCH, 1), generator=g)
    steps = 1 + (torch.rand(STEPS, GLOBAL_BATCH, SEQ, generator=g) < 0.25).long()
    return torch.cat([start, start + steps.cumsum(-1)], dim=-1) % VOCAB


def document_batches() -> torch.Tensor:
    """``counting_batches`` with three EODs at random places among each row's inputs: packed documents."""
    g = torch.Generator().manual_seed(SEED + 1)
    batches = counting_batches() % (VOCAB - 1)
    where = torch.rand(STEPS, GLOBAL_BATCH, SEQ, generator=g).argsort(dim=-1)[..., :3]
    batches[..., :SEQ].scatter_(-1, where, DOCS.eod)
    return batches


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def named_full(chunks, grads: bool = False) -> dict[str, torch.Tensor]:
    return {name: full(p.grad if grads else p) for chunk in chunks for name, p in chunk.named_parameters()}


def gather_to_rank0(local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """Every rank's {name: tensor} merged on rank 0 (dp replicas hold the same full tensors)."""
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(local, parts, dst=0)
    if parts is None:
        return None
    merged = {}
    for part in parts:
        merged.update(part)
    return merged


def optimizer_for(chunks) -> torch.optim.AdamW:
    # eps 1e-6: see tp_train.py (fp32 rounding of near-zero gradients, amplified by lr / eps at the first step)
    return build_optimizer(nn.ModuleList(chunks), OptimizerConfig(lr=1e-3, weight_decay=0.1, adam_eps=1e-6))


def train_one_process(documents: DocumentFlags | None) -> dict:
    mesh = ParallelDims().resolve(1).build_mesh("cpu")
    model = build_model(CFG, mesh, ParallelDims().resolve(1), torch.device("cpu"), "fp32", SEED)
    optimizer = optimizer_for([model])
    initial = named_full([model])
    batches = counting_batches() if documents is None else document_batches()
    losses, grad_norms, evals = [], [], []
    for step in range(STEPS):
        total = torch.zeros(())
        for micro in batches[step].chunk(MICRO_BATCHES):  # the Trainer's accumulation
            loss = next_token_loss(model, micro, documents=documents) / MICRO_BATCHES
            loss.backward()
            total += loss.detach()
        if step == 0:
            first_grads = named_full([model], grads=True)
        grad_norms.append(float(clip_grad_norm(model.parameters(), CLIP)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(total))
        if step in EVAL_AFTER:
            with torch.no_grad():
                evals.append(
                    sum(float(next_token_loss(model, m, documents=documents)) for m in batches[0].chunk(MICRO_BATCHES))
                    / MICRO_BATCHES
                )
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "evals": evals,
        "initial": initial,
        "first_grads": first_grads,
        "final": named_full([model]),
    }


def train_pipeline(
    pp: int, virtual: int, schedule_name: str, world: int, documents: DocumentFlags | None
) -> dict | None:
    dims = ParallelDims(pp=pp, layers_per_virtual_stage=CFG.num_layers // (pp * virtual)).resolve(world)
    mesh = dims.build_mesh("cpu")
    pp_mesh, dp_mesh = mesh["pp"], mesh["dp_shard"]
    pp_rank, dp_rank, dp = pp_mesh.get_local_rank(), dp_mesh.get_local_rank(), dims.dp_shard
    chunks = build_pipeline_model(CFG, mesh, dims, torch.device("cpu"), "fp32", SEED).chunks  # FSDP2 over dp on each
    optimizer = optimizer_for(chunks)
    schedule = build_schedule(chunks, pp_mesh, MICRO_BATCHES, cross_entropy, schedule_name, torch.device("cpu"))
    ids = stage_ids(pp_rank, pp, virtual)
    is_first, is_last = 0 in ids, pp * virtual - 1 in ids

    initial = gather_to_rank0(named_full(chunks))
    batches = counting_batches() if documents is None else document_batches()
    per_rank = GLOBAL_BATCH // dp
    losses, grad_norms, evals = [], [], []
    for step in range(STEPS):
        x = next_token_inputs(batches[step, dp_rank * per_rank : (dp_rank + 1) * per_rank], documents=documents)
        loss = pipeline_step(
            schedule, x.inputs, x.targets, is_first, is_last, positions=x.positions, **x.model_kwargs()
        )
        if step == 0:
            first_grads = gather_to_rank0(named_full(chunks, grads=True))
        grad_norms.append(float(clip_grad_norm_pp([p for c in chunks for p in c.parameters()], CLIP, pp_mesh)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = broadcast_from_last_stage(loss, pp_mesh, torch.device("cpu"))
        dist.all_reduce(loss, group=dp_mesh.get_group())  # each dp rank's mean over its rows: the mean of means
        losses.append(float(loss) / dp)
        if step in EVAL_AFTER:  # forward only, between training steps, on the first step's rows
            x = next_token_inputs(batches[0, dp_rank * per_rank : (dp_rank + 1) * per_rank], documents=documents)
            value = pipeline_eval(
                schedule, x.inputs, x.targets, is_first, is_last, positions=x.positions, **x.model_kwargs()
            )
            value = broadcast_from_last_stage(value, pp_mesh, torch.device("cpu"))
            dist.all_reduce(value, group=dp_mesh.get_group())
            evals.append(float(value) / dp)
    final = gather_to_rank0(named_full(chunks))
    if dist.get_rank() != 0:
        return None
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "evals": evals,
        "initial": initial,
        "first_grads": first_grads,
        "final": final,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--chunks", type=int, default=1)
    parser.add_argument("--schedule", default="1F1B")
    parser.add_argument("--variants", default="plain,docs")
    args = parser.parse_args()
    torch.manual_seed(0)
    d = init_distributed("cpu")
    result = {}
    for variant in args.variants.split(","):
        documents = {"plain": None, "docs": DOCS}[variant]
        result[variant] = (
            train_one_process(documents)
            if args.pp == 1
            else train_pipeline(args.pp, args.chunks, args.schedule, d.world_size, documents)
        )
    save_result(d.is_main, result, args.out)
    shutdown()


if __name__ == "__main__":
    main()
