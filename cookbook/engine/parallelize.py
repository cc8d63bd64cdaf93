"""Parallelism applied to a model from the outside, the torchtitan way.

``build_model`` creates the model on the ``meta`` device (no memory), applies parallelism, then
materialises only each rank's shards and initialises them. Each parameter's initial value comes
from its own generator seeded by (seed, parameter name) (``Transformer.initial_value``), so the
weights are the same under every parallel layout and world size.

The order of ``parallelize`` is fixed: float8 linears (``--fp8``) -> tensor parallel -> context
parallel (cookbook/engine/context_parallel.py) -> the attention kernel (cookbook/engine/attention.py) ->
activation checkpointing -> compile per block -> FSDP (cookbook/engine/recompute.py holds those two).
Under pipeline parallel each stage's chunk goes through the same steps (cookbook/engine/pipeline.py
cuts the model first).

Tensor parallel is Megatron-LM's, written as DTensor plans (``apply_tp``). In each block, q, k, v,
gate and up are split by output columns (each rank holds whole heads and a slice of the SwiGLU
neurons), the attention output and down projections by input rows, so a block costs one all-reduce
before each residual add. The embedding is split by vocabulary rows; the output layer by
vocabulary columns, its logits gathered so the loss stays the plain cross-entropy. With sequence
parallel the residual stream between the tensor-parallel regions, the norms and their activations
are split along the sequence instead of replicated: each all-reduce becomes a reduce-scatter after
the region and an all-gather before the next, the same bytes with a tp-th of the activation memory.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.distributed.tensor.parallel.style import ParallelStyle

from cookbook.engine.attention import apply_attention
from cookbook.engine.config import ParallelDims
from cookbook.engine.context_parallel import apply_cp
from cookbook.engine.float8 import apply_fp8
from cookbook.engine.precision import DTYPES
from cookbook.engine.recompute import apply_activation_checkpointing, apply_compile
from cookbook.errors import CookbookError
from cookbook.model import ModelConfig, Transformer


def dp_mesh(mesh: DeviceMesh, dims: ParallelDims) -> DeviceMesh:
    """FSDP's mesh: 1-D over dp_shard, or 2-D (replicate, shard) for HSDP. Under context parallel the cp ranks
    hold replicas of the parameters too: FSDP shards over dp_shard and cp flattened into one dimension
    (torchtitan's ``dp_shard_cp``), so its reduce-scatter averages the gradients over both."""
    shard = "dp_shard"
    if dims.cp > 1:
        mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        shard = "dp_shard_cp"
    return mesh["dp_replicate", shard] if dims.dp_replicate > 1 else mesh[shard]


# --------------------------------------------------------------------------- tensor + sequence parallel


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """The model shapes tensor parallel of degree ``tp`` can split: whole query and key/value heads per rank."""
    if tp <= 1:
        return
    for name, value in (
        ("num_heads (--num-attention-heads)", cfg.num_heads),
        ("num_kv_heads (--num-query-groups)", cfg.num_kv_heads),
    ):
        if value % tp:
            raise CookbookError(
                f"tensor parallel size {tp} must divide {name} = {value}; choose a tensor parallel size that divides both head counts"
            )


class ReplicateParallel(ParallelStyle):
    """A module whose parameters are replicated over the tensor-parallel ranks and whose input and output are
    the same full tensor on each (the norms without sequence parallel). Its parameters become Replicate
    DTensors, so every parameter of a tensor-parallel model lives on the same mesh (one gradient norm, one
    foreach optimizer step); the activations stay plain tensors."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def replicate(name, mod, mesh):
            for p_name, param in list(mod.named_parameters(recurse=False)):
                mod.register_parameter(
                    p_name, nn.Parameter(distribute_tensor(param, mesh, [Replicate()], src_data_rank=None))
                )

        def to_dtensor(mod, inputs, mesh):
            return tuple(
                DTensor.from_local(x, mesh, [Replicate()], run_check=False)
                if isinstance(x, torch.Tensor) and not isinstance(x, DTensor)
                else x
                for x in inputs
            )

        return distribute_module(module, device_mesh, replicate, to_dtensor, lambda mod, out, mesh: out.to_local())


def apply_tp(model: Transformer, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Megatron-LM's tensor parallel (and, with ``sequence_parallel``, its sequence parallel) on ``tp_mesh``.

    Activation layouts between modules (b batch, s sequence, h hidden, the tp-th of a dimension local):

        tokens [b, s] (every rank)  -> embedding, vocab-parallel -> x: [b, s, h] replicated | [b, s/tp, h] (SP)
        block:  norm (replicated | SP: on its sequence shard) -> all-gather (SP) -> wq wk wv colwise ->
                attention over local heads -> wo rowwise -> all-reduce | reduce-scatter (SP) -> + x
                norm -> all-gather (SP) -> gate, up colwise -> down rowwise -> all-reduce | reduce-scatter (SP) -> + h
        norm -> all-gather (SP) -> output colwise -> logits gathered: [b, s, vocab] on every rank

    Every tp rank computes the same loss from the same full logits. RoPE's cos/sin come from the full positions
    in the model's forward and meet q and k after the all-gather, so sequence parallel leaves them correct. Tied
    embeddings are supported: embedding and output layer split their one weight the same way (by vocabulary
    rows), and the tie is restored after the split. Parameters are split without communication
    (``src_data_rank=None``): on the meta device there is nothing to send, and ``init_parameters`` gives each
    shard its value afterwards.
    """
    cfg = model.config
    tp = tp_mesh.size()
    check_tp(cfg, tp)
    sp = sequence_parallel
    residual = Shard(1) if sp else Replicate()  # the layout of the residual stream between tp regions
    norm_style = SequenceParallel() if sp else ReplicateParallel()

    root = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=residual),
        "norm": norm_style,
        "output": ColwiseParallel(input_layouts=residual, output_layouts=Replicate(), use_local_output=True),
    }
    # a pipeline stage lacks the embedding (all but the first) or the final norm and output (all but the last)
    parallelize_module(
        model, tp_mesh, {k: v for k, v in root.items() if getattr(model, k) is not None}, src_data_rank=None
    )
    # The gathered logits come back from DTensor.to_local() as a view, and FSDP2 then warns once per rank that an
    # in-place op on a view output would drop its pre-backward hook (wrong gradients). Nothing writes to the logits in
    # place: the loss reads them through slices and .float() copies (cookbook/engine/loss.py), and under pipeline
    # parallel the schedule hands them to the same loss. So the warning does not apply to us; exactly it is filtered
    # (a copy of the logits to avoid it would cost batch x sequence x vocabulary of memory).
    warnings.filterwarnings(
        "ignore", message=r"FSDP2-wrapped module \(FSDPTransformer\) returned a view tensor", category=UserWarning
    )
    for block in model.layers.values():
        parallelize_module(
            block,
            tp_mesh,
            {
                "attention_norm": norm_style,
                # forward(x, cos, sin): x gathered to the full sequence; cos and sin are full already
                "attention": PrepareModuleInput(
                    input_layouts=(residual, None, None), desired_input_layouts=(Replicate(), None, None)
                ),
                "attention.wq": ColwiseParallel(),
                "attention.wk": ColwiseParallel(),
                "attention.wv": ColwiseParallel(),
                "attention.wo": RowwiseParallel(output_layouts=residual),
                "mlp_norm": norm_style,
                "mlp": PrepareModuleInput(input_layouts=(residual,), desired_input_layouts=(Replicate(),)),
                "mlp.w_gate": ColwiseParallel(),
                "mlp.w_up": ColwiseParallel(),
                "mlp.w_down": RowwiseParallel(output_layouts=residual),
            },
            src_data_rank=None,
        )
    model.tie_weights()  # each style registered its own Parameter; share the embedding's again
    if sp and model.tok_embeddings is not None:
        model.register_forward_pre_hook(_sequence_divisible(tp))
    elif sp:  # a later pipeline stage receives its sequence shard [b, s/tp, h]: RoPE needs the full positions
        model.register_forward_pre_hook(_full_positions(tp), with_kwargs=True)


def _sequence_divisible(tp: int):
    def check(module, args):
        tokens = args[0]
        if tokens.shape[1] % tp:
            raise CookbookError(
                f"sequence parallel splits each sequence over the {tp} tensor-parallel ranks, but a forward got "
                f"{tokens.shape[1]} tokens; use a --seq-length divisible by {tp} or turn off --sequence-parallel"
            )

    return check


def _full_positions(tp: int):
    def positions(module, args, kwargs):
        if kwargs.get("positions") is None:
            hidden = args[0]
            kwargs["positions"] = torch.arange(hidden.shape[1] * tp, device=hidden.device)[None]
        return args, kwargs

    return positions


# --------------------------------------------------------------------------- data parallel


def apply_fsdp(model: Transformer, mesh: DeviceMesh, param_dtype: torch.dtype) -> None:
    """ZeRO-3 with FSDP2: each block is one all-gather / reduce-scatter unit, the root holds the
    embeddings, final norm and output layer. Master weights and gradient reduction stay fp32;
    compute runs in ``param_dtype``. Over tensor-parallel DTensors it shards each rank's TP shard
    further along dim 0 (2-D FSDP + TP): parameters become DTensors on the (dp, tp) mesh."""
    policy = MixedPrecisionPolicy(
        param_dtype=None if param_dtype == torch.float32 else param_dtype, reduce_dtype=torch.float32
    )
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


@dataclass
class Speedups:
    """Memory and speed features applied per block (Megatron-LM's recompute flags; torch.compile)."""

    recompute_granularity: str = "none"  # none | selective | full
    recompute_method: str | None = None  # with full: uniform | block
    recompute_num_layers: int | None = None
    compile: bool = False
    fp8: bool = False  # torchao float8 linear layers (cookbook/engine/float8.py)
    attention: str = "sdpa"  # the attention kernel (attention.resolve_backend): sdpa, flex, flash2, flash3


def parallelize(
    model: Transformer, mesh: DeviceMesh, dims: ParallelDims, param_dtype: torch.dtype, speedups: Speedups | None = None
) -> None:
    speedups = speedups or Speedups()
    # 0. float8 linear layers, swapped in on the plain model
    if speedups.fp8:
        apply_fp8(model)
    # 1. tensor + sequence parallel: DTensor plans on mesh["tp"]
    if dims.tp > 1:
        apply_tp(model, mesh["tp"], dims.sequence_parallel)
    # 2. context parallel: attention gathers the keys and values of the whole sequence over mesh["cp"]
    if dims.cp > 1:
        apply_cp(model, mesh["cp"])
    # 3. attention: ``model(..., documents=ids)`` -> the mask every block attends with, made once per forward;
    #    the sequence a forward covers is its input's times cp (and tp for a later pipeline stage under SP)
    cp = (mesh.get_local_rank("cp"), dims.cp) if dims.cp > 1 else None
    sp_shard = dims.tp if dims.sequence_parallel and model.tok_embeddings is None else 1
    apply_attention(model, speedups.attention, cp, dims.cp * sp_shard)
    # 4. activation checkpointing per block (selective or full)
    if speedups.recompute_granularity != "none":
        apply_activation_checkpointing(
            model, speedups.recompute_granularity, speedups.recompute_method, speedups.recompute_num_layers
        )
    # 5. torch.compile per block (the FSDP hooks stay outside the compiled graphs)
    if speedups.compile:
        apply_compile(model)
    # 6. data parallel: FSDP2 over the dp dims (over the TP shards when tp > 1). A world of one keeps
    #    the plain module: FSDP would only copy (3-4% of a CPU step); the Trainer then runs bf16 under autocast.
    if mesh.size() > 1:
        apply_fsdp(model, dp_mesh(mesh, dims), param_dtype)


@torch.no_grad()
def init_parameters(model: Transformer, seed: int) -> None:
    """Every parameter to its layout-independent initial value (this rank's shard of it).

    Each rank makes the full value and keeps its shard (``src_data_rank=None``: no communication), which is
    right for FSDP's and tensor parallel's placements alike, composed on a 2-D (dp, tp) mesh included."""
    for name, param in model.named_parameters():
        full = model.initial_value(name, param.shape, param.device, seed)
        if isinstance(param, DTensor):
            full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.copy_(full)


def materialize(model: Transformer, device: torch.device, seed: int) -> None:
    """A parallelized meta-device model (or pipeline chunk) to ``device``, each rank's shards initialised."""
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives each module a new Parameter (FSDP2 keeps shared ones shared)
    init_parameters(model, seed)


def build_model(
    cfg: ModelConfig,
    mesh: DeviceMesh,
    dims: ParallelDims,
    device: torch.device,
    dtype: str,
    seed: int,
    speedups: Speedups | None = None,
) -> Transformer:
    """The whole model, parallelized over ``mesh`` (no pipeline: see ``pipeline.build_pipeline_model``)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    parallelize(model, mesh, dims, DTYPES[dtype], speedups)
    materialize(model, device, seed)
    return model
