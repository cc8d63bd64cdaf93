"""Process group, device and the one DeviceMesh every parallel piece takes its sub-mesh from.

Launched by torchrun, a process reads RANK / WORLD_SIZE / LOCAL_RANK from the environment; started
directly (``cookbook pretrain ...``), it is a world of one, with an in-process store. Either way a
process group exists, so the same code path (FSDP2, DCP, collectives) runs on a laptop and on many
nodes: gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cookbook.errors import CookbookError


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
