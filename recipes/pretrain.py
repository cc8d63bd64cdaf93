"""``cookbook pretrain``: pretrain or continue training a model; the job lifecycle is ``cookbook.engine.job``'s.

``--load`` continues a run (model, optimizer, step, data position, RNG); the model's shape then comes from the
checkpoint. ``--finetune`` starts a new run from the checkpoint's weights (a Hugging Face folder too). When
``--load`` and ``--save`` name the same folder and it holds no checkpoint yet, training starts from scratch, so one
command both starts and resumes a job (what a preemptible cluster needs).
"""

from __future__ import annotations

from pathlib import Path

from cookbook.engine import job


def dry_run(config_file: str | Path | None, flags: dict[str, dict], world_size: int, gpu: str = "A100-80GB") -> None:
    """Validate the job for ``world_size`` processes without devices; the estimate of ``cookbook plan`` for it."""
    job.dry_run(job.resolve(config_file, flags, here=False), world_size, gpu)


def run(config_file: str | Path | None, flags: dict[str, dict]) -> dict:
    return job.run(job.resolve(config_file, flags))
