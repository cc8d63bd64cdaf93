"""Attention within packed documents (Megatron-LM's three flags) and the attention backends.

Oracles: a packed sample with document masking gives, token for token, the logits and loss of each document run
alone (fp32, 1e-5); every backend gives the logits (and, where it has a backward here, the gradients) of the
SDPA reference; the query chunks of a context-parallel rank give the rows of the whole sequence's attention.

On CPU, flash-attn is not installed: its bookkeeping (documents -> cu_seqlens, the keys a context-parallel chunk
gathers) runs against ``reference_varlen``, a loop of SDPA calls with flash-attn's documented semantics (each
packed sequence causal, queries aligned to the bottom right of their keys). The real kernels are compared with
SDPA in the CUDA tests at the end, which skip without a GPU (and flash-attn).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cookbook.data.gpt_dataset import DocumentFlags, document_inputs
from cookbook.engine import attention
from cookbook.engine.attention import AttentionMask, apply_attention, query_chunks, resolve_backend
from cookbook.engine.config import TrainingConfig
from cookbook.engine.loss import cross_entropy
from cookbook.engine.trainer import next_token_inputs
from cookbook.errors import CookbookError
from cookbook.model import ModelConfig, Transformer
from cookbook.model.model import repeat_kv

EOD = 95
TINY = ModelConfig(
    vocab_size=96,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=128,
    max_seq_len=64,
    qkv_bias=True,
)
ALL = DocumentFlags(EOD, reset_position_ids=True, reset_attention_mask=True, eod_mask_loss=True)


def reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal):
    """flash-attn's ``flash_attn_varlen_func`` written with SDPA: q [total_q, heads, d], k and v
    [total_k, kv_heads, d]; sequence i is q[cu_q[i]:cu_q[i+1]] against k[cu_k[i]:cu_k[i+1]], causal with the
    queries aligned to the bottom right of the keys."""
    assert causal and cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
    assert cu_seqlens_q[-1] == q.shape[0] and cu_seqlens_k[-1] == k.shape[0]
    out = []
    for i in range(len(cu_seqlens_q) - 1):
        qi = q[cu_seqlens_q[i] : cu_seqlens_q[i + 1]].transpose(0, 1)
        ki, vi = (x[cu_seqlens_k[i] : cu_seqlens_k[i + 1]].transpose(0, 1) for x in (k, v))
        lq, lk = qi.shape[1], ki.shape[1]
        assert 0 < lq <= max_seqlen_q and lq <= lk <= max_seqlen_k
        allowed = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
        out.append(
            F.scaled_dot_product_attention(
                qi, repeat_kv(ki[None], qi.shape[0])[0], repeat_kv(vi[None], qi.shape[0])[0], attn_mask=allowed
            ).transpose(0, 1)
        )
    return torch.cat(out)


@pytest.fixture
def emulated_flash(monkeypatch):
    """flash-attn's varlen function replaced by ``reference_varlen`` (CPU): tests our side of the interface."""
    monkeypatch.setattr(attention, "flash_function", lambda version: reference_varlen)


def packed_row(lengths: list[int], generator: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Documents of the given lengths, each ending with EOD, back to back, plus one token of a next document: a
    sample of sum(lengths) + 1 tokens, and the documents."""
    docs = [torch.cat([torch.randint(0, EOD, (n - 1,), generator=generator), torch.tensor([EOD])]) for n in lengths]
    return torch.cat(docs + [torch.randint(0, EOD, (1,), generator=generator)]), docs


def model_for(backend: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(TINY)
    apply_attention(model, backend)
    return model


BACKENDS = ["sdpa", "flex", "flash2"]


def needs_grad(backend: str) -> bool:
    return backend != "flex"  # FlexAttention has no backward on CPU


# --------------------------------------------------------------------------- the flags


def test_document_inputs_restart_positions_separate_documents_and_mask_the_loss():
    tokens = torch.tensor([[7, 8, EOD, 9, EOD, EOD, 1, 2], [1, 2, 3, 4, 5, 6, 7, 8]])
    positions, documents, keep = document_inputs(tokens, ALL)
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))]
    assert documents.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0] * 8]
    assert keep.tolist() == [[True, True, False, True, False, False, True, True], [True] * 8]
    assert document_inputs(tokens, DocumentFlags(EOD)) == (None, None, None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_documents_equal_each_document_alone(backend, request):
    """Two rows packed from documents (one row without EOD at all): every token's logits are those of its document
    run alone from position 0, and the loss (EOD-masked) is the mean over the documents' own next-token losses."""
    if backend == "flash2":
        request.getfixturevalue("emulated_flash")
    g = torch.Generator().manual_seed(1)
    row0, docs0 = packed_row([5, 9, 3, 7], g)
    row1, docs1 = packed_row([24], g)
    row1[-2] = 3  # the second row is one document with no EOD inside its inputs
    batch = torch.stack([row0, row1])
    model = model_for(backend)
    plain = Transformer(TINY)
    plain.load_state_dict(model.state_dict())

    with torch.set_grad_enabled(needs_grad(backend)):
        x = next_token_inputs(batch, documents=ALL)
        logits = model(x.inputs, x.positions, documents=x.documents)
        loss = cross_entropy(logits, x.targets)
        start, ce_sum, scored = 0, 0.0, 0
        for doc in docs0:
            alone = plain(doc[None, :-1])
            torch.testing.assert_close(logits[0, start : start + len(doc) - 1], alone[0], rtol=0, atol=1e-5)
            ce_sum = ce_sum + F.cross_entropy(alone[0], doc[1:], reduction="sum")
            scored += len(doc) - 1
            start += len(doc)
        torch.testing.assert_close(logits[1], plain(row1[None, :-1])[0], rtol=0, atol=1e-5)
        ce_sum = ce_sum + F.cross_entropy(plain(row1[None, :-1])[0], row1[1:], reduction="sum")
        scored += len(row1) - 1
        torch.testing.assert_close(loss, ce_sum / scored, rtol=0, atol=1e-5)
        assert int((x.targets != -100).sum()) == scored
    if needs_grad(backend):
        loss.backward()
        assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize("backend", ["flex", "flash2"])
def test_backends_equal_sdpa_in_logits_and_gradients(backend, request):
    """Random packed rows (documents of 1 to 20 tokens, EOD as well at a row's first and last input) through each
    backend and through the SDPA reference: logits within 1e-5 (fp32), gradients too where the backend has a
    backward on CPU."""
    if backend == "flash2":
        request.getfixturevalue("emulated_flash")
    g = torch.Generator().manual_seed(2)
    batch = torch.randint(0, EOD, (3, 41), generator=g)
    batch[torch.rand(batch.shape, generator=g) < 0.12] = EOD
    batch[0, 0] = batch[1, -2] = EOD
    results = {}
    for name in ("sdpa", backend):
        model = model_for(name)
        with torch.set_grad_enabled(needs_grad(backend)):
            x = next_token_inputs(batch, documents=ALL)
            logits = model(x.inputs, x.positions, documents=x.documents)
            if needs_grad(backend):
                cross_entropy(logits, x.targets).backward()
        results[name] = logits.detach(), {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(results[backend][0], results["sdpa"][0], rtol=0, atol=1e-5)
    if needs_grad(backend):
        for name, grad in results["sdpa"][1].items():
            torch.testing.assert_close(results[backend][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cp", [2, 3])
def test_context_parallel_chunks_equal_rows_of_the_whole_sequence(backend, cp, request):
    """Each cp rank's two query chunks, against the keys of every earlier position, are the rows of attention over
    the whole sequence (documents crossing chunk boundaries; a row without documents; GQA)."""
    if backend == "flash2":
        request.getfixturevalue("emulated_flash")
    g = torch.Generator().manual_seed(cp)
    seq = 8 * cp
    tokens = torch.randint(0, EOD, (2, seq), generator=g)
    tokens[0, torch.randperm(seq, generator=g)[:3]] = EOD
    _, documents, _ = document_inputs(tokens, ALL)
    q = torch.randn(2, 4, seq, 8, generator=g, requires_grad=needs_grad(backend))
    k, v = (torch.randn(2, 2, seq, 8, generator=g, requires_grad=needs_grad(backend)) for _ in range(2))
    for docs in (documents, None):
        whole = AttentionMask("sdpa", docs, {0: seq}, 2, "cpu").attend(q, k, v)
        for rank in range(cp):
            chunks = query_chunks(seq, (rank, cp))
            mask = AttentionMask(backend, docs, chunks, 2, "cpu")
            for start, length in chunks.items():
                got = mask.attend(
                    q[:, :, start : start + length], k[:, :, : start + length], v[:, :, : start + length], start
                )
                torch.testing.assert_close(got, whole[:, :, start : start + length], rtol=0, atol=1e-5)
                if needs_grad(backend):
                    want_grads = torch.autograd.grad(
                        whole[:, :, start : start + length].sum(), (q, k, v), retain_graph=True
                    )
                    for a, b in zip(torch.autograd.grad(got.sum(), (q, k, v)), want_grads, strict=True):
                        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_query_chunks_are_the_balanced_split():
    assert query_chunks(16) == {0: 16}
    assert query_chunks(16, (0, 2)) == {0: 4, 12: 4} and query_chunks(16, (1, 2)) == {4: 4, 8: 4}


def test_a_model_without_documents_keeps_plain_causal_attention():
    """No documents: the sdpa hook passes no mask (the model's own is_causal SDPA); the other kernels make a mask
    of one document per row, which gives the same logits."""
    batch = torch.randint(0, EOD, (2, 17), generator=torch.Generator().manual_seed(3))
    plain = model_for("sdpa")
    want = Transformer(TINY)
    want.load_state_dict(plain.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(plain(batch), want(batch), rtol=0, atol=0)
        torch.testing.assert_close(model_for("flex")(batch), want(batch), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- choosing a backend


def test_auto_picks_sdpa_on_cpu_and_refuses_what_cannot_run(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for documents in (False, True):
        assert resolve_backend("auto", cpu, torch.float32, 16, documents) == "sdpa"
        assert resolve_backend("auto", cpu, torch.bfloat16, 16, documents) == "sdpa"
    assert resolve_backend("flex", cpu, torch.float32, 16, True, training=False) == "flex"
    with pytest.raises(CookbookError, match="flex cannot train on CPU: FlexAttention has no backward pass there"):
        resolve_backend("flex", cpu, torch.float32, 16, True)
    with pytest.raises(CookbookError, match="flash needs a CUDA GPU, not cpu"):
        resolve_backend("flash", cpu, torch.bfloat16, 16, True)
    with pytest.raises(CookbookError, match="unknown --attention-backend 'fast'"):
        resolve_backend("fast", cpu, torch.float32, 16, True)
    with pytest.raises(CookbookError, match="unknown --attention-backend 'fast'"):
        TrainingConfig(attention_backend="fast")

    # a GPU without flash-attn: flash is refused with the install line; auto falls back to flex (documents) or sdpa
    monkeypatch.setattr(attention, "installed_flash", lambda device: None)
    with pytest.raises(
        CookbookError, match=r"flash-attn, which is not installed \(or does not import\): pip install 'cookbook\[gpu\]'"
    ):
        resolve_backend("flash", cuda, torch.bfloat16, 128, True)
    with pytest.raises(CookbookError, match="--dtype bf16"):
        resolve_backend("flash", cuda, torch.float32, 128, True)
    assert resolve_backend("auto", cuda, torch.bfloat16, 128, True) == "flex"
    assert resolve_backend("auto", cuda, torch.bfloat16, 128, False) == "sdpa"
    # with FA2 only: flash for documents; with FA3 (Hopper): flash for every case; fp32 never flash
    monkeypatch.setattr(attention, "installed_flash", lambda device: 2)
    assert resolve_backend("auto", cuda, torch.bfloat16, 128, True) == "flash2"
    assert resolve_backend("auto", cuda, torch.bfloat16, 128, False) == "sdpa"
    assert resolve_backend("auto", cuda, torch.float32, 128, True) == "flex"
    monkeypatch.setattr(attention, "installed_flash", lambda device: 3)
    assert resolve_backend("auto", cuda, torch.bfloat16, 128, False) == "flash3"
    assert resolve_backend("flash", cuda, torch.bfloat16, 128, False) == "flash3"
    assert resolve_backend("auto", cuda, torch.bfloat16, 320, True) == "flex"  # head size beyond flash-attn's


def test_flash_attn_that_does_not_import_counts_as_missing(monkeypatch):
    """A flash-attn wheel built for another torch raises at import: refused like a missing one, not a traceback."""

    def broken(name):
        raise OSError("undefined symbol: _ZN3c10...")

    attention.flash_function.cache_clear()
    monkeypatch.setattr(attention.importlib, "import_module", broken)
    try:
        assert attention.flash_function(2) is None and attention.flash_function(3) is None
    finally:
        attention.flash_function.cache_clear()


# --------------------------------------------------------------------------- on a GPU


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def bf16_run(backend: str, batch: torch.Tensor):
    model = model_for(backend).cuda()  # the same weights for every backend (the same seed)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        x = next_token_inputs(batch, documents=ALL)
        logits = model(x.inputs, x.positions, documents=x.documents)
        cross_entropy(logits, x.targets).backward()
    return logits.float().detach(), {n: p.grad.float() for n, p in model.named_parameters()}


@cuda
@pytest.mark.parametrize("backend", ["flex", "flash"])
def test_gpu_backends_equal_sdpa_in_bf16(backend):
    if backend == "flash":
        version = attention.installed_flash(torch.device("cuda"))
        if version is None:
            pytest.skip("flash-attn is not installed")
        backend = f"flash{version}"
    g = torch.Generator().manual_seed(4)
    batch = torch.randint(0, EOD, (4, 257), generator=g)
    batch[torch.rand(batch.shape, generator=g) < 0.02] = EOD
    want_logits, want_grads = bf16_run("sdpa", batch.cuda())
    logits, grads = bf16_run(backend, batch.cuda())
    torch.testing.assert_close(logits, want_logits, rtol=2e-2, atol=2e-2)
    for name, grad in want_grads.items():
        assert F.cosine_similarity(grads[name].flatten(), grad.flatten(), dim=0) > 0.99, name
