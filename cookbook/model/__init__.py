"""The Llama-family decoder (no parallelism inside), its config and presets."""

from cookbook.model.config import PRESETS, ModelConfig, megatron_flops_per_iteration, preset
from cookbook.model.model import Transformer

__all__ = ["ModelConfig", "PRESETS", "preset", "megatron_flops_per_iteration", "Transformer"]
