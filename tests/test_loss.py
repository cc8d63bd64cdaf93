"""Chunked cross-entropy: the plain loss and gradients, with fp32 logits never held for the whole batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cookbook.engine.loss import cross_entropy


def saved_bytes(fn, exclude: torch.Tensor):
    """Bytes of distinct storages autograd saves for backward while ``fn`` runs, other than ``exclude``'s."""
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() != exclude.untyped_storage().data_ptr():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_equals_plain(dtype):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 50, 97, generator=g) * 3).to(dtype)
    targets = torch.randint(0, 97, (3, 50), generator=g)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    plain = F.cross_entropy(a.float().flatten(0, 1), targets.flatten())
    chunked = cross_entropy(b, targets, chunk_elements=97 * 16)  # 10 chunks, the last one short
    assert chunked.dtype == torch.float32
    assert abs(plain.item() - chunked.item()) < 1e-6
    plain.backward()
    chunked.backward()
    torch.testing.assert_close(a.grad.float(), b.grad.float(), atol=1e-7 if dtype == torch.float32 else 1e-3, rtol=0)
    with torch.no_grad():
        assert abs(cross_entropy(logits, targets, chunk_elements=97 * 16).item() - plain.item()) < 1e-6


def test_no_fp32_copy_of_all_logits_is_kept():
    logits = torch.randn(4, 256, 1000).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 1000, (4, 256))
    _, plain = saved_bytes(lambda: F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()), logits)
    _, chunked = saved_bytes(lambda: cross_entropy(logits, targets, chunk_elements=64 * 1000), logits)
    fp32_logits = logits.numel() * 4
    assert plain >= fp32_logits  # log-softmax keeps an fp32 copy of every logit
    assert chunked < fp32_logits / 100, (chunked, fp32_logits)  # only the targets and the logits themselves


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_loss_is_the_tokens_mean_kl_and_chunks_change_nothing(temperature):
    from cookbook.engine.loss import kd_loss

    g = torch.Generator().manual_seed(1)
    student = (torch.randn(2, 30, 53, generator=g) * 2).requires_grad_()
    teacher = torch.randn(2, 30, 53, generator=g) * 2
    # torch's KL with log-target: sum over the vocabulary of p_t (log p_t - log p_s), averaged over tokens
    want = (
        F.kl_div(
            F.log_softmax(student / temperature, -1).flatten(0, 1),
            F.log_softmax(teacher / temperature, -1).flatten(0, 1),
            reduction="batchmean",
            log_target=True,
        )
        * temperature**2
    )
    got = kd_loss(student, teacher, temperature, chunk_elements=53 * 7)  # 9 chunks, the last one short
    assert abs(want.item() - got.item()) < 1e-5
    (a,) = torch.autograd.grad(want, student)
    (b,) = torch.autograd.grad(got, student)
    torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-5)
    assert kd_loss(teacher, teacher, temperature).abs().item() < 1e-6  # a student equal to its teacher: no loss


def test_kd_loss_against_hand_computed_values():
    """Two tokens of a two-word vocabulary. Teacher logits (0, ln 3) are probabilities (1/4, 3/4); the student's
    (0, 0) are (1/2, 1/2). KL(teacher || student) = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.1308... At temperature 2 the
    teacher's (0, ln 3 / 2) become (1, sqrt 3) / (1 + sqrt 3), and the KL is multiplied by 2^2."""
    import math

    from cookbook.engine.loss import kd_loss

    teacher = torch.tensor([[0.0, math.log(3)], [0.0, math.log(3)]])
    student = torch.zeros(2, 2)
    want_t1 = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert abs(want_t1 - 0.130812) < 1e-6
    assert abs(kd_loss(student, teacher, 1.0).item() - want_t1) < 1e-6
    p = [1 / (1 + math.sqrt(3)), math.sqrt(3) / (1 + math.sqrt(3))]
    want_t2 = 4 * sum(pi * math.log(pi / 0.5) for pi in p)
    assert abs(kd_loss(student, teacher, 2.0).item() - want_t2) < 1e-6
    # the distillation objective (1 - r) CE + r KL at r = 0.5, target word 1: CE of a uniform student is ln 2
    ce = cross_entropy(student, torch.tensor([1, 1]))
    assert abs((0.5 * ce + 0.5 * kd_loss(student, teacher, 1.0)).item() - (0.5 * math.log(2) + 0.5 * want_t1)) < 1e-6


def test_ignored_targets_carry_no_loss_and_the_mean_is_over_the_scored():
    """--eod-mask-loss: targets set to IGNORE drop out of cross-entropy and KD alike (chunked or not); ``tokens``
    divides by another count (a context-parallel rank's share of the whole sequence's); none scored gives 0."""
    from cookbook.engine.loss import IGNORE, kd_loss

    g = torch.Generator().manual_seed(3)
    logits, teacher = torch.randn(2, 30, 41, generator=g), torch.randn(2, 30, 41, generator=g)
    targets = torch.randint(0, 41, (2, 30), generator=g)
    keep = torch.rand(2, 30, generator=g) > 0.3
    masked = targets.masked_fill(~keep, IGNORE)
    want = F.cross_entropy(logits[keep], targets[keep])
    for chunk in (41 * 7, 1 << 25):
        torch.testing.assert_close(cross_entropy(logits, masked, chunk_elements=chunk), want, rtol=0, atol=1e-6)
        want_kd = kd_loss(logits[keep][None], teacher[keep][None], 2.0)
        torch.testing.assert_close(
            kd_loss(logits, teacher, 2.0, chunk_elements=chunk, targets=masked), want_kd, rtol=0, atol=1e-6
        )
    n = int(keep.sum())
    torch.testing.assert_close(cross_entropy(logits, masked, tokens=2 * n), want / 2, rtol=0, atol=1e-6)
    assert cross_entropy(logits, torch.full_like(targets, IGNORE)).item() == 0.0
