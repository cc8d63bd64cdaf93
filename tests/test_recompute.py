"""Activation recompute and per-block compile change memory and speed, never the numbers or the names."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from cookbook.engine.metrics import activation_memory
from cookbook.engine.recompute import (
    Recomputed,
    apply_activation_checkpointing,
    apply_compile,
    check_recompute,
)
from cookbook.engine.trainer import next_token_loss
from cookbook.errors import CookbookError
from cookbook.model import ModelConfig, Transformer

TINY = ModelConfig(
    vocab_size=96, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=160, max_seq_len=32
)

# (granularity, method, num_layers) -> names of the blocks that recompute, for a 2-layer model
MODES = {
    "none": (("none", None, None), []),
    "selective": (("selective", None, None), ["0", "1"]),
    "full": (("full", None, None), ["0", "1"]),
    "full-uniform-2": (("full", "uniform", 2), ["0", "1"]),
    "full-block-1": (("full", "block", 1), ["0"]),
}


def make(cfg: ModelConfig = TINY, seed: int = 0) -> tuple[Transformer, torch.Tensor]:
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(seed)
    batch = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len + 1))
    return model, batch


def loss_and_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = next_token_loss(model, batch)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        grads[name] = g.full_tensor() if hasattr(g, "full_tensor") else g
    return loss.detach(), grads


def assert_same(got, want, rtol: float, atol: float) -> None:
    (loss, grads), (ref_loss, ref_grads) = got, want
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    assert grads.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def names(model) -> tuple[list[str], list[str]]:
    return [n for n, _ in model.named_parameters()], list(model.state_dict())


@pytest.fixture(scope="module")
def mesh():
    """FSDP2 over a gloo world of one, in this process (kept if another test made the group)."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() != 1:
        pytest.skip("a process group of more than one rank already exists")
    yield init_device_mesh("cpu", (1,))
    if created:
        dist.destroy_process_group()


def count_block_forwards(model) -> dict[str, int]:
    """How often each block's attention runs (forward hooks fire again when a block is recomputed)."""
    counts = {name: 0 for name in model.layers}
    for name, block in model.layers.items():
        block.attention.register_forward_hook(lambda *_, n=name: counts.__setitem__(n, counts[n] + 1))
    return counts


@pytest.mark.parametrize("mode", MODES)
def test_recompute_gives_the_plain_models_loss_and_grads(mode):
    (args, recomputed) = MODES[mode]
    plain, batch = make()
    model = copy.deepcopy(plain)
    apply_activation_checkpointing(model, *args)
    assert [n for n, b in model.layers.items() if isinstance(b, Recomputed)] == recomputed
    counts = count_block_forwards(model)
    got = loss_and_grads(model, batch)
    # a recomputed block runs its forward again in backward; the others once
    assert counts == {n: 2 if n in recomputed else 1 for n in model.layers}
    assert_same(got, loss_and_grads(plain, batch), rtol=1e-6, atol=1e-7)
    with torch.no_grad():  # evaluation and generation run through recomputing blocks unchanged
        torch.testing.assert_close(model(batch), plain(batch), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["selective", "full-block-1"])
def test_recompute_under_fsdp_gives_the_plain_models_loss_and_grads(mesh, mode):
    (args, recomputed) = MODES[mode]
    plain, batch = make()
    model = copy.deepcopy(plain)
    apply_activation_checkpointing(model, *args)  # before fully_shard, the order of parallelize()
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert names(model) == names(plain)
    counts = count_block_forwards(model)
    got = loss_and_grads(model, batch)
    assert counts == {n: 2 if n in recomputed else 1 for n in model.layers}
    assert_same(got, loss_and_grads(plain, batch), rtol=1e-6, atol=1e-7)


def test_parameter_and_state_dict_names_do_not_change():
    plain, _ = make(TINY.replace(num_layers=4, tie_embeddings=True, qkv_bias=True))
    for args in [("selective",), ("full",), ("full", "block", 3)]:
        model = copy.deepcopy(plain)
        apply_activation_checkpointing(model, *args)
        apply_compile(model)  # lazy: nothing compiles until a forward
        assert names(model) == names(plain)
        assert not any("_orig_mod" in n or "_checkpoint_wrapped_module" in n for n in model.state_dict())
        model.load_state_dict(plain.state_dict(), strict=True)


def memory_profile(model, batch) -> tuple[int, int]:
    """(bytes held for backward when forward ends, peak bytes over forward + backward) of one training step."""
    return activation_memory(lambda: next_token_loss(model, batch))


def test_recompute_lowers_activation_memory():
    cfg = ModelConfig(
        vocab_size=96,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=352,
        max_seq_len=256,
    )
    plain, batch = make(cfg)
    mib = {}
    for mode, args in {
        "none": ("none",),
        "selective": ("selective",),
        "full-block-2": ("full", "block", 2),
        "full": ("full",),
    }.items():
        model = copy.deepcopy(plain)
        apply_activation_checkpointing(model, *args)
        mib[mode] = tuple(round(b / 2**20, 2) for b in memory_profile(model, batch))
    print("MiB (held after forward, peak):", mib)
    held = {mode: h for mode, (h, _) in mib.items()}
    peak = {mode: p for mode, (_, p) in mib.items()}
    assert held["full"] < held["selective"] < held["none"]
    assert held["full"] < held["full-block-2"] < held["none"]
    assert peak["full"] < peak["selective"] < peak["none"]
    assert held["selective"] < 0.7 * held["none"] and held["full"] < 0.2 * held["none"]


@pytest.mark.parametrize(
    "args, says",
    [
        (("partial", None, None), "unknown recompute granularity"),
        (("full", "random", 1), "unknown recompute method"),
        (("selective", "uniform", None), "apply only to --recompute-granularity full"),
        (("selective", None, 1), "apply only to --recompute-granularity full"),
        (("none", "block", 1), "apply only to --recompute-granularity full"),
        (("full", "block", None), "needs --recompute-num-layers"),
        (("full", "block", 3), "between 1 and the model's 2 layers"),
        (("full", "uniform", 0), "between 1 and the model's 2 layers"),
    ],
)
def test_bad_recompute_flags_raise(args, says):
    with pytest.raises(CookbookError, match=says):
        check_recompute(*args, model_layers=2)
    model, _ = make()
    with pytest.raises(CookbookError, match=says):
        apply_activation_checkpointing(model, *args)
    assert not any(isinstance(b, Recomputed) for b in model.layers.values())


def test_good_recompute_flags_pass_and_twice_is_refused():
    for args in [
        ("none", None, None),
        ("selective", None, None),
        ("full", None, None),
        ("full", "uniform", None),
        ("full", "uniform", 2),
        ("full", "block", 1),
        ("full", "block", 2),
    ]:
        check_recompute(*args, model_layers=2)
    model, _ = make()
    apply_activation_checkpointing(model, "full")
    with pytest.raises(CookbookError, match="already recomputes"):
        apply_activation_checkpointing(model, "selective")


def test_compile_without_a_compiler_says_so(monkeypatch):
    model, _ = make()
    monkeypatch.setattr("cookbook.engine.recompute.shutil.which", lambda name: None)
    with pytest.raises(CookbookError, match="needs a C\\+\\+ compiler"):
        apply_compile(model)


def test_compiled_blocks_with_selective_recompute_under_fsdp_match_eager(mesh):
    """The whole stack in parallelize()'s order (recompute -> compile -> FSDP), one small case: compiling
    takes tens of seconds on CPU."""
    plain, batch = make()
    model = copy.deepcopy(plain)
    apply_activation_checkpointing(model, "selective")
    torch._dynamo.reset()
    apply_compile(model)
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    want = loss_and_grads(plain, batch)
    for _ in range(2):  # the second step runs the compiled code without compiling
        assert_same(loss_and_grads(model, batch), want, rtol=1e-5, atol=1e-6)
    assert names(model) == names(plain)
    assert counters["stats"]["unique_graphs"] >= 1  # the blocks did run compiled
