"""Log-probabilities of tokens under a model: what ``logprobs`` / ``echo`` answer and what lm-evaluation-harness
scores with.

Every number is a log-softmax in fp32 of the model's raw logits (whatever the model's dtype), before penalties,
temperature, top-k or top-p: the model's own distribution, as vLLM reports by default. So a token sampled at
temperature 0.7 has the logprob the model gives it, not the logprob of the tempered distribution it was drawn from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # the most alternatives a request may ask for per token (OpenAI's legacy limit)
_ELEMENTS = 1 << 26  # logits upcast to fp32 at a time (256 MB)


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the k most likely tokens, most likely first: (id, logprob)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int = 0) -> list[TokenLogprob]:
    """For each row of ``logits`` [rows, vocab], the logprob of ``tokens`` [rows] and the ``k`` most likely tokens;
    fp32 log-softmax, in chunks that bound the memory of the upcast."""
    out: list[TokenLogprob] = []
    rows = max(1, _ELEMENTS // max(1, logits.shape[-1]))
    for start in range(0, logits.shape[0], rows):
        lp = torch.log_softmax(logits[start : start + rows].float(), dim=-1)
        chosen = lp.gather(-1, tokens[start : start + rows, None].long())[:, 0].tolist()
        if k:
            values, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
            tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        else:
            tops = [()] * len(chosen)
        ids = tokens[start : start + rows].tolist()
        out += [TokenLogprob(t, c, top) for t, c, top in zip(ids, chosen, tops)]
    return out


@torch.no_grad()
def score(model, sequences: list[list[int]], scored: list[int], max_tokens: int = 8192) -> list[tuple[float, bool]]:
    """(sum of logprobs, greedy) of the last ``scored[i]`` tokens of each sequence, each predicted from the tokens
    before it: the model reads ``sequence[:-1]``. ``greedy``: every scored token is the argmax (what
    lm-evaluation-harness calls is_greedy). Sequences are sorted by length (longest first) and right-padded into
    batches of at most ``max_tokens`` tokens; causal attention keeps padding out of every real position."""
    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    results: list[tuple[float, bool] | None] = [None] * len(sequences)
    start = 0
    while start < len(order):
        longest = len(sequences[order[start]]) - 1
        size = max(1, max_tokens // max(1, longest))
        batch = order[start : start + size]
        tokens = torch.zeros(len(batch), longest, dtype=torch.long)
        for row, i in enumerate(batch):
            seq = sequences[i][:-1]
            tokens[row, : len(seq)] = torch.tensor(seq)
        logits = model(tokens.to(device))
        for row, i in enumerate(batch):
            n, length = scored[i], len(sequences[i]) - 1
            targets = torch.tensor(sequences[i][-n:], device=device)
            picked = logits[row, length - n : length]
            lp = token_logprobs(picked, targets)
            greedy = bool((picked.argmax(dim=-1) == targets).all())
            results[i] = (float(sum(t.logprob for t in lp)), greedy)
        start += len(batch)
    return results  # type: ignore[return-value]
