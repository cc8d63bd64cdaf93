"""Data: tokenizers, Megatron indexed datasets, jsonl reading, the built-in sample corpus."""
