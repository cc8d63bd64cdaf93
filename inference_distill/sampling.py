"""The interface every generation backend implements (its sampling parameters and completions are
``cookbook.inference.sampling``'s).

Names follow OpenAI's completions API (``max_tokens``, ``temperature``, ``top_p``, ``n``, ``stop``,
``frequency_penalty``, ``presence_penalty``) plus vLLM's extensions (``top_k``, ``repetition_penalty``), so the
same values mean the same thing whether the teacher runs in vLLM, behind an HTTP server, or in our generator.
"""

from __future__ import annotations

from typing import Protocol

from cookbook.inference.sampling import Completion, Progress, SamplingParams

__all__ = ["Backend"]


class Backend(Protocol):
    """Generates completions for text prompts. ``seeds[i]`` seeds prompt i, so a rerun of the same prompts with
    the same seeds gives the same completions wherever the backend can promise it (our generator, vLLM)."""

    name: str  # "cookbook", "openai" or "vllm"
    teacher: str  # what the output records name as the teacher (a path, or the served model's name)

    def generate(
        self, prompts: list[str], params: SamplingParams, seeds: list[int], on_progress: Progress | None = None
    ) -> list[list[Completion]]:
        """One list of ``params.n`` completions per prompt, in the prompts' order."""
        ...

    def close(self) -> None: ...
