"""What every generation backend shares: the sampling parameters, one completion, the backend interface.

Names follow OpenAI's completions API (``max_tokens``, ``temperature``, ``top_p``, ``n``, ``stop``,
``frequency_penalty``, ``presence_penalty``) plus vLLM's extensions (``top_k``, ``repetition_penalty``), so the
same values mean the same thing whether the teacher runs in vLLM, behind an HTTP server, or in our generator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Protocol

from cookbook.errors import CookbookError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256  # new tokens per completion
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus; 1 = off
    top_k: int = 0  # 0 = off (vLLM spells it -1; backends translate)
    n: int = 1  # completions per prompt
    stop: tuple[str, ...] = ()  # strings that end a completion (not included in its text)
    frequency_penalty: float = 0.0  # logit -= f * count of the token in the completion so far
    presence_penalty: float = 0.0  # logit -= p if the token is in the completion so far
    repetition_penalty: float = 1.0  # CTRL/HF: tokens in prompt or completion: logit / r if > 0 else logit * r

    def check(self) -> None:
        """A CookbookError naming the first bad value."""
        if self.max_tokens < 1:
            raise CookbookError(f"max_tokens {self.max_tokens} must be at least 1")
        if self.temperature < 0:
            raise CookbookError(f"temperature {self.temperature} is negative; use 0 for greedy decoding or a positive value")
        if not 0 < self.top_p <= 1:
            raise CookbookError(f"top_p {self.top_p} is not in (0, 1]")
        if self.top_k < 0:
            raise CookbookError(f"top_k {self.top_k} is negative; use 0 to turn it off")
        if self.n < 1:
            raise CookbookError(f"n {self.n} must be at least 1")
        if not -2 <= self.frequency_penalty <= 2 or not -2 <= self.presence_penalty <= 2:
            raise CookbookError("frequency_penalty and presence_penalty must lie in [-2, 2] (as in OpenAI's API)")
        if self.repetition_penalty <= 0:
            raise CookbookError(f"repetition_penalty {self.repetition_penalty} must be positive (1 = off)")
        if any(not s for s in self.stop):
            raise CookbookError("a stop string is empty")

    def to_dict(self) -> dict:
        """JSON-ready, as written into every output record's metadata."""
        d = asdict(self)
        d["stop"] = list(self.stop)
        return d


@dataclass
class Completion:
    text: str  # the continuation only (never the prompt), cut before any stop string
    tokens: int  # tokens the teacher generated for it (as its backend counts them)
    finish_reason: str  # "stop" (eos or a stop string) or "length" (max_tokens reached)


Progress = Callable[[int, int], None]  # on_progress(prompts finished, tokens generated) as work completes


class Backend(Protocol):
    """Generates completions for text prompts. ``seeds[i]`` seeds prompt i, so a rerun of the same prompts with
    the same seeds gives the same completions wherever the backend can promise it (our generator, vLLM)."""

    name: str  # "cookbook", "openai" or "vllm"
    teacher: str  # what the output records name as the teacher (a path, or the served model's name)

    def generate(self, prompts: list[str], params: SamplingParams, seeds: list[int],
                 on_progress: Progress | None = None) -> list[list[Completion]]:
        """One list of ``params.n`` completions per prompt, in the prompts' order."""
        ...

    def close(self) -> None:
        ...


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """(text before the earliest stop string, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
