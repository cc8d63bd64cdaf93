"""Context parallel (+ tensor parallel, + FSDP2 over dp x cp) in real gloo processes equals one process.

``tp_train.py --cp C`` trains its tiny model (hidden 64, 4 heads, 2 kv heads, QKV bias, 2 layers, vocab 96,
sequence 16) for 12 clipped AdamW steps on a fixed global batch under a given layout, each cp rank on its share of
every sequence, on plain rows and on rows packed from documents (Megatron-LM's three document flags); the same
script in one process, on the plain model, is the oracle. In-process tests cover the load-balanced sharding and the
attention over a split sequence, rank by rank.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers_train import assert_same_run, run_script
from torch.distributed.device_mesh import init_device_mesh

from cookbook.engine.context_parallel import (
    ContextParallel,
    apply_cp,
    causal_attention_cp,
    check_cp,
    shard_batch,
    shard_positions,
    shard_sequence,
    unshard_sequence,
)
from cookbook.engine.loss import cross_entropy
from cookbook.errors import CookbookError
from cookbook.model import ModelConfig, Transformer
from cookbook.model.model import KVCache

SCRIPT = Path(__file__).with_name("tp_train.py")
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


def run(out: Path, nproc: int, *args: str) -> dict:
    return run_script(SCRIPT, out, nproc, *args)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    return run(tmp_path_factory.mktemp("cp") / "one.pt", 1, "--variants", "base,docs")


@pytest.fixture(scope="module")
def cp2(tmp_path_factory):
    """2 processes, CP=2: FSDP2 over the flattened (dp_shard = 1, cp = 2) mesh; plain rows and packed documents."""
    return run(tmp_path_factory.mktemp("cp") / "cp2.pt", 2, "--cp", "2", "--variants", "base,docs")


@pytest.fixture(scope="module")
def cp2_tp2(tmp_path_factory):
    """4 processes, CP=2 x TP=2, without and with sequence parallel (FSDP2 over dp_shard_cp, TP inside), and packed
    documents under sequence parallel."""
    return run(tmp_path_factory.mktemp("cp") / "cp2_tp2.pt", 4, "--cp", "2", "--tp", "2", "--variants", "base,sp,docs")


@pytest.fixture(scope="module")
def dp2_cp2(tmp_path_factory):
    """4 processes, 2 data-parallel ranks x CP=2: rows split over dp, each row's tokens over cp."""
    return run(tmp_path_factory.mktemp("cp") / "dp2_cp2.pt", 4, "--cp", "2", "--variants", "base,docs")


@pytest.mark.parametrize(
    "layout, variant",
    [
        ("cp2", "base"),
        ("cp2_tp2", "base"),
        ("cp2_tp2", "sp"),
        ("dp2_cp2", "base"),
        ("cp2", "docs"),
        ("cp2_tp2", "docs"),
        ("dp2_cp2", "docs"),
    ],
)
def test_context_parallel_run_equals_one_process(request, one_process, layout, variant):
    """``docs``: rows packed from documents with --reset-position-ids --reset-attention-mask --eod-mask-loss; the
    documents cross the load-balanced chunks, and the cp ranks score different numbers of tokens."""
    assert_same_run(one_process["docs" if variant == "docs" else "base"], request.getfixturevalue(layout)[variant])


# --------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_shards_cover_every_position_once_and_balance_causal_work(cp):
    seq = 8 * cp
    shards = [shard_positions(seq, r, cp) for r in range(cp)]
    assert all(s.shape == (1, seq // cp) for s in shards)
    assert torch.equal(torch.cat(shards, dim=1).sort().values[0], torch.arange(seq))
    assert len({int((s + 1).sum()) for s in shards}) == 1  # a query at position p attends to p + 1 keys
    assert torch.equal(unshard_sequence(shards), torch.arange(seq)[None])
    x = torch.randn(2, seq, 3)
    assert torch.equal(unshard_sequence([shard_sequence(x, r, cp) for r in range(cp)]), x)
    for r, positions in enumerate(shards):  # the positions are those of the rank's tokens
        assert torch.equal(shard_sequence(x, r, cp), x[:, positions[0]])


def test_rank_holds_an_early_and_a_late_chunk():
    assert shard_positions(16, 0, 2).tolist() == [[0, 1, 2, 3, 12, 13, 14, 15]]
    assert shard_positions(16, 1, 2).tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]


def test_shard_batch_pairs_each_input_with_its_next_token():
    batch = torch.arange(17)[None].repeat(2, 1) * 10
    inputs, targets, positions = shard_batch(batch, 1, 2)
    assert torch.equal(inputs, positions.expand(2, -1) * 10)
    assert torch.equal(targets, inputs + 10)


def test_check_cp_refuses_uneven_chunks():
    check_cp(16, 4)
    with pytest.raises(
        CookbookError,
        match=r"cuts each sequence into 6 equal chunks, but the sequence has 16 tokens; "
        r"use a --seq-length divisible by 6",
    ):
        check_cp(16, 3)
    with pytest.raises(CookbookError, match="at least 1"):
        check_cp(16, 0)
    with pytest.raises(CookbookError, match="divisible by 4"):
        shard_sequence(torch.zeros(1, 6), 0, 2)


@pytest.mark.parametrize("cp", [1, 2, 3])
def test_attention_over_a_split_sequence_equals_causal_attention(cp):
    """Each rank's queries against the whole sequence's keys, put back in order, are causal attention (fp64)."""
    torch.manual_seed(cp)
    q, k, v = (torch.randn(2, 4, 4 * cp, 8, dtype=torch.float64) for _ in range(3))
    got = unshard_sequence(
        [causal_attention_cp(shard_sequence(q, r, cp, dim=2), k, v, r, cp) for r in range(cp)], dim=2
    )
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- the model in a world of one


@pytest.fixture(scope="module")
def cp_mesh():
    """A cp mesh of one rank, in this process (kept if another test made the group)."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() != 1:
        pytest.skip("a process group of more than one rank already exists")
    yield init_device_mesh("cpu", (1,), mesh_dim_names=("cp",))
    if created:
        dist.destroy_process_group()


def loss_and_grads(model, *args) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    inputs, targets, positions = args
    loss = cross_entropy(model(inputs, positions), targets)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def test_context_parallel_attention_of_one_rank_equals_the_model(cp_mesh):
    torch.manual_seed(0)
    plain = Transformer(TINY)
    model = Transformer(TINY)
    model.load_state_dict(plain.state_dict())
    apply_cp(model, cp_mesh)
    assert all(isinstance(block.attention, ContextParallel) for block in model.layers.values())
    assert list(model.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in plain.named_parameters()]

    batch = torch.randint(0, TINY.vocab_size, (2, 17))
    loss, grads = loss_and_grads(model, *shard_batch(batch, 0, 1))
    want_loss, want_grads = loss_and_grads(plain, batch[:, :-1], batch[:, 1:], None)
    torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-6)
    for name, g in want_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_context_parallel_refuses_what_it_cannot_do(cp_mesh):
    model = Transformer(TINY)
    apply_cp(model, cp_mesh)
    with pytest.raises(CookbookError, match="already context parallel"):
        apply_cp(model, cp_mesh)
    cache = KVCache(TINY, 1, 8)
    with pytest.raises(CookbookError, match="KV cache does not run under context parallel"):
        model(torch.zeros(1, 2, dtype=torch.long), torch.arange(2)[None], cache=cache)
    dynamic = TINY.replace(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(CookbookError, match="dynamic NTK RoPE scaling"):
        apply_cp(Transformer(dynamic), cp_mesh)
