"""Next-token cross-entropy without an fp32 copy of the whole batch's logits.

A bf16 model's logits are ``[batch, seq, vocab]`` in bf16; upcasting them at once (as a plain
``cross_entropy(logits.float(), ...)`` does) doubles that, and log-softmax keeps another fp32 copy
for backward: at a 128k vocabulary and 8k tokens per micro batch that is 4 GiB each. Here the
tokens are cut into chunks; each chunk is upcast, scored and (under autograd) recomputed in
backward from the logits already in memory, so at most one chunk's fp32 values exist at a time.
The result equals the plain loss (the mean over tokens, in fp32).

Tokens whose target is ``IGNORE`` carry no loss (Megatron-LM's ``--eod-mask-loss``: the token after an
end-of-document); the mean is over the scored tokens, or over ``tokens`` when the caller knows a larger count
(context parallel: the whole sequence's count over cp ranks, each of which holds part of it).

Logit knowledge distillation (``kd_loss``: pruning's healing, ``distill train``) is chunked the same way: the
KL divergence of the student's softened distribution from the teacher's, never more than one chunk of either
in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_ELEMENTS = 1 << 25  # fp32 logits per chunk: 128 MiB
IGNORE = -100  # a target that is not scored (cross_entropy's ignore_index)


def _chunk_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum", ignore_index=IGNORE)


def _chunked_mean(
    fn, logits: torch.Tensor, others: tuple[torch.Tensor, ...], chunk_elements: int, tokens: torch.Tensor | float
) -> torch.Tensor:
    """``fn(logits_chunk, *others_chunks)`` (a sum over the chunk's tokens) summed over ``logits`` [tokens, vocab]
    and ``others`` [tokens, ...] one chunk of tokens at a time, divided by ``tokens``; under autograd each chunk is
    recomputed in backward instead of kept."""
    rows = max(1, chunk_elements // logits.shape[-1])
    if rows >= logits.shape[0]:
        return fn(logits, *others) / tokens
    total = logits.new_zeros((), dtype=torch.float32)
    for start in range(0, logits.shape[0], rows):
        chunk = (logits[start : start + rows], *(x[start : start + rows] for x in others))
        if torch.is_grad_enabled() and logits.requires_grad:
            total = total + checkpoint(fn, *chunk, use_reentrant=False)
        else:
            total = total + fn(*chunk)
    return total / tokens


def scored_tokens(targets: torch.Tensor) -> torch.Tensor:
    """How many of ``targets`` are scored (at least 1, so that a sample with none has loss 0, not NaN)."""
    return (targets != IGNORE).sum().clamp(min=1)


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    chunk_elements: int = CHUNK_ELEMENTS,
    tokens: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of ``logits [..., vocab]`` against ``targets [...]`` over the scored targets (or
    ``tokens``), in fp32."""
    targets = targets.flatten()
    return _chunked_mean(
        _chunk_loss_sum,
        logits.flatten(0, -2),
        (targets,),
        chunk_elements,
        scored_tokens(targets) if tokens is None else tokens,
    )


def _kl_sum(temperature: float):
    def kl(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_s = F.log_softmax(student.float() / temperature, dim=-1)
        log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
        per_token = (log_t.exp() * (log_t - log_s)).sum(dim=-1)
        return per_token.masked_fill(targets == IGNORE, 0.0).sum() * temperature**2

    return kl


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    chunk_elements: int = CHUNK_ELEMENTS,
    targets: torch.Tensor | None = None,
    tokens: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) of the distributions softened by ``temperature``, times
    temperature^2 (Hinton et al.: the gradients keep their scale as the temperature changes), in fp32. With
    ``targets``, over the tokens whose target is scored (as ``cross_entropy``, ``tokens`` overriding the count)."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ"
        )
    student, teacher = student_logits.flatten(0, -2), teacher_logits.detach().flatten(0, -2)
    targets = (
        torch.zeros(student.shape[0], dtype=torch.long, device=student.device) if targets is None else targets.flatten()
    )
    return _chunked_mean(
        _kl_sum(temperature),
        student,
        (teacher, targets),
        chunk_elements,
        scored_tokens(targets) if tokens is None else tokens,
    )
