"""The Llama-family decoder (no parallelism inside), its config and presets.

``Transformer`` is imported when first asked for: the config alone imports no torch.
"""

from cookbook.model.config import PRESETS, ModelConfig, megatron_flops_per_iteration, preset

__all__ = ["ModelConfig", "PRESETS", "preset", "megatron_flops_per_iteration", "Transformer"]


def __getattr__(name: str):
    if name == "Transformer":
        from cookbook.model.model import Transformer

        return Transformer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
