"""``--dtype auto``: bf16 where the device computes it natively, fp32 elsewhere, decided from capabilities given
here (never from this machine's CPU), with the reason; fp16 is refused the same way by every command."""

from __future__ import annotations

import pytest
import torch

from cookbook.engine.config import TrainingConfig, check_dtype
from cookbook.engine.precision import Capabilities, choose_dtype, cpu_bf16_units
from cookbook.errors import CookbookError

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize(
    "device,caps,want,because",
    [
        (CUDA, Capabilities(cuda_bf16=True, cuda_name="NVIDIA H100 80GB HBM3"), "bf16", "H100 80GB HBM3 computes bf16"),
        (CUDA, Capabilities(cuda_bf16=False, cuda_name="Tesla V100-SXM2-32GB"), "fp32", "V100-SXM2-32GB has no bf16"),
        (CPU, Capabilities(cpu_bf16="AMX"), "bf16", "AMX"),
        (CPU, Capabilities(cpu_bf16="AVX512-BF16"), "bf16", "AVX512-BF16"),
        (CPU, Capabilities(cpu_bf16=None), "fp32", "no bf16 units"),
        (CPU, Capabilities(cuda_bf16=True), "fp32", "no bf16 units"),  # a GPU elsewhere does not make the CPU fast
    ],
)
def test_auto_follows_the_device(device, caps, want, because):
    chosen, why = choose_dtype("auto", device, caps)
    assert chosen == want and because in why and why.startswith("auto:")


@pytest.mark.parametrize("asked", ["bf16", "fp32"])
def test_an_explicit_dtype_is_kept(asked):
    for caps in (Capabilities(cpu_bf16=None), Capabilities(cpu_bf16="AMX")):
        assert choose_dtype(asked, CPU, caps) == (asked, "as asked")


def test_cpu_units_from_cpuinfo_flags():
    assert cpu_bf16_units({"fpu", "avx2", "avx512f", "amx_tile", "amx_bf16"}) == "AMX"
    assert cpu_bf16_units({"avx2", "avx512f", "avx512_bf16"}) == "AVX512-BF16"
    assert cpu_bf16_units({"avx2", "avx512f", "avx512_vnni"}) is None  # AVX-512 alone emulates bf16
    assert cpu_bf16_units(set()) is None


def test_the_environment_overrides_detection(monkeypatch):
    monkeypatch.setenv("COOKBOOK_CPU_BF16", "1")
    assert choose_dtype("auto", CPU)[0] == "bf16"
    monkeypatch.setenv("COOKBOOK_CPU_BF16", "0")
    assert choose_dtype("auto", CPU)[0] == "fp32"


@pytest.mark.parametrize("bad", ["fp16", "float16", "half", "bfloat16", ""])
def test_other_names_are_refused_everywhere(bad):
    with pytest.raises(CookbookError, match="use auto, bf16 or fp32") as e:
        check_dtype(bad)
    assert ("loss scaling" in str(e.value)) == (bad == "fp16")
    with pytest.raises(CookbookError, match="use auto, bf16 or fp32"):
        TrainingConfig(dtype=bad)


def test_auto_is_the_training_default():
    assert TrainingConfig().dtype == "auto"


def test_inference_says_its_choice_when_the_model_first_runs(monkeypatch, capsys):
    """Loaders cast at once but print an auto choice only at the first forward: a command's checks after loading
    still fail with their one line; the choice is said once."""
    from cookbook.engine import precision
    from cookbook.model import ModelConfig, Transformer

    monkeypatch.setattr(precision, "_announced", set())
    model = precision.load_in_dtype(
        Transformer(
            ModelConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_seq_len=8)
        ),
        "auto",
    )
    assert next(model.parameters()).dtype == torch.float32  # COOKBOOK_CPU_BF16=0 (conftest)
    assert capsys.readouterr().err == ""
    tokens = torch.zeros(1, 4, dtype=torch.long)
    model(tokens)
    model(tokens)
    assert capsys.readouterr().err.splitlines() == [
        "dtype fp32 (auto: this CPU has no bf16 units (AMX or AVX512-BF16), where bf16 is emulated and ~25x slower)"
    ]
    precision.load_in_dtype(model, "fp32")(tokens)  # asked for: nothing to say
    assert capsys.readouterr().err == ""
