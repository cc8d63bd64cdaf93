"""Structured pruning: importance scores, slicing heads/channels/neurons, layer drop (a later issue)."""
