"""The compute dtype of every command that runs a model: ``--dtype auto`` (the default), ``bf16`` or ``fp32``.

``auto`` picks bf16 where the device computes it natively, fp32 elsewhere:

    CUDA GPU with bf16 (Ampere and later)           bf16
    CUDA GPU without (V100, T4, ...)                fp32
    CPU with AMX or AVX512-BF16 (Sapphire Rapids,   bf16   (oneDNN's bf16 matmuls: ~1.6x a CPU training step,
        Cooper Lake, Zen 4 and later)                       several times a matmul)
    any other CPU                                   fp32   (bf16 there is emulated: ~25x slower than fp32)

The CPU's units come from torch (``torch.cpu._is_amx_tile_supported``, ``_is_avx512_bf16_supported``), else from
the ``flags`` of /proc/cpuinfo, else none are assumed (fp32: slower than it could be at worst, never 25x).
``COOKBOOK_CPU_BF16=1`` or ``=0`` overrides the detection (a VM that hides the CPU's flags, or to make runs
mean the same on every machine, as the test suite does). An ``auto`` choice is printed once per process with its
reason, when the work starts: training prints it in its summary, inference when the model first runs (after every
check of the command's inputs, so that bad input still ends in its one line).

fp16 is offered nowhere: training in fp16 needs loss scaling, which bf16 makes unnecessary, and a GPU without
bf16 runs fp32. (``cookbook convert --dtype fp16`` is a storage format for the files it writes, not a compute
dtype.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from cookbook.engine.config import DTYPE_NAMES, check_dtype

DTYPES = dict(zip(DTYPE_NAMES, (torch.bfloat16, torch.float32)))
CHOICES = ("auto", *DTYPES)


@dataclass(frozen=True)
class Capabilities:
    """What decides ``auto``: the CUDA device's bf16 support and name, the CPU's bf16 units (None: none)."""

    cuda_bf16: bool = False
    cuda_name: str = ""
    cpu_bf16: str | None = None  # "AMX" or "AVX512-BF16"


def cpu_bf16_units(flags: set[str] | None = None) -> str | None:
    """The CPU's native bf16 matmul units: "AMX", "AVX512-BF16" or None. ``flags``: /proc/cpuinfo flag names
    (read from torch, else /proc/cpuinfo, when None)."""
    if flags is None:
        flags = _cpu_flags()
    if "amx_bf16" in flags or "amx_tile" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return None


def _cpu_flags() -> set[str]:
    override = os.environ.get("COOKBOOK_CPU_BF16")
    if override is not None:
        return {"avx512_bf16"} if override.strip().lower() in ("1", "true", "yes") else set()
    probes = {"amx_tile": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    found, asked = set(), False
    for flag, name in probes.items():
        probe = getattr(torch.cpu, name, None)
        if probe is None:
            continue
        asked = True
        try:
            if probe():
                found.add(flag)
        except Exception:  # noqa: BLE001 - a probe that fails means "not known to be there"
            pass
    if asked:
        return found
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def probe(device: torch.device) -> Capabilities:
    """This machine's capabilities for ``device``."""
    if device.type == "cuda":
        return Capabilities(cuda_bf16=torch.cuda.is_bf16_supported(), cuda_name=torch.cuda.get_device_name(device))
    return Capabilities(cpu_bf16=cpu_bf16_units())


def choose_dtype(dtype: str, device: torch.device, caps: Capabilities | None = None) -> tuple[str, str]:
    """(bf16 or fp32, why) for ``--dtype dtype`` on ``device``; ``caps`` defaults to this machine's."""
    check_dtype(dtype)
    if dtype != "auto":
        return dtype, "as asked"
    caps = probe(device) if caps is None else caps
    if device.type == "cuda":
        name = caps.cuda_name or "the GPU"
        if caps.cuda_bf16:
            return "bf16", f"auto: {name} computes bf16 natively"
        return "fp32", f"auto: {name} has no bf16 tensor cores; --dtype bf16 would be emulated"
    if caps.cpu_bf16:
        return "bf16", f"auto: this CPU has {caps.cpu_bf16} bf16 units"
    return "fp32", "auto: this CPU has no bf16 units (AMX or AVX512-BF16), where bf16 is emulated and ~25x slower"


_announced: set[tuple[str, str]] = set()


def announce(dtype: str, chosen: str, why: str) -> None:
    """Print an ``auto`` choice, once per process (stderr)."""
    if dtype == "auto" and (chosen, why) not in _announced:
        from cookbook.progress import console

        _announced.add((chosen, why))
        console.print(f"dtype {chosen} ({why})", highlight=False)


def load_in_dtype(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """``model`` (on its device) cast to ``--dtype dtype``: inference's loaders. An ``auto`` choice is printed when the
    model first runs, so that the checks a command makes after loading (its data, its tokenizer, its port) still fail
    with their one line and nothing before it."""
    device = next(model.parameters()).device
    chosen, why = choose_dtype(dtype, device)

    def once(module, args):
        handle.remove()
        announce(dtype, chosen, why)

    handle = model.register_forward_pre_hook(once)
    return model.to(DTYPES[chosen])


__all__ = [
    "CHOICES",
    "DTYPES",
    "Capabilities",
    "announce",
    "check_dtype",
    "choose_dtype",
    "cpu_bf16_units",
    "load_in_dtype",
    "probe",
]
