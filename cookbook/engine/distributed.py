"""Process group, device and the one DeviceMesh every parallel piece takes its sub-mesh from.

Launched by torchrun, a process reads RANK / WORLD_SIZE / LOCAL_RANK from the environment; started
directly (``cookbook pretrain ...``), it is a world of one, with an in-process store. Either way a
process group exists, so the same code path (FSDP2, DCP, collectives) runs on a laptop and on many
nodes: gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from cookbook.checks import check_types
from cookbook.errors import CookbookError
from cookbook.flags import flag

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


@dataclass
class ParallelDims:
    """Degrees of each kind of parallelism; their product is the world size.

    ``dp_shard = -1`` takes whatever the other degrees leave. Data parallel is FSDP2 over
    ``dp_shard`` (ZeRO-3: parameters, gradients and optimizer state sharded), replicated over
    ``dp_replicate`` (HSDP). Tensor parallel (Megatron-LM's, ``tp`` ranks splitting every matmul)
    shares the mesh with it; ``sequence_parallel`` adds Megatron-LM's sequence parallel to it (norms
    and residuals sharded along the sequence between the tensor-parallel regions), and, as in
    Megatron-LM, means nothing at ``tp = 1``. Pipeline parallel cuts the blocks into ``pp`` stages
    (``pp x virtual_stages`` with interleaved 1F1B: ``layers_per_virtual_stage`` is Megatron-LM's
    ``--num-layers-per-virtual-pipeline-stage``). Context parallel splits each sequence over ``cp``
    ranks; FSDP shards over ``dp_shard`` and ``cp`` together.

    Ranks are laid out ``pp`` outermost, ``tp`` innermost: the ``tp`` ranks of one group are
    consecutive (one node's fast links), and all of them see the same data.
    """

    dp_replicate: int = field(
        default=1,
        metadata=flag(
            "--data-parallel-replicate-size",
            help="HSDP: replicas of the sharded model (default 1).",
            panel="Parallelism",
        ),
    )
    dp_shard: int = -1
    cp: int = field(
        default=1, metadata=flag("--context-parallel-size", help="Context-parallel degree.", panel="Parallelism")
    )
    tp: int = field(
        default=1, metadata=flag("--tensor-model-parallel-size", help="Tensor-parallel degree.", panel="Parallelism")
    )
    pp: int = field(
        default=1,
        metadata=flag(
            "--pipeline-model-parallel-size", help="Pipeline-parallel degree (1F1B schedule).", panel="Parallelism"
        ),
    )
    sequence_parallel: bool = field(
        default=False,
        metadata=flag(
            "--sequence-parallel/--no-sequence-parallel",
            help="Shard norms and residuals by sequence across the tensor-parallel ranks.",
            panel="Parallelism",
        ),
    )
    layers_per_virtual_stage: int | None = field(  # interleaved 1F1B when set (pp > 1)
        default=None,
        metadata=flag(
            "--num-layers-per-virtual-pipeline-stage",
            help="Interleaved 1F1B: layers per virtual stage (each rank holds several).",
            panel="Parallelism",
        ),
    )

    def __post_init__(self) -> None:
        check_types(self, "[parallel]")

    def resolve(self, world_size: int) -> ParallelDims:
        fixed = self.dp_replicate * self.cp * self.tp * self.pp
        for name in ("dp_replicate", "cp", "tp", "pp"):
            if getattr(self, name) < 1:
                raise CookbookError(f"parallel degree {name}={getattr(self, name)} must be at least 1")
        dp_shard = self.dp_shard
        if dp_shard == -1:
            if world_size % fixed:
                raise CookbookError(
                    f"world size {world_size} is not divisible by pp x dp_replicate x cp x tp = {fixed}"
                )
            dp_shard = world_size // fixed
        if dp_shard < 1 or fixed * dp_shard != world_size:
            raise CookbookError(
                f"parallel degrees pp={self.pp} dp_replicate={self.dp_replicate} dp_shard={dp_shard} cp={self.cp} "
                f"tp={self.tp} multiply to {fixed * max(dp_shard, 0)}, not the world size {world_size}"
            )
        if self.layers_per_virtual_stage is not None and self.layers_per_virtual_stage < 1:
            raise CookbookError(
                f"--num-layers-per-virtual-pipeline-stage {self.layers_per_virtual_stage} must be at least 1"
            )
        return ParallelDims(
            self.dp_replicate,
            dp_shard,
            self.cp,
            self.tp,
            self.pp,
            self.sequence_parallel and self.tp > 1,
            self.layers_per_virtual_stage if self.pp > 1 else None,
        )

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def build_mesh(self, device_type: str) -> DeviceMesh:
        shape = tuple(getattr(self, name) for name in MESH_DIMS)
        return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)


@dataclass
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise CookbookError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if device != "cpu":
        raise CookbookError(f"unknown device {device!r}; use auto, cpu or cuda")
    return torch.device("cpu")


def init_distributed(device: str = "auto", timeout_minutes: float = 30) -> Distributed:
    """Join (or create) the process group. Idempotent within a process."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = pick_device(device, local_rank)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=timeout_minutes)
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(
                backend,
                rank=rank,
                world_size=world_size,
                timeout=timeout,
                device_id=dev if dev.type == "cuda" else None,
            )
        else:  # a world of one, no rendezvous needed
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return Distributed(rank, world_size, local_rank, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_max(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
