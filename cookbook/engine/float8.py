"""FP8 training (``--fp8``) through torchao's float8 linear layers, for GPUs with FP8 tensor cores.

Every linear layer inside a transformer block (q, k, v, attention output, gate, up, down) becomes a torchao
``Float8Linear``: its weight stays a high-precision parameter (fp32 master, bf16 under FSDP's mixed precision),
and each forward casts the input, the weight and, in backward, the output gradient to float8 with a dynamic
per-tensor scale (e4m3 for all three: torchao's "tensorwise" recipe) before the matmul ``torch._scaled_mm``
runs on the tensor cores. The embedding, the norms and the output layer stay in bf16, as in torchtitan and in
Megatron-LM's Transformer Engine recipes (the logits are too sensitive). Names do not change, so checkpoints
move freely between FP8 and non-FP8 runs.

It is applied first, on the meta-device model, before tensor parallel, recompute, compile and FSDP2. The
speed-up needs an H100/H200 (compute capability 9.0) or an Ada GPU (8.9); elsewhere ``check_fp8`` refuses
with a clear error rather than training slowly in emulation. torchao's float8 tensor-parallel styles are not
wired in yet, so ``--fp8`` with tensor parallel is refused too.
"""

from __future__ import annotations

import torch
from torch import nn

from cookbook.errors import CookbookError

MIN_CAPABILITY = (8, 9)


def _torchao():
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise CookbookError(
            f"--fp8 needs torchao's float8 training ({e}); install it with: pip install 'cookbook[fp8]'"
        ) from None
    return Float8LinearConfig, convert_to_float8_training


def check_fp8(tp: int, device: torch.device | None = None) -> None:
    """Refuse ``--fp8`` where it cannot run fast: tensor parallel, then (given a ``device``) no FP8 tensor
    cores or no torchao."""
    if tp > 1:
        raise CookbookError(
            "--fp8 with tensor parallel is not supported yet; use FSDP (data parallel) and pipeline "
            "parallel with --fp8, or drop --fp8"
        )
    if device is None:
        return
    if device.type != "cuda":
        raise CookbookError(
            f"--fp8 needs an NVIDIA GPU with FP8 tensor cores (H100/H200 or Ada), not {device.type}; drop --fp8"
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        raise CookbookError(
            f"--fp8 needs FP8 tensor cores (compute capability 8.9+: H100/H200 or Ada); {torch.cuda.get_device_name(device)} "
            f"has {capability[0]}.{capability[1]}; drop --fp8"
        )
    _torchao()


def fp8_eligible(module: nn.Module, fqn: str) -> bool:
    """A block's linear layer whose shapes ``torch._scaled_mm`` takes (both dimensions multiples of 16)."""
    return (
        isinstance(module, nn.Linear)
        and fqn.startswith("layers.")
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def apply_fp8(model: nn.Module) -> int:
    """Swap the eligible linear layers for torchao ``Float8Linear`` in place; returns how many were swapped."""
    config_cls, convert = _torchao()
    eligible = [name for name, module in model.named_modules() if fp8_eligible(module, name)]
    if not eligible:
        raise CookbookError("--fp8 found no linear layer with both dimensions multiples of 16 to run in FP8")
    convert(model, config=config_cls(), module_filter_fn=fp8_eligible)
    return len(eligible)
