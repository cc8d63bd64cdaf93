"""cookbook: the whole life of a Llama-family model on one PyTorch-native engine."""

__version__ = "0.1.0"
