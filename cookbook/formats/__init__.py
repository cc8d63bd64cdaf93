"""On-disk interchange formats: Hugging Face, Megatron-LM."""
