"""Next-token cross-entropy without an fp32 copy of the whole batch's logits.

A bf16 model's logits are ``[batch, seq, vocab]`` in bf16; upcasting them at once (as a plain
``cross_entropy(logits.float(), ...)`` does) doubles that, and log-softmax keeps another fp32 copy
for backward: at a 128k vocabulary and 8k tokens per micro batch that is 4 GiB each. Here the
tokens are cut into chunks; each chunk is upcast, scored and (under autograd) recomputed in
backward from the logits already in memory, so at most one chunk's fp32 values exist at a time.
The result equals the plain loss (the mean over tokens, in fp32).

Logit knowledge distillation (``kd_loss``: pruning's healing, ``distill train``) is chunked the same way: the
KL divergence of the student's softened distribution from the teacher's, never more than one chunk of either
in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 1 << 25  # fp32 logits per chunk: 128 MiB


def _chunk_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def _chunked_mean(fn, logits: torch.Tensor, other: torch.Tensor, chunk_elements: int) -> torch.Tensor:
    """The mean over tokens of ``fn(logits_chunk, other_chunk)`` (a sum over the chunk's tokens) for ``logits``
    [tokens, vocab] and ``other`` [tokens, ...], one chunk of tokens at a time; under autograd each chunk is
    recomputed in backward instead of kept."""
    tokens = logits.shape[0]
    rows = max(1, chunk_elements // logits.shape[-1])
    if rows >= tokens:
        return fn(logits, other) / tokens
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, tokens, rows):
        a, b = logits[start : start + rows], other[start : start + rows]
        if torch.is_grad_enabled() and logits.requires_grad:
            total = total + checkpoint(fn, a, b, use_reentrant=False)
        else:
            total = total + fn(a, b)
    return total / tokens


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Mean cross-entropy of ``logits [..., vocab]`` against ``targets [...]``, in fp32."""
    return _chunked_mean(_chunk_loss_sum, logits.flatten(0, -2), targets.flatten(), chunk_elements)


def _kl_sum(temperature: float):
    def kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        log_s = F.log_softmax(student.float() / temperature, dim=-1)
        log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
        return (log_t.exp() * (log_t - log_s)).sum() * temperature**2
    return kl


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of the distributions softened by ``temperature``, times
    temperature^2 (Hinton et al.: the gradients keep their scale as the temperature changes), in fp32."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ")
    return _chunked_mean(_kl_sum(temperature), student_logits.flatten(0, -2), teacher_logits.detach().flatten(0, -2),
                         chunk_elements)
