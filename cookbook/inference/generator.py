"""Completions of prompts from a model in this process: ``generate`` (token ids in, token ids out) and
``LocalGenerator`` (text or ids in, ``Completion`` out: what ``cookbook generate``, ``distill generate --backend
cookbook`` and ``cookbook serve`` make), both on the engine (``cookbook.inference.engine``).

How a completion is made, so that the same request means what it means in vLLM:

- Text prompts become ids with ``TextCodec.encode`` (Megatron-LM's ``tokenize``: BOS and the like as the tokenizer
  adds them).
- ``n`` samples of a prompt are ``n`` rows, seeded ``sample_seed(seed, j)``: the same prompt, seed and parameters
  give the same completions alone or among other prompts. Rows are submitted longest prompt first, so that prefill
  groups carry little padding; results come back in the prompts' order.
- A completion's text is the continuation decoded in the context of its prompt (vLLM does the same: a SentencePiece
  piece "▁word" keeps its space), eos removed, and cut before the first stop string. A row ends at eos, at a token
  whose own text holds a stop string (checked once per vocabulary and stop list), or, for stop strings that span
  tokens, at the next look at its decoded text every few of its tokens.
- ``finish_reason`` is "stop" for eos or a stop string, "length" when ``max_tokens`` ran out.
- ``tokens`` counts the generated tokens up to and including eos, or, when a stop string cut the text, up to and
  including the token that completed the stop string (what vLLM reports; the few tokens generated past it before
  the look saw it are not counted).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from cookbook.errors import CookbookError
from cookbook.inference.engine import Engine
from cookbook.inference.engine import Sequence as Row
from cookbook.inference.sampling import Completion, Progress, SamplingParams, cut_at_stop, sample_seed
from cookbook.inference.text import TextCodec


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int = 0,
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    stop_ids: Sequence[int] = (),
    stop_when: Callable[[list[int]], bool] | None = None,
    batch_size: int | None = None,
) -> list[list[int]]:
    """The new tokens of each prompt (token ids), every prompt sampled with ``seed``. A row ends at ``eos_id`` or
    any of ``stop_ids`` (the token is included), or when ``stop_when(its tokens so far)`` is true (asked every
    ``STOP_CHECK_EVERY`` of its tokens). ``batch_size``: rows decoded together (default: all). A prompt plus its
    new tokens may run past ``model.config.max_seq_len``: RoPE is computed for any position."""
    params = SamplingParams(
        max_tokens=max_new_tokens,
        temperature=temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=top_k or 0,
        repetition_penalty=repetition_penalty,
        frequency_penalty=frequency_penalty,
        presence_penalty=presence_penalty,
    )
    params.check(allow_no_tokens=True)
    if not prompts or max_new_tokens == 0:
        for i, p in enumerate(prompts):
            _check_prompt(p, i, model.config.vocab_size)
        return [[] for _ in prompts]
    for i, p in enumerate(prompts):
        _check_prompt(p, i, model.config.vocab_size)
    rows = [Row(list(p), params, seed=seed, stop_ids=frozenset(stop_ids), stop_check=stop_when) for p in prompts]
    longest = max(len(p) for p in prompts) + max_new_tokens
    engine = Engine(model, eos_id=eos_id, max_batch_size=batch_size or len(prompts), max_model_len=longest)
    engine.run(rows)
    return [r.tokens for r in rows]


def _check_prompt(prompt: Sequence[int], i: int, vocab: int) -> None:
    if not prompt:
        raise CookbookError(f"prompt {i} is empty; every prompt needs at least one token")
    if min(prompt) < 0 or max(prompt) >= vocab:
        raise CookbookError(f"prompt {i} holds a token id outside the vocabulary [0, {vocab}); check the tokenizer")


class LocalGenerator:
    """A model and its tokenizer, completing prompts (see the module's docstring)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.text = TextCodec(tokenizer, model.config.vocab_size)
        self.eos = tokenizer.eod
        self.vocab_size = self.text.vocab_size  # ids the tokenizer can decode
        self._stop_ids: dict[tuple[str, ...], list[int]] = {}

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str = "auto",
        dtype: str = "auto",
        tokenizer_model: str | None = None,
        tokenizer_type: str | None = None,
    ) -> LocalGenerator:
        from cookbook.inference.load import load_model_and_tokenizer

        return cls(*load_model_and_tokenizer(path, device, dtype, tokenizer_model, tokenizer_type))

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        return self.text.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]

    def decode(self, ids: Sequence[int]) -> str:
        return self.text.decode(ids)

    def continuation(self, prompt: list[int], new: Sequence[int]) -> str:
        return self.text.continuation(prompt, new)

    def stop_ids(self, stop: tuple[str, ...]) -> list[int]:
        """Tokens whose own text holds a stop string: generating one ends the row (its text is then cut there)."""
        if stop not in self._stop_ids:
            found = []
            if stop and not any("\ufffd" in s for s in stop):  # a lone byte of a character decodes to U+FFFD
                for t in range(self.vocab_size):
                    text = self.tokenizer.decode([t])
                    if any(s in text for s in stop):
                        found.append(t)
            if len(self._stop_ids) >= 256:  # a server sees many stop lists: keep the cache small
                self._stop_ids.clear()
            self._stop_ids[stop] = found
        return self._stop_ids[stop]

    def rows(
        self, prompt: list[int], params: SamplingParams, seed: int | None, stop_ids: Sequence[int] = (), **options
    ) -> list[Row]:
        """The engine rows of ``params.n`` samples of one prompt (token ids); ``options`` go to each ``Row``."""
        ends = frozenset(stop_ids) | frozenset(self.stop_ids(params.stop))
        check = None
        if params.stop:

            def check(tokens: list[int]) -> bool:
                return cut_at_stop(self.continuation(prompt, tokens), params.stop)[1]

        return [
            Row(
                prompt,
                params,
                seed=None if seed is None else sample_seed(seed, j),
                stop_ids=ends,
                stop_check=check,
                **options,
            )
            for j in range(params.n)
        ]

    def finish(self, row: Row, stop_ids: Sequence[int] = ()) -> Completion:
        """A finished row as a Completion: the text cut at the first stop string, the tokens it took."""
        prompt, new, params = row.prompt, row.tokens, row.params
        text, found = cut_at_stop(self.continuation(prompt, new), params.stop)
        if found:
            lo, hi = 1, len(new)  # the fewest tokens whose text already holds a stop string
            while lo < hi:
                mid = (lo + hi) // 2
                if cut_at_stop(self.continuation(prompt, new[:mid]), params.stop)[1]:
                    hi = mid
                else:
                    lo = mid + 1
            return Completion(text, lo, "stop")
        ends = set(stop_ids) | ({self.eos} if self.eos is not None else set())
        ended = bool(new) and (new[-1] in ends or len(new) < params.max_tokens)
        return Completion(text, len(new), "stop" if ended else "length")

    def complete(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams,
        seeds: list[int],
        batch_size: int = 16,
        on_progress: Progress | None = None,
        stop_ids: Sequence[int] = (),
    ) -> list[list[Completion]]:
        """``params.n`` completions per prompt (text, or token ids used as they are), in the prompts' order.
        ``seeds[i]`` belongs to prompt i; ``stop_ids`` are extra tokens that end a completion as eos does (vLLM's
        ``stop_token_ids``); ``batch_size`` rows decode together. ``on_progress(prompts, tokens)`` as work is
        done: the prompts whose completions all finished and the tokens generated since the last call."""
        params.check()
        if len(seeds) != len(prompts):
            raise CookbookError(f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
        if batch_size < 1:
            raise CookbookError(f"batch size {batch_size} must be at least 1")
        ids = [self.encode(p) for p in prompts]
        for i, p in enumerate(ids):
            _check_prompt(p, i, self.vocab_size)
        left = [params.n] * len(ids)  # rows of each prompt still running
        done = {"prompts": 0, "tokens": 0}  # since the last report

        prompt_of: dict[int, int] = {}  # id(row) -> its prompt
        counted: dict[int, int] = {}  # id(row) -> tokens reported

        def count(row: Row) -> None:  # in the engine, after each of the row's steps
            key = id(row)
            done["tokens"] += len(row.tokens) - counted.get(key, 0)
            counted[key] = len(row.tokens)
            if row.done:
                left[prompt_of[key]] -= 1
                done["prompts"] += left[prompt_of[key]] == 0

        def report() -> None:
            if on_progress is not None and (done["prompts"] or done["tokens"]):
                on_progress(done["prompts"], done["tokens"])
            done.update(prompts=0, tokens=0)

        rows = [self.rows(p, params, seed, stop_ids, on_step=count) for p, seed in zip(ids, seeds)]
        prompt_of.update((id(r), i) for i, rs in enumerate(rows) for r in rs)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))  # stable: equal lengths keep their order
        longest = max((len(p) for p in ids), default=0) + params.max_tokens
        engine = Engine(
            self.model,
            eos_id=self.eos,
            max_batch_size=batch_size,
            max_model_len=max(longest, self.model.config.max_seq_len),
        )
        engine.run([r for i in order for r in rows[i]], after_step=report)
        return [[self.finish(r, stop_ids) for r in rs] for rs in rows]
