"""Next-token cross-entropy without an fp32 copy of the whole batch's logits.

A bf16 model's logits are ``[batch, seq, vocab]`` in bf16; upcasting them at once (as a plain
``cross_entropy(logits.float(), ...)`` does) doubles that, and log-softmax keeps another fp32 copy
for backward: at a 128k vocabulary and 8k tokens per micro batch that is 4 GiB each. Here the
tokens are cut into chunks; each chunk is upcast, scored and (under autograd) recomputed in
backward from the logits already in memory, so at most one chunk's fp32 values exist at a time.
The result equals the plain loss (the mean over tokens, in fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 1 << 25  # fp32 logits per chunk: 128 MiB


def _chunk_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Mean cross-entropy of ``logits [..., vocab]`` against ``targets [...]``, in fp32."""
    logits, targets = logits.flatten(0, -2), targets.flatten()
    rows = max(1, chunk_elements // logits.shape[-1])
    if rows >= logits.shape[0]:
        return _chunk_loss_sum(logits, targets) / targets.numel()
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, logits.shape[0], rows):
        chunk, chunk_targets = logits[start : start + rows], targets[start : start + rows]
        if torch.is_grad_enabled() and logits.requires_grad:
            total = total + checkpoint(_chunk_loss_sum, chunk, chunk_targets, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(chunk, chunk_targets)
    return total / targets.numel()
