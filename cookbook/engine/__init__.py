"""The training engine: distributed setup, parallelism, optimizer, checkpoints, metrics, the Trainer."""
