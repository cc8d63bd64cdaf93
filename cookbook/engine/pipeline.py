"""Pipeline parallel with ``torch.distributed.pipelining``: 1F1B and interleaved 1F1B.

The ``pp`` ranks each hold a contiguous run of blocks (Megatron-LM's even split); with ``virtual`` chunks per
rank (interleaved 1F1B, Megatron-LM's ``--num-layers-per-virtual-pipeline-stage``) the model is cut into
``pp * virtual`` stages and rank r holds stages r, r + pp, r + 2 pp, ... Layer ids by stage, 4 layers:

    pp=2, virtual=1 (1F1B):        stage 0 = rank 0: [0, 1]   stage 1 = rank 1: [2, 3]
    pp=2, virtual=2 (interleaved): stage 0 = rank 0: [0]      stage 1 = rank 1: [1]
                                   stage 2 = rank 0: [2]      stage 3 = rank 1: [3]

A chunk is a ``Transformer`` that lost the layers it does not own (the ``layers`` dict keeps the global ids,
so parameter names, checkpoint keys and ``Transformer.initial_value`` are those of the whole model), the
embedding unless it is the first stage, and the final norm and output layer unless it is the last. Its
forward takes tokens on the first stage and hidden states [b, s, h] elsewhere (RoPE positions come from
``shape[1]``, the sequence length either way, unless packed documents reset them: then ``positions``, like the
``documents`` attention stays within, reach every stage as keyword arguments) and returns hidden states, or
logits on the last stage.

The loss is the single-process Trainer's: each micro batch's mean token cross-entropy (over its scored tokens
under ``--eod-mask-loss``: the masked targets travel as ``IGNORE``); the schedule
back-propagates each and divides the gradients by the number of micro batches at the end (``scale_grads=True``),
so the gradient is that of the mean over micro batches. Only the last stage sees the losses (``pipeline_step``
returns their mean there, None elsewhere); the gradient norm must include every stage (``clip_grad_norm_pp``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B
from torch.distributed.tensor import DTensor

from cookbook.engine.config import ParallelDims
from cookbook.engine.parallelize import DTYPES, Speedups, materialize, parallelize
from cookbook.errors import CookbookError
from cookbook.model import ModelConfig, Transformer

SCHEDULES = {"1F1B": Schedule1F1B, "Interleaved1F1B": ScheduleInterleaved1F1B}


def stage_layers(num_layers: int, pp: int, virtual: int = 1) -> list[list[int]]:
    """Layer ids of each of the ``pp * virtual`` stages, in pipeline order (stage s = chunk s // pp of rank s % pp)."""
    if pp < 1 or virtual < 1:
        raise CookbookError(f"pipeline size {pp} and virtual stages {virtual} must be at least 1")
    stages = pp * virtual
    if num_layers % stages:
        raise CookbookError(
            f"{num_layers} layers do not split evenly over {pp} pipeline ranks x {virtual} virtual stages = {stages} "
            f"stages; choose --num-layers divisible by {stages}"
        )
    per = num_layers // stages
    return [list(range(s * per, (s + 1) * per)) for s in range(stages)]


def virtual_stages(num_layers: int, pp: int, layers_per_virtual_stage: int | None) -> int:
    """Chunks per pipeline rank for Megatron-LM's ``--num-layers-per-virtual-pipeline-stage`` (1 when unset)."""
    if layers_per_virtual_stage is None:
        return 1
    if num_layers % (pp * layers_per_virtual_stage):
        raise CookbookError(
            f"{num_layers} layers do not split into {pp} pipeline ranks x virtual stages of {layers_per_virtual_stage} "
            f"layers; choose --num-layers-per-virtual-pipeline-stage so that {pp} x it divides {num_layers}"
        )
    return num_layers // (pp * layers_per_virtual_stage)


def stage_ids(pp_rank: int, pp: int, virtual: int = 1) -> list[int]:
    """The stage indices rank ``pp_rank`` holds, its chunks in order (the loop placement of interleaved 1F1B)."""
    return [c * pp + pp_rank for c in range(virtual)]


def split_model(model: Transformer, pp_rank: int, pp: int, virtual: int = 1) -> list[Transformer]:
    """This rank's chunks of a (meta-device) model: a pruned copy per stage it holds, global names kept."""
    cfg = model.config
    if pp > 1 and cfg.tie_embeddings:
        check_pipeline(cfg, pp, None, pp)  # raises: tied embeddings
    layers = stage_layers(cfg.num_layers, pp, virtual)
    n_stages = len(layers)
    chunks = []
    for stage in stage_ids(pp_rank, pp, virtual):
        chunk = copy.deepcopy(model)  # on meta: no memory
        keep = {str(i) for i in layers[stage]}
        for name in [k for k in chunk.layers if k not in keep]:
            del chunk.layers[name]
        if stage != 0:
            chunk.tok_embeddings = None
        if stage != n_stages - 1:
            chunk.norm = None
            chunk.output = None
        chunks.append(chunk)
    return chunks


def check_pipeline(cfg: ModelConfig, pp: int, layers_per_virtual_stage: int | None, micro_batches: int) -> int:
    """Everything about a pipeline layout checkable without devices; returns the chunks per rank.

    ``micro_batches`` is the number per iteration on one pipeline (Megatron-LM's rule: at least ``pp`` to fill
    the pipeline; a multiple of ``pp`` for the interleaved schedule)."""
    if pp == 1:
        return 1
    if cfg.tie_embeddings:
        raise CookbookError(
            "tied embeddings are not supported with pipeline parallel (the embedding and output layer "
            "live on different stages); untie them or use --pipeline-model-parallel-size 1"
        )
    virtual = virtual_stages(cfg.num_layers, pp, layers_per_virtual_stage)
    stage_layers(cfg.num_layers, pp, virtual)
    if micro_batches < pp or (virtual > 1 and micro_batches % pp):
        need = f"a multiple of {pp}" if virtual > 1 else f"at least {pp}"
        raise CookbookError(
            f"pipeline parallel over {pp} stages needs {need} micro batches per iteration, got {micro_batches} "
            "(global batch / (micro batch x data-parallel size)); raise --global-batch-size or lower --micro-batch-size"
        )
    return virtual


class PipelineModel(nn.Module):
    """This rank's chunks seen as one model under the whole model's names: ``layers`` holds the blocks of every
    chunk, ``tok_embeddings`` (first stage), ``norm`` and ``output`` (last stage) are there when this rank has
    them. The optimizer, state dicts and checkpoints use it, so a pipeline-parallel save has the keys a save of any
    other layout has and reshards by name; the schedule runs ``chunks`` themselves."""

    def __init__(self, chunks: list[Transformer], pp_mesh: DeviceMesh):
        super().__init__()
        self.config = chunks[0].config
        self.layers = nn.ModuleDict({name: block for chunk in chunks for name, block in chunk.layers.items()})
        for attr in ("tok_embeddings", "norm", "output"):
            for chunk in chunks:
                if getattr(chunk, attr) is not None:
                    setattr(self, attr, getattr(chunk, attr))
        self.chunks = chunks  # a plain list: not submodules, so no name gains a prefix
        self.pp_mesh = pp_mesh
        pp, virtual = pp_mesh.size(), len(chunks)
        ids = stage_ids(pp_mesh.get_local_rank(), pp, virtual)
        self.is_first, self.is_last = 0 in ids, pp * virtual - 1 in ids

    def forward(self, *args, **kwargs):
        raise CookbookError("a pipeline-parallel model runs through its schedule (pipeline_step), not a forward call")


def build_pipeline_model(
    cfg: ModelConfig,
    mesh: DeviceMesh,
    dims: ParallelDims,
    device: torch.device,
    dtype: str,
    seed: int,
    speedups: Speedups | None = None,
) -> PipelineModel:
    """This rank's chunks, each parallelized like a whole model (TP -> AC -> compile -> FSDP) and materialised."""
    with torch.device("meta"):
        whole = Transformer(cfg)
    virtual = virtual_stages(cfg.num_layers, dims.pp, dims.layers_per_virtual_stage)
    chunks = split_model(whole, mesh.get_local_rank("pp"), dims.pp, virtual)
    for chunk in chunks:
        parallelize(chunk, mesh, dims, DTYPES[dtype], speedups)
        materialize(chunk, device, seed)
    return PipelineModel(chunks, mesh["pp"])


def build_schedule(
    chunks: list[torch.nn.Module],
    pp_mesh: DeviceMesh,
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: str = "1F1B",
    device: torch.device | None = None,
):
    """A ``PipelineStage`` per chunk (stage ids as ``stage_ids``) and the schedule that runs them.

    Activation shapes are inferred from the first micro batch (no example inputs needed)."""
    if schedule not in SCHEDULES:
        raise CookbookError(f"unknown pipeline schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    pp, rank = pp_mesh.size(), pp_mesh.get_local_rank()
    virtual = len(chunks)
    if schedule == "1F1B" and virtual != 1:
        raise CookbookError(f"the 1F1B schedule runs one stage per rank, got {virtual}; use Interleaved1F1B")
    if n_microbatches < pp:
        raise CookbookError(f"{n_microbatches} micro batches cannot fill {pp} pipeline stages; use at least {pp}")
    device = device or torch.device("cpu")
    group = pp_mesh.get_group()
    stages = [
        PipelineStage(chunk, stage, pp * virtual, device, group=group)
        for chunk, stage in zip(chunks, stage_ids(rank, pp, virtual), strict=True)
    ]
    cls = SCHEDULES[schedule]
    if schedule == "1F1B":
        return cls(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=True)
    return cls(stages, n_microbatches, loss_fn=loss_fn, scale_grads=True)


def pipeline_step(
    schedule,
    tokens: torch.Tensor | None,
    targets: torch.Tensor | None,
    is_first: bool,
    is_last: bool,
    **inputs: torch.Tensor | None,
) -> torch.Tensor | None:
    """Forward and backward over the micro batches of one global batch on this rank's stages.

    ``tokens`` [batch, seq] are read on the rank holding the first stage, ``targets`` on the one holding the
    last (the schedule splits both into its micro batches along dim 0). ``inputs`` (``positions``, ``documents``
    [batch, seq]; None ones are left out) reach every stage's forward as keyword arguments, split alike. Returns the
    mean of the micro batches' losses on the last stage's rank, None elsewhere. Gradients accumulate into the
    chunks' ``.grad``."""
    losses: list[torch.Tensor] = []
    args = (tokens,) if is_first else ()
    schedule.step(
        *args,
        target=targets if is_last else None,
        losses=losses if is_last else None,
        return_outputs=False,
        **{k: v for k, v in inputs.items() if v is not None},
    )
    if not is_last:
        return None
    return torch.stack([loss.detach().float() for loss in losses]).mean()


@torch.no_grad()
def pipeline_eval(
    schedule,
    tokens: torch.Tensor | None,
    targets: torch.Tensor | None,
    is_first: bool,
    is_last: bool,
    **inputs: torch.Tensor | None,
) -> torch.Tensor | None:
    """Forward only (``schedule.eval``); the mean micro-batch loss on the last stage's rank, None elsewhere."""
    losses: list[torch.Tensor] = []
    args = (tokens,) if is_first else ()
    schedule.eval(
        *args,
        target=targets if is_last else None,
        losses=losses if is_last else None,
        **{k: v for k, v in inputs.items() if v is not None},
    )
    if not is_last:
        return None
    return torch.stack([loss.float() for loss in losses]).mean()


def clip_grad_norm_pp(params: Iterable[torch.Tensor], max_norm: float, pp_mesh: DeviceMesh) -> torch.Tensor:
    """The L2 norm of the whole model's gradients, every stage's included; clips if ``max_norm`` > 0.

    Each rank's norm (reduced over FSDP / TP shards by ``full_tensor``) is squared, summed over the pipeline
    ranks and rooted, so every rank forms the same clip coefficient."""
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        local = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if isinstance(local, DTensor):
            local = local.full_tensor()
        square = local.float() ** 2
    else:
        square = torch.zeros((), dtype=torch.float32, device=params[0].device if params else "cpu")
    dist.all_reduce(square, op=dist.ReduceOp.SUM, group=pp_mesh.get_group())
    norm = square.sqrt()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def broadcast_from_last_stage(value: torch.Tensor | None, pp_mesh: DeviceMesh, device: torch.device) -> torch.Tensor:
    """The last stage's scalar (the loss) on every pipeline rank, for logging and divergence checks."""
    if value is None:
        t = torch.zeros((), dtype=torch.float32, device=device)
    else:
        t = value.detach().float().reshape(()).clone()
    dist.broadcast(t, src=dist.get_global_rank(pp_mesh.get_group(), pp_mesh.size() - 1), group=pp_mesh.get_group())
    return t
