"""Context parallel: one sequence split over ``cp`` ranks, applied to a model from the outside.

Every cp rank holds ``S / cp`` of a sequence's tokens (activations, logits and loss shrink by cp) and a
full copy of the parameters (FSDP shards them over data parallel x cp, see below). Everything in a
block is per token except attention, so only attention talks: it all-gathers the keys and values of the
whole sequence over the cp ranks ("all-gather CP", the Llama 3 paper's choice over ring attention: the
key/value heads of GQA are few, so the gathered K and V are small next to Q and the attention output).

Load balance (Megatron-LM, Llama 3). Causal attention costs more late in a sequence than early: cut it
into 2 * cp chunks and give rank r chunks r and 2 * cp - 1 - r, so every rank holds one early and one
late chunk. For cp = 2, S = 16 (chunks of 4 tokens)::

    positions   0  1  2  3 | 4  5  6  7 | 8  9 10 11 | 12 13 14 15
    chunk            0     |     1      |     2      |      3
    rank             0     |     1      |     1      |      0       rank 0: chunks 0, 3   rank 1: chunks 1, 2

A rank's queries of chunk j see the keys of chunks 0..j: a [c, (j + 1) c] block whose last c columns are
causal (c = S / (2 cp)); rank r does (r + 1) + (2 cp - r) = 2 cp + 1 such key chunks, the same on every
rank. In a block, per rank (b batch, s = S / cp local tokens, kv key/value heads, d head size):

    x [b, s, h] -> q, k, v; RoPE at the tokens' global positions
    k, v [b, kv, s, d] -> all-gather over cp (one collective for both) -> back to global order [b, kv, S, d]
    attention per local chunk j against keys 0 .. (j + 1) c, masked causally by global position
    -> wo; the all-gather's backward is a reduce-scatter of the gradients of K and V

Packed documents (``--reset-attention-mask``) survive the split: every cp rank holds the whole batch before it
shards it, so the document ids of the whole sequence are known on each rank without communication; each chunk's
mask compares its queries' documents with its keys' by global position (``attention.AttentionMask``, whose
kernel, SDPA, FlexAttention or flash-attn varlen, runs each chunk). Positions reset per document are sharded
like the tokens.

Under tensor parallel q, k, v are local tensors of the rank's heads, so the all-gather moves only those
heads and only over the cp group; tensor and sequence parallel compose unchanged.

Exactness and speed. Masking by global position gives the single-process causal attention to fp32
rounding (the keys in global order, as one process sums them). With SDPA the price is on GPU: its flash
kernel takes no mask (only ``is_causal``, a square triangle), so the boolean mask sends SDPA to the
memory-efficient kernel (math on CPU), slower than flash, and the mask itself is materialised, [c, (j + 1) c]
booleans per chunk shared by the batch and heads: 128 MiB at 32k tokens over cp = 4, 1 GiB at 128k over
cp = 8. flash-attn's varlen kernel (``--attention-backend flash``) takes the chunk as it is (queries aligned
to the bottom right of their keys) and FlexAttention a block mask, neither materialised. Ring attention
(``torch.distributed.tensor.experimental.context_parallel``) keeps flash by merging per-block log-sum-exps;
the all-gather here trades that for one simple collective that gloo runs too.

Loss and gradients. Each cp rank scores its own tokens: inputs ``batch[:, :-1]`` and targets
``batch[:, 1:]``, both sharded the same way, RoPE positions from ``shard_positions`` (``shard_batch``
does all three). Every rank holds the same number of tokens, so the mean of the cp ranks' mean losses
is the sequence's mean loss; with ``--eod-mask-loss`` the ranks score different numbers of tokens, so each
divides its sum by the whole sequence's count over cp (Megatron-LM's loss x cp), known on every rank. Parameters are replicated over cp, so their gradients must be averaged
over cp as over data parallel: FSDP2 shards over the flattened (dp_shard, cp) mesh (torchtitan's
``dp_shard_cp``, ``parallelize.dp_mesh``), whose reduce-scatter averages over both.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from cookbook.engine.attention import AttentionMask, query_chunks
from cookbook.errors import CookbookError

# torch 2.13 renames the tensor collectives (the old names warn); torch 2.11 has only the old ones
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

# --------------------------------------------------------------------------- sequence sharding


def check_cp(seq_length: int, cp: int) -> None:
    """The sequence lengths context parallel of degree ``cp`` can split: 2 * cp equal chunks."""
    if cp < 1:
        raise CookbookError(f"context parallel size {cp} must be at least 1")
    if seq_length % (2 * cp):
        raise CookbookError(
            f"context parallel size {cp} cuts each sequence into {2 * cp} equal chunks, but the sequence has "
            f"{seq_length} tokens; use a --seq-length divisible by {2 * cp}"
        )


def chunk_ids(cp_rank: int, cp: int) -> tuple[int, int]:
    """The two chunks (of 2 * cp) that rank ``cp_rank`` holds: one early, one late."""
    return cp_rank, 2 * cp - 1 - cp_rank


def shard_sequence(x: torch.Tensor, cp_rank: int, cp: int, dim: int = 1) -> torch.Tensor:
    """Rank ``cp_rank``'s tokens of ``x``: its two chunks of dimension ``dim``, concatenated."""
    check_cp(x.shape[dim], cp)
    chunks = x.chunk(2 * cp, dim=dim)
    first, second = chunk_ids(cp_rank, cp)
    return torch.cat([chunks[first], chunks[second]], dim=dim)


def unshard_sequence(shards: Sequence[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """The inverse of ``shard_sequence``: every cp rank's shard (in rank order) back to the global order."""
    halves = [shard.chunk(2, dim=dim) for shard in shards]
    return torch.cat([first for first, _ in halves] + [second for _, second in reversed(halves)], dim=dim)


def shard_positions(seq_length: int, cp_rank: int, cp: int, device=None) -> torch.Tensor:
    """The global positions [1, seq_length / cp] of rank ``cp_rank``'s tokens (for RoPE)."""
    return shard_sequence(torch.arange(seq_length, device=device)[None], cp_rank, cp)


def shard_batch(batch: torch.Tensor, cp_rank: int, cp: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, positions) of rank ``cp_rank`` for next-token training on ``batch`` [b, S + 1]:
    ``batch[:, :-1]`` and ``batch[:, 1:]`` sharded alike, and the inputs' global positions."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    positions = shard_positions(inputs.shape[1], cp_rank, cp, inputs.device)
    return shard_sequence(inputs, cp_rank, cp), shard_sequence(targets, cp_rank, cp), positions


# --------------------------------------------------------------------------- attention over a split sequence


class _AllGather(torch.autograd.Function):
    """All-gather along a new leading dimension [cp, ...]; backward reduce-scatters (sums) the gradient
    back to each rank's part. Plain c10d tensor collectives: gloo (CPU) and NCCL both have them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        # flat buffers: gloo takes the output only in its concatenated form [cp * n], not stacked [cp, ...]
        out = x.new_empty(dist.get_world_size(group) * x.numel())
        _all_gather(out, x.contiguous().view(-1), group=group)
        return out.view(-1, *x.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty(grad.shape[1:])
        _reduce_scatter(out.view(-1), grad.contiguous().view(-1), group=ctx.group)
        return out, None


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """Every cp rank's shard of ``x`` (split along ``dim`` as ``shard_sequence`` does), in global order;
    differentiable (each rank gets the gradient of its own shard, summed over the ranks)."""
    return unshard_sequence(_AllGather.apply(x, group).unbind(0), dim=dim)


def causal_attention_cp(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp_rank: int, cp: int, mask: AttentionMask | None = None
) -> torch.Tensor:
    """Causal attention of rank ``cp_rank``'s queries q [b, heads, S / cp, d] (its two chunks) over the whole
    sequence's keys and values k, v [b, kv_heads, S, d] in global order: each chunk j attends to keys 0 .. (j + 1) c,
    the last c of them causally (a query at global position p sees the keys at positions <= p), and with a ``mask``
    only those of its own document, run by the mask's kernel (default: SDPA, masked by global position)."""
    c = q.shape[2] // 2
    if mask is None:
        mask = AttentionMask("sdpa", None, query_chunks(k.shape[2], (cp_rank, cp)), q.shape[0], q.device)
    out = []
    for j, q_chunk in zip(chunk_ids(cp_rank, cp), q.split(c, dim=2)):
        seen = (j + 1) * c
        out.append(mask.attend(q_chunk, k[:, :, :seen], v[:, :, :seen], start=j * c))
    return torch.cat(out, dim=2)


class ContextParallel:
    """Marks an attention module whose forward runs over a sequence split across ``cp_group``."""

    cp_group: dist.ProcessGroup
    cp_rank: int
    cp_size: int


_CLASSES: dict[type, type] = {}


def _context_parallel_class(cls: type) -> type:
    """A subclass of the model's ``Attention`` whose ``attend`` gathers keys and values over cp (made once per
    class): K and V are all-gathered before the GQA repeat, and attention is ``causal_attention_cp``. The class
    swap keeps every parameter and state-dict name."""
    if cls not in _CLASSES:

        def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache=None, mask=None) -> torch.Tensor:
            # q [b, heads, s, d], k and v [b, kv_heads, s, d]: this rank's tokens, RoPE'd at their global positions
            if cache is not None:
                raise CookbookError(
                    "generation with a KV cache does not run under context parallel; generate with a context parallel size of 1"
                )
            # the kv heads travel, not their grouped-query copies (the kernel repeats them, or reads them in place)
            k, v = gather_sequence(torch.stack([k, v]), self.cp_group, dim=3).unbind(0)  # [b, kv_heads, S, d]
            return causal_attention_cp(q, k, v, self.cp_rank, self.cp_size, mask)

        _CLASSES[cls] = type(f"ContextParallel{cls.__name__}", (ContextParallel, cls), {"attend": attend})
    return _CLASSES[cls]


def apply_cp(model: nn.Module, cp_mesh: DeviceMesh) -> None:
    """Make every block's attention context-parallel over ``cp_mesh`` (1-D), in place. Apply after tensor
    parallel and before activation checkpointing, compile and FSDP; no parameter or state-dict name changes.
    The model's forward must then get each rank's tokens and their global ``positions`` (``shard_batch``)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and cfg.rope_type == "dynamic":
        raise CookbookError(
            "dynamic NTK RoPE scaling depends on the longest position in a forward, which differs between context "
            "parallel ranks; use linear, yarn or llama3 RoPE scaling, or a context parallel size of 1"
        )
    group, rank, size = cp_mesh.get_group(), cp_mesh.get_local_rank(), cp_mesh.size()
    for name, block in model.layers.items():
        attention = block.attention
        if isinstance(attention, ContextParallel):
            raise CookbookError(f"block {name}'s attention is already context parallel; apply context parallel once")
        attention.__class__ = _context_parallel_class(type(attention))
        attention.cp_group, attention.cp_rank, attention.cp_size = group, rank, size
