"""The ``cookbook`` backend: our generator (``cookbook.inference``) on a cookbook or Hugging Face checkpoint, in this
process, behind the ``Backend`` interface."""

from __future__ import annotations

import gc

import torch

from cookbook.errors import CookbookError
from cookbook.inference.generator import LocalGenerator
from cookbook.inference.sampling import Completion, Progress, SamplingParams

__all__ = ["CookbookBackend"]


# --------------------------------------------------------------------------- the Backend


class CookbookBackend:
    """``Backend`` over a LocalGenerator: the teacher in this process, on CPU or one GPU."""

    name = "cookbook"

    def __init__(
        self,
        teacher: str,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 16,
        tokenizer_model: str | None = None,
    ):
        if batch_size < 1:
            raise CookbookError(f"--batch-size {batch_size} must be at least 1")
        self.teacher, self.batch_size = str(teacher), batch_size
        self.generator: LocalGenerator | None = LocalGenerator.load(teacher, device, dtype, tokenizer_model)

    def generate(
        self, prompts: list[str], params: SamplingParams, seeds: list[int], on_progress: Progress | None = None
    ) -> list[list[Completion]]:
        if self.generator is None:
            raise CookbookError("the cookbook backend was closed; create a new one")
        return self.generator.complete(prompts, params, seeds, self.batch_size, on_progress)

    def close(self) -> None:
        self.generator = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
