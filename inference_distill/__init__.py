"""Synthetic-data generation from a teacher for distillation (a later issue)."""
