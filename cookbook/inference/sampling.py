"""Sampling: the parameters every generator shares (checked in one place), and the sampler that draws one token per
row from a batch whose rows each have their own parameters and their own random stream.

Names follow OpenAI's completions API (``max_tokens``, ``temperature``, ``top_p``, ``n``, ``stop``,
``frequency_penalty``, ``presence_penalty``) plus vLLM's extensions (``top_k``, ``repetition_penalty``), so the same
values mean the same thing in vLLM, behind an HTTP server, or in our engine.

Order, as vLLM applies it: penalties on the raw logits (repetition, then frequency and presence), then temperature,
then top-k, then top-p, then the draw. A temperature below ``GREEDY_BELOW`` is greedy (argmax), as in vLLM.

The draw is the exponential race: ``argmax(p / q)`` with ``q ~ Exp(1)`` per token samples exactly from ``p``. Each
row draws its ``q`` from its own ``torch.Generator``, seeded from its request's seed, so a row's tokens depend only
on its prompt, its seed and its parameters, never on which other rows share the batch (up to floating-point
differences between batch shapes, which move a draw only when two tokens are tied to rounding).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from cookbook.errors import CookbookError

GREEDY_BELOW = 1e-5  # temperatures below this decode greedily (vLLM's _SAMPLING_EPS)
SEED_MAX = 2**63 - 1  # seeds are int64, as in vLLM


class SamplingError(CookbookError):
    """A bad sampling parameter; ``param`` names it (the server reports it in OpenAI's error shape)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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

    def check(self, allow_no_tokens: bool = False) -> None:
        """A ``SamplingError`` (a CookbookError: one line) naming the first bad value. Every generator calls this:
        ``cookbook generate``, ``distill generate`` and the server. ``allow_no_tokens``: max_tokens 0 is allowed
        (a request that only scores its prompt)."""
        least = 0 if allow_no_tokens else 1
        if not _whole(self.max_tokens) or self.max_tokens < least:
            raise SamplingError(f"max_tokens {self.max_tokens!r} must be an integer of at least {least}", "max_tokens")
        if not _finite(self.temperature) or self.temperature < 0:
            raise SamplingError(
                f"temperature {self.temperature!r} must be a finite number >= 0 (0 = greedy)", "temperature"
            )
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p {self.top_p!r} must be a number in (0, 1] (1 = off)", "top_p")
        if not _whole(self.top_k) or self.top_k < 0:
            raise SamplingError(f"top_k {self.top_k!r} must be an integer >= 0 (0 = off)", "top_k")
        if not _whole(self.n) or self.n < 1:
            raise SamplingError(f"n {self.n!r} must be an integer of at least 1", "n")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not _finite(value) or not -2 <= value <= 2:
                raise SamplingError(f"{name} {value!r} must be a number in [-2, 2] (as in OpenAI's API)", name)
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise SamplingError(
                f"repetition_penalty {self.repetition_penalty!r} must be a finite number > 0 (1 = off)",
                "repetition_penalty",
            )
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise SamplingError("a stop string is empty or not a string", "stop")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalised(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0

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


def cut_at_stop(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    """(text before the earliest stop string, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def check_seed(seed) -> int:
    if not _whole(seed) or not -SEED_MAX - 1 <= seed <= SEED_MAX:
        raise SamplingError(f"seed {seed!r} must be an integer in the int64 range", "seed")
    return seed


def sample_seed(seed: int, sample: int) -> int:
    """The seed of sample ``sample`` of a prompt: ``seed`` itself for the first, a splitmix64 mix of both for the
    others, so samples of one prompt differ and each is reproducible alone."""
    if sample == 0:
        return seed
    x = (seed + sample * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & SEED_MAX


# --------------------------------------------------------------------------- the sampler


def filter_logits(logits: torch.Tensor, top_k=None, top_p=None) -> torch.Tensor:
    """logits [..., vocab] with the tokens outside the top ``top_k`` and outside the nucleus set to -inf; ``top_k``
    and ``top_p`` are numbers or per-row tensors [...] (top_k >= vocab or top_p = 1: off). Top-k keeps ties with the
    k-th value (as HF's TopKLogitsWarper); the nucleus is the smallest set of most likely tokens whose probabilities
    sum to at least ``top_p``, taken after top-k."""
    if top_k is None and top_p is None:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        k = torch.as_tensor(top_k, device=logits.device).clamp(1, logits.shape[-1]).expand(logits.shape[:-1])
        kth = sorted_logits.gather(-1, (k - 1)[..., None])
        drop |= sorted_logits < kth
    if top_p is not None:
        p = torch.as_tensor(top_p, dtype=torch.float32, device=logits.device).expand(logits.shape[:-1])
        probs = sorted_logits.float().masked_fill(drop, float("-inf")).softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens: drop once it reaches top_p
        drop |= before >= p[..., None]
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def apply_penalties(
    logits: torch.Tensor,
    counts: torch.Tensor,
    in_prompt: torch.Tensor | None,
    repetition_penalty,
    frequency_penalty,
    presence_penalty,
) -> torch.Tensor:
    """vLLM's penalties on raw logits [batch, vocab] (in fp32), in its order; each penalty a number or a per-row
    tensor [batch]. ``counts`` [batch, vocab] holds how often each token was generated so far, ``in_prompt``
    [batch, vocab] whether it is in the row's prompt (None: nowhere).

    repetition (CTRL, HF ``RepetitionPenaltyLogitsProcessor``): a token in the prompt or the generated tokens has
    its logit divided by r when positive, multiplied by r otherwise; frequency and presence (OpenAI): logit -=
    f * count + p * (count > 0), over the generated tokens only. At 1, 0, 0 no logit changes."""

    def column(value):
        return torch.as_tensor(value, dtype=torch.float32, device=logits.device).reshape(-1, 1)

    logits = logits.float()
    generated = counts > 0
    r, f, p = column(repetition_penalty), column(frequency_penalty), column(presence_penalty)
    seen = generated if in_prompt is None else generated | in_prompt
    logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    return logits - f * counts - p * generated.float()


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """One token per row from logits [rows, vocab] -> [rows]. Rows whose generator is None are greedy (argmax);
    the others divide by their ``temperature`` [rows], keep their ``top_k`` / ``top_p`` [rows] (None: off for all)
    and draw with their own generator."""
    tokens = logits.argmax(dim=-1)
    drawn = [i for i, g in enumerate(generators) if g is not None]
    if not drawn:
        return tokens
    rows = torch.tensor(drawn, device=logits.device)
    x = logits[rows].float() / temperature[rows, None]
    x = filter_logits(x, None if top_k is None else top_k[rows], None if top_p is None else top_p[rows])
    probs = x.softmax(dim=-1)
    race = torch.empty_like(probs)
    for j, i in enumerate(drawn):
        race[j].exponential_(generator=generators[i])
    choice = (probs / race.clamp_min_(1e-30)).argmax(dim=-1)  # a zero draw must not pick a token of probability 0
    return tokens.index_copy(0, rows, choice)
