"""``--fp8``: torchao float8 linear layers in the blocks.

On CPU the flag is refused with a one-line error (no FP8 tensor cores), and so is FP8 with tensor parallel.
The conversion itself is checked on CPU, where torch runs ``_scaled_mm`` in emulation: the right layers are
swapped, names and checkpoints are unchanged, and loss and gradients stay within float8's precision of fp32's.
The training run on a GPU with FP8 tensor cores is skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from helpers_data import assert_one_line_error
from helpers_train import check, losses, pretrain, train_flags, write_token_dataset

from cookbook.engine.loss import cross_entropy
from cookbook.model import ModelConfig, Transformer

CFG = ModelConfig(
    vocab_size=96,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=128,
    max_seq_len=64,
    qkv_bias=True,
)
FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_token_dataset(tmp_path_factory.mktemp("data") / "tokens")


def test_fp8_is_refused_without_fp8_tensor_cores(tmp_path, data):
    assert_one_line_error(
        pretrain(train_flags(data, tmp_path / "x", 2) + ["--fp8"]), "--fp8 needs an NVIDIA GPU with FP8 tensor cores"
    )


def test_fp8_with_tensor_parallel_is_refused_before_any_work(tmp_path, data):
    flags = train_flags(data, tmp_path / "x", 2, tensor_model_parallel_size=2) + [
        "--fp8",
        "--dry-run",
        "--world-size",
        "2",
    ]
    assert_one_line_error(pretrain(flags), "--fp8 with tensor parallel is not supported yet")


def test_fp8_swaps_the_block_linears_and_stays_close_to_fp32():
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    from cookbook.engine.float8 import apply_fp8

    torch.manual_seed(0)
    plain = Transformer(CFG)
    fp8 = Transformer(CFG)
    assert apply_fp8(fp8) == CFG.num_layers * 7  # q, k, v, o, gate, up, down per block
    fp8.load_state_dict(plain.state_dict())  # the same names: checkpoints move between FP8 and non-FP8 runs
    swapped = {name for name, m in fp8.named_modules() if isinstance(m, Float8Linear)}
    assert all(name.startswith("layers.") for name in swapped) and "output" not in swapped

    tokens = torch.randint(0, CFG.vocab_size, (4, 33), generator=torch.Generator().manual_seed(1))
    results = []
    for model in (plain, fp8):
        model.zero_grad()
        loss = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        results.append((loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    (loss32, grad32), (loss8, grad8) = results
    assert abs(loss8 - loss32) < 0.01 * loss32, (loss8, loss32)  # e4m3 keeps 3 mantissa bits; scaled per tensor
    cosine = torch.nn.functional.cosine_similarity(grad8, grad32, dim=0).item()
    assert cosine > 0.99, cosine
    assert not torch.equal(grad8, grad32)  # the matmuls did run in float8


@pytest.mark.skipif(not FP8_GPU, reason="needs a GPU with FP8 tensor cores (compute capability 8.9+)")
def test_fp8_training_on_gpu_follows_bf16(tmp_path, data):
    pytest.importorskip("torchao.float8")
    runs = {}
    for name, extra in (("bf16", []), ("fp8", ["--fp8"])):
        flags = train_flags(data, tmp_path / name, 20, dtype="bf16", device="cuda", global_batch_size=4) + extra
        check(pretrain(flags))
        runs[name] = losses(tmp_path / name)
    assert runs["fp8"][20] < runs["fp8"][1] - 0.5  # it learns
    for step in (1, 10, 20):
        assert abs(runs["fp8"][step] - runs["bf16"][step]) < 0.1, (step, runs)
