"""Activation recompute and per-block compile, applied to a model from the outside.

Megatron-LM's flags, the same meaning here, one ``Block`` as the unit:

    --recompute-granularity selective   every block keeps the outputs of its matmuls and of attention and
                                        recomputes the rest (norms, RoPE, the GQA expand of k/v, SiLU and
                                        the gate product): almost no extra FLOPs, roughly half the
                                        activation memory. Megatron recomputes only "core attention"; with
                                        SDPA the attention matrix is never stored, so here the cheap,
                                        memory-hungry element-wise work plays that part (torchtitan's
                                        op-level selective checkpointing, without its "every second mm").
    --recompute-granularity full        whole blocks are recomputed in backward: only a block's input is kept
      --recompute-method block          ... the first N blocks (N = --recompute-num-layers), the rest none
      --recompute-method uniform        ... every block. Megatron checkpoints chunks of N consecutive layers,
                                        keeping one input per chunk; here each block is its own chunk
                                        whatever N is (N only has to be valid): the same recompute FLOPs,
                                        num_layers - num_layers / N more hidden states kept, and a smaller
                                        transient peak during recompute (one block's activations, not N's).

``full`` alone means ``uniform`` with N = 1, as torchtitan's "full"; ``block`` needs N. Under
pipeline parallelism ``model.layers`` holds only the stage's blocks, so ``block`` applies to the
first N blocks of each stage, as in Megatron.

A recomputed block stays where it is and keeps its names: its class is swapped for a subclass whose
forward runs under non-reentrant ``torch.utils.checkpoint`` (as ``fully_shard`` swaps classes), so
``named_parameters`` (which seed the initial weights), ``state_dict`` keys (checkpoints, HF and
Megatron conversion) and optimizer names are the same with and without recompute. A wrapper module
(``checkpoint_wrapper``) would keep state-dict keys only, adding ``_checkpoint_wrapped_module.`` to
parameter names. ``apply_compile`` uses ``nn.Module.compile`` (in place), not ``torch.compile(module)``,
whose wrapper adds ``_orig_mod.`` to every name. Order in ``parallelize``: tensor parallel ->
activation checkpointing -> compile -> FSDP.
"""

from __future__ import annotations

import os
import shutil

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from cookbook.errors import CookbookError

RECOMPUTE_GRANULARITY = ("none", "selective", "full")
RECOMPUTE_METHOD = ("uniform", "block")


def _aten_ops(*names: str) -> frozenset:
    """The default overloads of the aten ops that exist in this torch (SDPA backends vary by version)."""
    ops = (getattr(torch.ops.aten, name, None) for name in names)
    return frozenset(op.default for op in ops if op is not None)


# Ops whose outputs selective recompute keeps: matmuls (Linear is mm, or addmm with a bias) and attention
# on every SDPA backend, CPU's included, FlexAttention and flash-attn. Everything else in a block is recomputed in backward.
SAVED_OPS = _aten_ops(
    "mm",
    "addmm",
    "bmm",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_fused_attention_overrideable",
)
# the other attention kernels (cookbook/engine/attention.py), by name: flash-attn registers its ops when imported
SAVED_KERNELS = frozenset(
    {"flex_attention", "flash_attn::_flash_attn_varlen_forward", "flash_attn_3::_flash_attn_forward"}
)


def check_recompute(granularity: str, method: str | None, num_layers: int | None, model_layers: int) -> None:
    """Raise CookbookError unless the flags name a recompute ``model_layers`` blocks can have."""
    if granularity not in RECOMPUTE_GRANULARITY:
        raise CookbookError(
            f"unknown recompute granularity {granularity!r}; choose one of {', '.join(RECOMPUTE_GRANULARITY)}"
        )
    if method is not None and method not in RECOMPUTE_METHOD:
        raise CookbookError(f"unknown recompute method {method!r}; choose one of {', '.join(RECOMPUTE_METHOD)}")
    if granularity != "full":
        if method is not None or num_layers is not None:
            raise CookbookError(
                f"--recompute-method and --recompute-num-layers apply only to --recompute-granularity full, not {granularity}; drop them"
            )
        return
    if method == "block" and num_layers is None:
        raise CookbookError(
            "--recompute-method block needs --recompute-num-layers: how many of the first blocks to recompute"
        )
    if num_layers is not None and not 1 <= num_layers <= model_layers:
        raise CookbookError(
            f"--recompute-num-layers {num_layers} must be between 1 and the model's {model_layers} layers"
        )


def _selective_policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    # decides on the op alone, so forward and recompute agree on every torch version (older ones ask the
    # policy again during recompute, newer ones only in forward)
    saved = func in SAVED_OPS or getattr(func, "name", lambda: None)() in SAVED_KERNELS
    return CheckpointPolicy.MUST_SAVE if saved else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_selective_policy)


def recomputed_blocks(names: list[str], granularity: str, method: str | None, num_layers: int | None) -> list[str]:
    """The names of the blocks that ``apply_activation_checkpointing`` recomputes, in order."""
    if granularity == "none":
        return []
    if granularity == "full" and method == "block":
        return names[:num_layers]
    return list(names)


class Recomputed:
    """Marks a module whose forward runs under ``torch.utils.checkpoint`` (see ``_recomputed_class``)."""

    recompute_granularity: str


_CLASSES: dict[tuple[type, str], type] = {}


def _recomputed_class(cls: type, granularity: str) -> type:
    """A subclass of ``cls`` whose forward is ``cls.forward`` under (selective) checkpoint, made once per class.

    Swapping a block's class, as ``fully_shard`` does, rather than wrapping it in a module keeps every name
    the same: ``named_parameters`` (whose names seed ``initial_value``), ``state_dict`` and the optimizer's."""
    key = (cls, granularity)
    if key not in _CLASSES:
        extra = {"context_fn": _selective_context} if granularity == "selective" else {}

        def forward(self, *args, **kwargs):
            # non-reentrant: keyword arguments, FSDP2 and torch.compile work; no dropout in the model, so no RNG
            # state to save and replay
            return checkpoint(
                super(new, self).forward, *args, use_reentrant=False, preserve_rng_state=False, **extra, **kwargs
            )

        prefix = "SelectiveRecompute" if granularity == "selective" else "Recompute"
        new = type(
            f"{prefix}{cls.__name__}", (Recomputed, cls), {"forward": forward, "recompute_granularity": granularity}
        )
        _CLASSES[key] = new
    return _CLASSES[key]


def apply_activation_checkpointing(
    model: nn.Module, granularity: str, method: str | None = None, num_layers: int | None = None
) -> None:
    """Make ``model.layers``' blocks recompute in backward, in place, for Megatron's recompute flags (see the
    module docstring). Apply before compile and ``fully_shard``; no parameter or state-dict name changes."""
    layers = model.layers
    check_recompute(granularity, method, num_layers, len(layers))
    for name in recomputed_blocks(list(layers.keys()), granularity, method, num_layers):
        block = layers[name]
        if isinstance(block, Recomputed):
            raise CookbookError(
                f"block {name} already recomputes ({block.recompute_granularity}); apply activation checkpointing once"
            )
        block.__class__ = _recomputed_class(type(block), granularity)


def apply_compile(model: nn.Module, fullgraph: bool = True) -> None:
    """``torch.compile`` each block in place (after activation checkpointing, before FSDP); the embedding,
    final norm, output layer and loss stay eager. Blocks of one shape share one compiled graph. Compiling
    happens at the first forward; this only checks that a compiler for inductor's kernels is there."""
    _check_compiler(model)
    for block in model.layers.values():
        block.compile(fullgraph=fullgraph)


def _check_compiler(model: nn.Module) -> None:
    """Inductor builds C++ kernels for CPU, and Triton builds its launchers with a C compiler on GPU."""
    param = next(model.parameters(), None)
    device = param.device.type if param is not None else "cpu"
    on_cpu = device == "cpu" or (device == "meta" and not torch.accelerator.is_available())  # meta: not placed yet
    if on_cpu:
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler  # what inductor will call: $CXX or g++

            found = shutil.which(get_cpp_compiler()) is not None
        except Exception:  # it raises when no compiler is found
            found = False
        need = "a C++ compiler (g++)"
    else:
        found = any(shutil.which(cc) for cc in (os.environ.get("CC", "gcc"), "cc", "clang"))
        need = "a C compiler (gcc)"
    if not found:
        raise CookbookError(f"torch.compile needs {need} and none was found; install one or train without --compile")
