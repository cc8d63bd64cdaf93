"""Parallelism applied to a model from the outside, the torchtitan way.

``build_model`` creates the model on the ``meta`` device (no memory), applies parallelism, then
materialises only each rank's shards and initialises them. Each parameter's initial value comes
from its own generator seeded by (seed, parameter name) (``Transformer.initial_value``), so the
weights are the same under every parallel layout and world size.

The order of ``parallelize`` is fixed: tensor parallel -> activation checkpointing -> compile per
block -> FSDP. Only FSDP exists today; the others plug in at the marked places.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from cookbook.engine.distributed import ParallelDims
from cookbook.model import ModelConfig, Transformer

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def dp_mesh(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh:
    """FSDP's mesh: 1-D over dp_shard, or 2-D (replicate, shard) for HSDP."""
    return mesh["dp_replicate", "dp_shard"] if dims.dp_replicate > 1 else mesh["dp_shard"]


def apply_fsdp(model: Transformer, mesh: DeviceMesh, param_dtype: torch.dtype) -> None:
    """ZeRO-3 with FSDP2: each block is one all-gather / reduce-scatter unit, the root holds the
    embeddings, final norm and output layer. Master weights and gradient reduction stay fp32;
    compute runs in ``param_dtype``."""
    policy = MixedPrecisionPolicy(param_dtype=None if param_dtype == torch.float32 else param_dtype, reduce_dtype=torch.float32)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def parallelize(model: Transformer, mesh: DeviceMesh, dims: ParallelDims, param_dtype: torch.dtype) -> None:
    # 1. tensor + sequence parallel (DTensor plans on mesh["tp"]) ......... the scale-out issue
    # 2. activation checkpointing per block ............................... the scale-out issue
    # 3. torch.compile per block ........................................... the scale-out issue
    # 4. data parallel: FSDP2 over the dp dims
    apply_fsdp(model, dp_mesh(mesh, dims), param_dtype)


@torch.no_grad()
def init_parameters(model: Transformer, seed: int) -> None:
    """Every parameter to its layout-independent initial value (this rank's shard of it)."""
    for name, param in model.named_parameters():
        full = model.initial_value(name, param.shape, param.device, seed)
        if isinstance(param, DTensor):
            full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.copy_(full)


def build_model(cfg: ModelConfig, mesh: DeviceMesh, dims: ParallelDims, device: torch.device, dtype: str, seed: int) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    parallelize(model, mesh, dims, DTYPES[dtype])
    model.to_empty(device=device)
    init_parameters(model, seed)
    return model
