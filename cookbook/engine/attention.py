"""Attention within documents, behind one seam, run by one of three kernels (``--attention-backend``).

A training sample packs several documents end to end. With Megatron-LM's ``--reset-attention-mask`` a token
attends only to the earlier tokens of its own document (Llama 3 trained so); without it, to every earlier token
of its row. The model asks for exactly that through ``Attention.attend(q, k, v, mask=...)``; this module makes
the ``AttentionMask`` once per forward (a forward pre-hook turns the ``documents`` argument into it) and runs it
with the chosen kernel:

    sdpa    torch's scaled_dot_product_attention. Without documents: ``is_causal`` (its flash kernel on GPU).
            With documents: an explicit boolean mask [b, s, s] (the memory-efficient kernel on GPU, math on CPU):
            correct everywhere, the reference the others are tested against, but O(s^2) memory per row.
    flex    FlexAttention with a block mask built from the document ids: only the blocks a document touches
            are computed, nothing s x s is materialised. Compiled on GPU; on CPU torch runs it forward only
            (no backward: it serves eval there, not training).
    flash   flash-attn's varlen kernel (FA3 from ``flash_attn_interface`` on Hopper, else FA2 from ``flash_attn``):
            the documents become ``cu_seqlens`` and each is attended as its own causal sequence. GPU, bf16/fp16.
    auto    CPU: sdpa. GPU: flash (FA3) whenever installed; else with documents flash (FA2), then flex; else sdpa.

Documents are given as ids [b, S] over the whole sequence (the count of EODs before each token:
``cookbook.data.gpt_dataset.document_inputs``). Under context parallel a rank's queries are two chunks of the sequence against the keys of every
earlier position; ``attend(q, k, v, start)`` takes queries at global positions [start, start + q_len) and keys at
[0, start + q_len), so the same mask serves one process (start 0) and each cp chunk.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cookbook.engine.config import BACKENDS
from cookbook.errors import CookbookError
from cookbook.model.model import repeat_kv

FLASH_MODULES = {3: "flash_attn_interface", 2: "flash_attn"}  # FA3 (Hopper builds), FA2
LOW_PRECISION = (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- choosing a backend


@functools.cache
def flash_function(version: int):
    """flash-attn's ``flash_attn_varlen_func`` of that major version, or None when it is not installed or does not
    import (a wheel built for another torch fails at import)."""
    try:
        return importlib.import_module(FLASH_MODULES[version]).flash_attn_varlen_func
    except Exception:  # ImportError, or an undefined symbol from a mismatched build
        return None


def installed_flash(device: torch.device) -> int | None:
    """The flash-attn version to use on ``device``: 3 on Hopper (compute capability 9.x) when installed, else 2."""
    if device.type != "cuda":
        return None
    if torch.cuda.get_device_capability(device)[0] == 9 and flash_function(3) is not None:
        return 3
    return 2 if flash_function(2) is not None else None


def resolve_backend(
    name: str, device: torch.device, dtype: torch.dtype, head_dim: int, documents: bool, training: bool = True
) -> str:
    """The kernel ``--attention-backend name`` runs on: ``sdpa``, ``flex``, ``flash2`` or ``flash3``. ``dtype`` is the
    compute dtype, ``documents`` whether attention stays within documents (``--reset-attention-mask``). Refuses, with
    one line, a backend that cannot run the case."""
    if name not in BACKENDS:
        raise CookbookError(f"unknown --attention-backend {name!r}; choose one of {', '.join(BACKENDS)}")
    flash_fits = device.type == "cuda" and dtype in LOW_PRECISION and head_dim <= 256 and head_dim % 8 == 0
    if name == "auto":
        version = installed_flash(device) if flash_fits else None
        if version == 3 or (version and documents):
            return f"flash{version}"
        if device.type == "cuda" and documents:
            return "flex"
        return "sdpa"
    if name == "flex" and device.type == "cpu" and training:
        raise CookbookError(
            f"--attention-backend flex cannot train on CPU: FlexAttention has no backward pass there "
            f"(torch {torch.__version__}); use --attention-backend sdpa or auto on CPU"
        )
    if name != "flash":
        return name
    if device.type != "cuda":
        raise CookbookError(f"--attention-backend flash needs a CUDA GPU, not {device.type}; use sdpa or auto")
    if dtype not in LOW_PRECISION:
        raise CookbookError(
            "--attention-backend flash computes in bf16 or fp16; train with --dtype bf16, or use flex or sdpa"
        )
    if not (head_dim <= 256 and head_dim % 8 == 0):
        raise CookbookError(
            f"--attention-backend flash takes head sizes that are multiples of 8 up to 256, not {head_dim}"
        )
    version = installed_flash(device)
    if version is None:
        raise CookbookError(
            "--attention-backend flash needs flash-attn, which is not installed (or does not import): "
            "pip install 'cookbook[gpu]'"
        )
    return f"flash{version}"


# --------------------------------------------------------------------------- the mask and its kernels


def visible(documents: torch.Tensor | None, start: int, q_len: int, device) -> torch.Tensor:
    """[b or 1, q_len, start + q_len] booleans: may the query at global position start + i see the key at j
    (j <= start + i, in the same document)."""
    q_pos = torch.arange(start, start + q_len, device=device)
    k_pos = torch.arange(start + q_len, device=device)
    allowed = (k_pos[None, :] <= q_pos[:, None])[None]
    if documents is not None:
        allowed = allowed & (documents[:, start : start + q_len, None] == documents[:, None, : start + q_len])
    return allowed


def _sdpa(q, k, v, prepared):
    if prepared is None:  # one causal sequence per row
        return F.scaled_dot_product_attention(q, repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1]), is_causal=True)
    return F.scaled_dot_product_attention(
        q, repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1]), attn_mask=prepared.unsqueeze(1)
    )


@functools.cache
def _flex_kernel(device_type: str):
    from torch.nn.attention.flex_attention import flex_attention

    # on GPU the compiled kernel (fused, block-sparse); on CPU the eager one (forward only)
    return torch.compile(flex_attention, dynamic=False) if device_type == "cuda" else flex_attention


def _flex_block_mask(documents: torch.Tensor | None, start: int, q_len: int, batch: int, device):
    from torch.nn.attention.flex_attention import create_block_mask

    def causal_in_document(b, h, q_idx, kv_idx):
        q_pos = q_idx + start
        keep = kv_idx <= q_pos
        if documents is not None:
            keep = keep & (documents[b, q_pos] == documents[b, kv_idx])
        return keep

    rows = batch if documents is not None else None  # without documents every row has the same mask
    return create_block_mask(
        causal_in_document,
        rows,
        None,
        q_len,
        start + q_len,
        device=device,
        _compile=torch.device(device).type == "cuda",
    )


@dataclass
class Flex:
    block_mask: object  # torch's BlockMask
    kernel: object  # flex_attention, compiled on GPU


def _prepare_flex(documents, start, q_len, batch, device) -> Flex:
    return Flex(_flex_block_mask(documents, start, q_len, batch, device), _flex_kernel(torch.device(device).type))


def _flex(q, k, v, flex: Flex):
    gqa = k.shape[1] != q.shape[1]
    if q.device.type != "cpu":
        return flex.kernel(q, k, v, block_mask=flex.block_mask, enable_gqa=gqa)
    with warnings.catch_warnings():  # CPU: the unfused kernel is the one torch has there
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex.kernel(q, k, v, block_mask=flex.block_mask, enable_gqa=gqa)


@dataclass
class Varlen:
    """One chunk of queries as flash-attn's packed sequences: each (row, document) with a query in the chunk is
    one causal sequence; its keys run from the document's first token to the chunk's query positions in it."""

    cu_seqlens_q: torch.Tensor  # int32 [sequences + 1], offsets into the queries flattened [b * q_len]
    cu_seqlens_k: torch.Tensor  # int32 [sequences + 1], offsets into the keys (flattened, or gathered by ``keys``)
    max_seqlen_q: int
    max_seqlen_k: int
    keys: torch.Tensor | None  # flat key indices to gather (context parallel: keys no query sees are left out)
    kernel: object = None  # flash-attn's flash_attn_varlen_func


def _prepare_flash(version: int):
    """The flash-attn kernel is looked up here, once per forward and outside any compiled block."""

    def prepare(documents, start, q_len, batch, device) -> Varlen:
        varlen = _varlen(documents, start, q_len, batch, device)
        varlen.kernel = flash_function(version)
        return varlen

    return prepare


def _varlen(documents: torch.Tensor | None, start: int, q_len: int, batch: int, device) -> Varlen:
    k_len = start + q_len
    if documents is None:  # one sequence per row: keys 0 .. k_len, the last q_len of them queries (bottom-right causal)
        rows = torch.arange(batch + 1, dtype=torch.int32, device=device)
        return Varlen(rows * q_len, rows * k_len, q_len, k_len, None)
    docs = documents[:, :k_len]
    position = torch.arange(k_len, device=device).expand(batch, k_len)
    first = torch.ones_like(docs, dtype=torch.bool)
    first[:, 1:] = docs[:, 1:] != docs[:, :-1]
    doc_start = torch.where(first, position, 0).cummax(dim=1).values  # each token's document's first position
    # a sequence begins at each query that opens a row or a document
    opens = first[:, start:].clone()
    opens[:, 0] = True
    row, q_first = opens.nonzero(as_tuple=True)  # in row-major order: the sequences in the packed order
    q_begin = row * q_len + q_first
    cu_q = torch.cat([q_begin, q_begin.new_tensor([batch * q_len])])
    q_lens = cu_q.diff()
    k_begin = doc_start[row, start + q_first]  # within the row
    k_lens = start + q_first + q_lens - k_begin
    cu_k = torch.cat([k_lens.new_zeros(1), k_lens.cumsum(0)])
    keys = None
    if start > 0:  # keys before a row's first document seen by the chunk are not any sequence's: gather the rest
        flat_begin = row * k_len + k_begin
        offsets = torch.arange(int(cu_k[-1]), device=device) - cu_k[:-1].repeat_interleave(k_lens)
        keys = flat_begin.repeat_interleave(k_lens) + offsets
    return Varlen(cu_q.to(torch.int32), cu_k.to(torch.int32), int(q_lens.max()), int(k_lens.max()), keys)


def _flash(q, k, v, varlen: Varlen):
    b, heads, q_len, d = q.shape
    q = q.transpose(1, 2).reshape(b * q_len, heads, d)  # [tokens, heads, d], as flash-attn packs them
    k = k.transpose(1, 2).reshape(-1, k.shape[1], d)
    v = v.transpose(1, 2).reshape(-1, v.shape[1], d)
    if varlen.keys is not None:
        k, v = k[varlen.keys], v[varlen.keys]
    out = varlen.kernel(
        q,
        k,
        v,
        cu_seqlens_q=varlen.cu_seqlens_q,
        cu_seqlens_k=varlen.cu_seqlens_k,
        max_seqlen_q=varlen.max_seqlen_q,
        max_seqlen_k=varlen.max_seqlen_k,
        causal=True,
    )
    out = out[0] if isinstance(out, tuple) else out  # some FA3 releases also return the log-sum-exp
    return out.view(b, q_len, heads, d).transpose(1, 2)


def _prepare_sdpa(documents, start, q_len, batch, device):
    return None if documents is None and start == 0 else visible(documents, start, q_len, device)


KERNELS = {  # backend -> (prepare once per forward and query chunk, outside compiled blocks; attend, in every layer)
    "sdpa": (_prepare_sdpa, _sdpa),
    "flex": (_prepare_flex, _flex),
    "flash2": (_prepare_flash(2), _flash),
    "flash3": (_prepare_flash(3), _flash),
}


class AttentionMask:
    """Causal attention within documents for one forward, prepared for one kernel: ``documents`` [b, S] (None: one
    document per row), query chunks ``{start: q_len}`` (one chunk [0, S) in one process; a cp rank's two chunks).
    Every layer calls ``attend``; what the kernel needs (boolean mask, block mask, cu_seqlens) is made once here."""

    def __init__(self, backend: str, documents: torch.Tensor | None, chunks: dict[int, int], batch: int, device):
        if backend not in KERNELS:
            raise CookbookError(f"unknown attention kernel {backend!r}; one of {', '.join(KERNELS)}")
        prepare, self.kernel = KERNELS[backend]
        self.backend, self.documents = backend, documents
        self.prepared = {start: prepare(documents, start, q_len, batch, device) for start, q_len in chunks.items()}

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Queries q [b, heads, q_len, d] at global positions [start, start + q_len) against keys and values
        k, v [b, kv_heads, start + q_len, d] at [0, start + q_len) -> [b, heads, q_len, d]."""
        return self.kernel(q, k, v, self.prepared[start])


def query_chunks(seq_len: int, cp: tuple[int, int] | None = None) -> dict[int, int]:
    """{start: length} of the query chunks a rank attends with: the whole sequence, or under context parallel
    ``cp = (rank, size)`` the rank's two chunks of ``seq_len / (2 size)`` (cookbook/engine/context_parallel.py)."""
    if cp is None:
        return {0: seq_len}
    rank, size = cp
    c = seq_len // (2 * size)
    return {j * c: c for j in (rank, 2 * size - 1 - rank)}


def apply_attention(model: nn.Module, backend: str, cp: tuple[int, int] | None = None, seq_scale: int = 1) -> None:
    """Let ``model(..., documents=ids)`` attend within documents with ``backend`` (a resolved kernel name): a
    forward pre-hook turns ``documents`` [b, S] (or None) into the ``mask`` every block gets, prepared once per
    forward, outside any compiled block. ``cp``: (rank, size) when the model is context parallel. ``seq_scale``:
    the full sequence over the forward's input length when no documents say it (the cp size, times tp for a
    later pipeline stage under sequence parallel)."""
    if backend not in KERNELS:
        raise CookbookError(f"unknown attention kernel {backend!r}; one of {', '.join(KERNELS)}")

    def prepare(module, args, kwargs):
        documents = kwargs.pop("documents", None)
        inputs = args[0]
        # plain causal attention: the model's own SDPA call; meta inputs (a pipeline stage inferring its shapes on
        # older torch) have no values to make a mask from, and the shapes do not depend on it
        if (documents is None and backend == "sdpa") or inputs.is_meta:
            return args, kwargs
        seq_len = documents.shape[1] if documents is not None else inputs.shape[1] * seq_scale
        kwargs["mask"] = AttentionMask(backend, documents, query_chunks(seq_len, cp), inputs.shape[0], inputs.device)
        return args, kwargs

    model.register_forward_pre_hook(prepare, with_kwargs=True)
