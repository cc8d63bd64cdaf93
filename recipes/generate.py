"""Sampling from a model with a KV cache: the core that ``cookbook generate`` and ``distill generate`` call.

Prompts of different lengths share one batch right-padded: every row keeps its own positions (0, 1, ... from
its first token) and writes its keys and values at those positions in the cache, so the causal mask alone keeps
padding out of sight (a row's padding slots are overwritten by its own generated tokens before any of its
queries reaches them). Under greedy decoding a prompt's tokens do not depend on which prompts share its batch.

The prompt is one forward (prefill), then one token per forward. Sampling follows HF transformers' order:
temperature, then top-k, then top-p; temperature 0 is greedy. Before them, on the raw logits, come the penalties
as vLLM applies them (repetition, then frequency and presence; all off by default, and then no logit changes).
One ``torch.Generator`` seeded from ``seed`` draws for the whole batch, so a run is reproducible for the same
prompts in the same order.

Length: a prompt plus its new tokens may run past ``model.config.max_seq_len``; RoPE is computed for any
position, and whether the model is any good there is the business of its rope scaling (``cookbook extend``).
With dynamic NTK scaling the frequencies follow the furthest position of each forward, as in HF transformers'
cached generation: keys already cached keep the rotation they were stored with, so past ``max_seq_len`` cached
logits differ from a full forward over the same tokens (exactly as in HF), and in a batch the furthest row sets
the frequencies for all rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from cookbook.errors import CookbookError
from cookbook.model.model import KVCache


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits [..., vocab] with the tokens outside the top ``top_k`` and outside the nucleus set to -inf. The
    nucleus is the smallest set of most likely tokens whose probabilities sum to at least ``top_p``."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens: drop once it reaches top_p
        drop_sorted = before >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from logits [batch, vocab] -> [batch]; temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, repetition_penalty: float = 1.0) -> None:
    if temperature < 0:
        raise CookbookError(f"temperature {temperature} is negative; use 0 for greedy decoding or a positive value")
    if top_k is not None and top_k < 1:
        raise CookbookError(f"top_k {top_k} keeps no token; use 1 or more, or leave it unset")
    if top_p is not None and not 0 < top_p <= 1:
        raise CookbookError(f"top_p {top_p} is not in (0, 1]; use for example 0.9, or leave it unset")
    if repetition_penalty <= 0:
        raise CookbookError(f"repetition_penalty {repetition_penalty} must be positive (1 = off)")


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, in_prompt: torch.Tensor | None,
                    repetition_penalty: float, frequency_penalty: float, presence_penalty: float) -> torch.Tensor:
    """vLLM's penalties on raw logits [batch, vocab] (in fp32), in its order. ``counts`` [batch, vocab] holds how
    often each token was generated so far, ``in_prompt`` [batch, vocab] whether it is in the row's prompt.

    repetition (CTRL, HF ``RepetitionPenaltyLogitsProcessor``): a token in the prompt or the generated tokens has
    its logit divided by r when positive, multiplied by r otherwise; frequency and presence (OpenAI): logit -=
    f * count + p * (count > 0), over the generated tokens only."""
    logits = logits.float()
    generated = counts > 0
    if repetition_penalty != 1.0:
        seen = generated if in_prompt is None else generated | in_prompt
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if frequency_penalty != 0.0:
        logits = logits - frequency_penalty * counts
    if presence_penalty != 0.0:
        logits = logits - presence_penalty * generated.float()
    return logits


@torch.no_grad()
def generate(model, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None, seed: int = 0,
             pad_id: int = 0, repetition_penalty: float = 1.0, frequency_penalty: float = 0.0,
             presence_penalty: float = 0.0, stop_ids: Sequence[int] = (),
             stop_when: Callable[[dict[int, list[int]]], Iterable[int]] | None = None,
             stop_when_every: int = 8) -> list[list[int]]:
    """Returns the new tokens of each prompt. A row ends at ``eos_id`` or any of ``stop_ids`` (the token is
    included in its tokens), or when ``stop_when`` names it: every ``stop_when_every`` steps it gets
    {row: its tokens so far} for the rows still running and returns the rows to end there (a stop string seen
    in their text, say). Penalties (off at their defaults) act on the raw logits before temperature, top-k and
    top-p, as in vLLM; see ``apply_penalties``."""
    check_sampling(temperature, top_k, top_p, repetition_penalty)
    vocab = model.config.vocab_size
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise CookbookError(f"prompt {i} is empty; every prompt needs at least one token")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise CookbookError(f"prompt {i} holds a token id outside the vocabulary [0, {vocab}); check the tokenizer")
    if not prompts or max_new_tokens <= 0:
        return [[] for _ in prompts]

    weight = next(model.parameters())
    device, dtype = weight.device, weight.dtype
    batch, longest = len(prompts), max(len(p) for p in prompts)
    tokens = torch.full((batch, longest), pad_id, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        tokens[i, : len(prompt)] = torch.tensor(prompt)
    tokens = tokens.to(device)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    rows = torch.arange(batch, device=device)

    cache = KVCache(model.config, batch, longest + max_new_tokens, device=device, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    produced = torch.zeros(batch, dtype=torch.long, device=device)  # tokens each row keeps
    ends = sorted(set(stop_ids) | ({eos_id} if eos_id is not None else set()))
    ends = torch.tensor(ends, dtype=torch.long, device=device) if ends else None

    penalised = repetition_penalty != 1.0 or frequency_penalty != 0.0 or presence_penalty != 0.0
    if penalised:
        counts = torch.zeros(batch, vocab, device=device)  # how often each row generated each token
        in_prompt = None
        if repetition_penalty != 1.0:  # the prompt's tokens, padding left out (it goes to a spare column)
            padding = torch.arange(longest, device=device)[None] >= lengths[:, None]
            in_prompt = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=device)
            in_prompt = in_prompt.scatter_(1, tokens.masked_fill(padding, vocab), True)[:, :vocab]
        ones = torch.ones(batch, 1, device=device)

    logits = model(tokens, cache=cache, last=lengths - 1)[:, -1]  # prefill: logits of each row's last prompt token only
    positions = lengths.clone()
    for step in range(max_new_tokens):
        if penalised:
            logits = apply_penalties(logits, counts, in_prompt, repetition_penalty, frequency_penalty, presence_penalty)
        token = sample_next(logits, temperature, top_k, top_p, generator)
        out[:, step] = token.masked_fill(done, pad_id)
        produced += ~done
        if ends is not None:
            done |= torch.isin(token, ends)
        if stop_when is not None and (step + 1) % stop_when_every == 0 and step < max_new_tokens - 1:
            running = (~done).nonzero().flatten().tolist()
            if running:
                so_far = out[running, : step + 1].tolist()
                ended = list(stop_when({r: row for r, row in zip(running, so_far)}))
                if ended:
                    done[torch.tensor(ended, dtype=torch.long, device=device)] = True
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if penalised:
            counts.scatter_add_(1, token[:, None], ones)
        logits = model(token[:, None], positions[:, None], cache=cache)[:, -1]
        positions += 1

    return [row[:n] for row, n in zip(out.tolist(), produced.tolist())]


# --------------------------------------------------------------------------- the command


@dataclass
class GenerateConfig:
    load: str  # a cookbook checkpoint or a Hugging Face model folder
    prompts: list[str]  # given on the command line
    prompts_file: str | None = None  # jsonl ({"text": ...} per line) or plain text (one prompt per line)
    text_key: str = "text"
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    batch_size: int = 8
    tokenizer_model: str | None = None
    tokenizer_type: str | None = None
    device: str = "auto"
    dtype: str = "fp32"
    output: str | None = None  # jsonl of {"prompt", "text"}; default: print


def read_prompts(cfg: GenerateConfig) -> list[str]:
    prompts = list(cfg.prompts)
    if cfg.prompts_file:
        path = Path(cfg.prompts_file)
        if not path.is_file():
            raise CookbookError(f"--prompts-file {path} does not exist")
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if path.suffix == ".jsonl":
            for n, line in enumerate(lines, 1):
                try:
                    prompts.append(json.loads(line)[cfg.text_key])
                except (ValueError, KeyError, TypeError):
                    raise CookbookError(f"{path}:{n} is not a JSON object with a {cfg.text_key!r} key") from None
        else:
            prompts += lines
    if not prompts:
        raise CookbookError("no prompts; pass --prompt TEXT or --prompts-file FILE")
    return prompts


def run(cfg: GenerateConfig, on_result=None) -> list[dict]:
    """Generate for every prompt, ``batch_size`` at a time; ``on_result(record)`` as each finishes."""
    from cookbook.fileio import check_writable, write_text_atomic
    from cookbook.progress import console
    from inference_distill.local import load_teacher

    check_sampling(cfg.temperature, cfg.top_k, cfg.top_p)
    if cfg.batch_size < 1 or cfg.max_new_tokens < 1:
        raise CookbookError("--batch-size and --max-new-tokens must be at least 1")
    if cfg.output:
        check_writable(cfg.output, "--output")
    prompts = read_prompts(cfg)
    model, tokenizer = load_teacher(cfg.load, cfg.device, cfg.dtype, cfg.tokenizer_model, cfg.tokenizer_type)
    records = []
    with Progress(TextColumn("[bold]generate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("generate", total=len(prompts))
        for start in range(0, len(prompts), cfg.batch_size):
            chunk = prompts[start : start + cfg.batch_size]
            ids = [tokenizer.tokenize(p) for p in chunk]
            new = generate(model, ids, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                           eos_id=tokenizer.eod, seed=cfg.seed + start)
            for prompt, tokens in zip(chunk, new):
                text = tokenizer.decode([t for t in tokens if t != tokenizer.eod])
                record = {"prompt": prompt, "text": text, "tokens": len(tokens)}
                records.append(record)
                if on_result is not None:
                    on_result(record)
            progress.advance(task, len(chunk))
    if cfg.output:
        write_text_atomic(cfg.output, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records
