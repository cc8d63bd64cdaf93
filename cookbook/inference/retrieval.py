"""Retrieval from a long context (``cookbook eval --passkey`` and ``--recall``): can a model find what was said at a
chosen depth of its window?

**Passkey** is the test of Mohtashami & Jaggi (2023), used by the Position Interpolation paper: a random
``digits``-digit pass key sits inside repeated filler text; the prompt ends with a question, and the model's greedy
continuation must start with the key::

    [BOS] [intro] [filler ...] [The pass key is 71432. Remember it. 71432 is the pass key.] [... filler] [question]
                  |<-- depth x filler -->|

**Recall** is key-value recall among distractors (RULER's multi-key needle in a haystack): ``keys`` sentences
"The value of <name> is <number>." sit in the filler, each under a different name; the question asks for one of them
by name. The asked one sits at ``depth``, the others at random depths, so a model must match the name, not merely
find the one sentence that is not filler::

    [BOS] [intro] [filler] [The value of node is 20417.] [filler] [The value of path is 93178.] ... [question]

A prompt is exactly ``length`` tokens: the pieces are tokenized apart (without the tokenizer's BOS) and joined, and
the tokenizer's prefix (Llama's BOS) starts the prompt once, so lengths are exact for any tokenizer. Accuracy is
reported per (length, depth) over ``trials`` prompts; the keys come from ``seed``, so runs compare. The share of the
key's digits written in their place gives partial credit (a model that copies some of the key, or its digits out of
order, scores between chance, 0.1, and 1).

``document`` writes the same prompts followed by their answer and EOD: training documents that teach a model to
retrieve (``write_documents`` writes them as an indexed dataset; scripts/extend_experiment.sh).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from cookbook.errors import CookbookError

TASKS = ("passkey", "recall")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
INTRO = {
    "passkey": "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n",
    "recall": "Several names have values hidden inside a lot of irrelevant text. Find them and memorize them. "
    "I will quiz you about one of them.\n",
}
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
RECALL_NEEDLE = "The value of {name} is {key}.\n"
QUESTION = "What is the pass key? The pass key is"
RECALL_QUESTION = "What is the value of {name}? The value of {name} is"
# the names of recall's keys: common words of English and of code
NAMES = (
    "file path line node table block frame group queue stack thread socket buffer window event signal option message "
    "header module package server client target source number string object method filter parser reader writer "
    "format pattern handler context counter color point engine button cursor policy member parent child order state "
    "index level range limit label title field store"
).split()


@dataclass
class RetrievalTrial:
    length: int
    depth: float
    key: str
    answer: str  # the decoded continuation
    correct: bool
    digits_right: float  # the share of the key's digits the answer has in their place (partial credit)


@dataclass
class Needles:
    """What one prompt hides and asks: ``sentences`` at their depths (the asked one first), and the ``question``;
    ``others``: the questions and keys of the other sentences (a training document asks them all)."""

    key: str
    sentences: list[tuple[float, str]]
    question: str
    others: list[tuple[str, str]] = field(default_factory=list)


def passkey_needles(key: str, depth: float) -> Needles:
    return Needles(key, [(depth, NEEDLE.format(key=key))], QUESTION)


def draw(task: str, rng: random.Random, depth: float, digits: int = 5, keys: int = 4) -> Needles:
    """A random prompt's needles: a ``digits``-digit key at ``depth``; for recall, ``keys`` named values."""
    if task not in TASKS:
        raise CookbookError(f"unknown retrieval task {task!r}; choose one of {', '.join(TASKS)}")
    if not 0 <= depth <= 1:
        raise CookbookError(f"{task} depth {depth} is not in [0, 1]")
    if digits < 1:
        raise CookbookError(f"--digits {digits} must be at least 1")

    def number() -> str:
        return str(rng.randrange(10 ** (digits - 1), 10**digits))

    if task == "passkey":
        return passkey_needles(number(), depth)
    if not 1 <= keys <= len(NAMES):
        raise CookbookError(f"--recall-keys {keys} must be between 1 and {len(NAMES)}")
    names = rng.sample(NAMES, keys)
    values = [number() for _ in names]
    depths = [depth] + [rng.random() for _ in names[1:]]
    sentences = [(d, RECALL_NEEDLE.format(name=n, key=v)) for d, n, v in zip(depths, names, values, strict=True)]
    others = [(RECALL_QUESTION.format(name=n), v) for n, v in zip(names[1:], values[1:], strict=True)]
    return Needles(values[0], sentences, RECALL_QUESTION.format(name=names[0]), others)


def prompt(tokenizer, task: str, length: int, needles: Needles, tail: list[int] = ()) -> list[int]:
    """Token ids of exactly ``length`` tokens: BOS, the intro, filler with the needles at their depths, the
    question, and ``tail`` (a training document's answer and EOD)."""

    def piece(text: str) -> list[int]:
        return list(tokenizer.exact(text))

    head = list(tokenizer.prefix) + piece(INTRO[task])
    placed = [(depth, piece(text)) for depth, text in needles.sentences]
    end = piece(needles.question) + list(tail)
    unit = piece(FILLER)
    room = length - len(head) - sum(len(ids) for _, ids in placed) - len(end)
    if room < 0 or not unit:
        need = length - room
        raise CookbookError(
            f"a {task} prompt needs at least {need} tokens with this tokenizer; {length} is too short: "
            "use a longer --seq-length"
        )
    filler = (unit * (room // len(unit) + 1))[:room]
    out, at = head, 0
    for depth, ids in sorted(placed, key=lambda p: p[0]):
        cut = round(depth * room)
        out += filler[at:cut] + ids
        at = cut
    return out + filler[at:] + end


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> list[int]:
    """The passkey prompt of ``length`` tokens with ``key`` after a ``depth`` (0..1) share of the filler."""
    return prompt(tokenizer, "passkey", length, passkey_needles(key, depth))


def document(tokenizer, task: str, length: int, rng: random.Random, digits: int = 5, keys: int = 4) -> list[int]:
    """A training document of exactly ``length`` tokens: a prompt with a random depth and random keys, then its
    answer, and EOD. A recall document then asks for every other value too, one line each (several answers to
    learn from per document, as in multi-query associative recall)."""
    if tokenizer.eod is None:
        raise CookbookError("the tokenizer has no end-of-document token to end each retrieval document with")
    needles = draw(task, rng, rng.random(), digits, keys)
    answers = f" {needles.key}" + "".join(f"\n{question} {key}" for question, key in needles.others)
    return prompt(
        tokenizer, task, length, needles, tail=[*answer_tokens(tokenizer, needles.question, answers), tokenizer.eod]
    )


def answer_tokens(tokenizer, question: str, answer: str) -> list[int]:
    """The tokens of ``answer`` as they follow ``question``: tokenized with it, as the model sees them
    (SentencePiece's dummy prefix would double the space of a piece tokenized alone)."""
    asked = list(tokenizer.exact(question))
    joined = list(tokenizer.exact(question + answer))
    return joined[len(asked) :] if joined[: len(asked)] == asked else list(tokenizer.exact(answer))


def write_documents(
    prefix, tokenizer, tasks: list[str], length: int, count: int, seed: int = 0, digits: int = 5, keys: int = 4
):
    """``count`` training documents of exactly ``length`` tokens, the ``tasks`` in turn, as the indexed dataset
    ``PREFIX.bin/.idx`` (written under temporary names, renamed when complete). Trained at a sequence length of
    ``length``, every sample is one whole document: the answer's distance from its needle spans the window."""
    import numpy as np

    from cookbook.data.indexed import IndexedDatasetWriter, optimal_dtype

    rng = random.Random(seed)
    with IndexedDatasetWriter(prefix, optimal_dtype(tokenizer.vocab_size)) as out:
        for i in range(count):
            ids = np.asarray(document(tokenizer, tasks[i % len(tasks)], length, rng, digits, keys), np.int64)
            out.add_documents(ids, np.asarray([len(ids)], np.int64))
    return prefix


def read_answer(text: str) -> str:
    """The first run of digits in a continuation ('' when there is none)."""
    match = re.search(r"\d+", text)
    return match.group(0) if match else ""


def score(length: int, depth: float, key: str, answer: str) -> RetrievalTrial:
    """A trial: right when the first digits written are the key; partial credit per digit in its place."""
    digits = read_answer(answer)
    right = sum(a == b for a, b in zip(digits, key)) / len(key)
    return RetrievalTrial(length, depth, key, answer, digits == key, right)


def retrieval_eval(
    model,
    tokenizer,
    task: str,
    lengths: list[int],
    depths: list[float],
    trials: int = 5,
    digits: int = 5,
    keys: int = 4,
    seed: int = 0,
    batch_size: int = 8,
) -> list[RetrievalTrial]:
    """Greedy continuation of ``trials`` random prompts at every (length, depth); a trial is right when the first
    digits written are the key. A batch holds prompts of one length (with dynamic NTK the longest row of a batch
    would set the frequencies of all)."""
    from cookbook.inference.generator import generate

    new_tokens = len(tokenizer.exact(" " + "9" * digits)) + 2  # the key and a little slack
    drawn = cases(task, lengths, depths, trials, digits, keys, seed)
    results = []
    for length in lengths:
        these = [(depth, needles) for n, depth, needles in drawn if n == length]
        prompts = [prompt(tokenizer, task, length, needles) for _, needles in these]
        for start in range(0, len(these), batch_size):
            outputs = generate(model, prompts[start : start + batch_size], new_tokens, temperature=0.0)
            for (depth, needles), out in zip(these[start : start + batch_size], outputs, strict=True):
                results.append(score(length, depth, needles.key, tokenizer.decode(out)))
    return results


def cases(
    task: str, lengths: list[int], depths: list[float], trials: int, digits: int, keys: int, seed: int
) -> list[tuple[int, float, Needles]]:
    """The (length, depth, needles) of every trial, in order, drawn from ``seed``: the same for the accuracy and the
    attention."""
    if trials < 1:
        raise CookbookError(f"--trials {trials} must be at least 1")
    rng = random.Random(seed)
    return [
        (n, depth, draw(task, rng, depth, digits, keys)) for n in lengths for depth in depths for _ in range(trials)
    ]


@dataclass
class NeedleAttention:
    """Where one attention head looks while the key is written (means over the key's tokens, teacher-forced, and over
    trials): ``share`` of its attention on the asked needle's tokens; ``copy``, on the needle's copy of the token
    about to be written (an induction head copying the key in order puts its attention there); ``share_chance`` and
    ``copy_chance``, the same for a head that looks at every token it can see alike; ``distance``, the mean distance
    in tokens from the writing token to what the head attends to."""

    length: int
    depth: float
    layer: int
    head: int
    share: float
    copy: float
    share_chance: float
    copy_chance: float
    distance: float


def needle_attention(
    model, tokenizer, task: str, lengths: list[int], depths: list[float], trials: int = 5, digits: int = 5,
    keys: int = 4, seed: int = 0
) -> list[NeedleAttention]:  # fmt: skip
    """Per (length, depth, layer, head): how much attention the model pays to the needle while it writes the key.

    Each prompt of ``length`` tokens is followed by its answer (as a training document), and every attention layer's
    weights are recomputed from its queries and keys for the positions that predict the answer's tokens: the last
    token of the question, then the key's tokens but its last. A model that retrieves has a head whose share is far
    above chance; one whose attention spreads out past the length it was trained at (RoPE extrapolating) loses it."""
    import math

    import torch

    from cookbook.model.model import repeat_kv

    drawn = cases(task, lengths, depths, trials, digits, keys, seed)
    layers = list(model.layers.values())
    seen: list[torch.Tensor] = []  # per layer, the weights [heads, queries, keys] of the current prompt

    def recording(attention, rows: list[int]):
        original = attention.attend

        def attend(q, k, v, cache=None, mask=None):
            keys_ = repeat_kv(k, q.shape[1])[0].float()
            scores = q[0, :, rows].float() @ keys_.transpose(-1, -2) / math.sqrt(q.shape[-1])
            causal = torch.arange(k.shape[2], device=k.device)[None] > torch.tensor(rows, device=k.device)[:, None]
            seen.append(torch.softmax(scores.masked_fill(causal, float("-inf")), -1).cpu())
            return original(q, k, v, cache, mask)

        return attend

    totals: dict = {}
    for length, depth, needles in drawn:
        tail = answer_tokens(tokenizer, needles.question, f" {needles.key}")
        ids = prompt(tokenizer, task, length, needles) + tail
        needle = list(tokenizer.exact(needles.sentences[0][1]))
        start = next(i for i in range(len(ids)) if ids[i : i + len(needle)] == needle)
        rows = list(range(length - 1, len(ids) - 1))  # the positions that predict the answer's tokens
        seen.clear()
        for layer in layers:
            layer.attention.attend = recording(layer.attention, rows)
        try:
            with torch.no_grad():
                model(torch.tensor([ids], device=next(model.parameters()).device))
        finally:
            for layer in layers:
                del layer.attention.attend
        # where the needle holds the answer (the key, with the space before it; twice in a passkey needle)
        copies = [p for p in range(start, start + len(needle)) if ids[p : p + len(tail)] == tail]
        away = (torch.tensor(rows)[:, None] - torch.arange(len(ids))[None]).clamp(min=0).float()
        chances = (
            sum(len(needle) / (row + 1) for row in rows) / len(rows),
            sum(len(copies) / (row + 1) for row in rows) / len(rows),
        )
        for layer, weights in enumerate(seen):
            share = weights[:, :, start : start + len(needle)].sum(-1).mean(-1)
            distance = (weights * away).sum(-1).mean(-1)
            order = torch.arange(len(rows))
            copy = sum(weights[:, order, p + order] for p in copies).mean(-1) if copies else share * 0
            for head in range(weights.shape[0]):
                values = (share[head].item(), copy[head].item(), *chances, distance[head].item())
                total = totals.setdefault((length, depth, layer, head), [0.0] * (len(values) + 1))
                for i, value in enumerate(values):
                    total[i] += value
                total[-1] += 1
    return [
        NeedleAttention(length, depth, layer, head, *(value / total[-1] for value in total[:-1]))
        for (length, depth, layer, head), total in totals.items()
    ]


def _mean_by(trials: list[RetrievalTrial], group, field: str) -> dict:
    groups: dict = {}
    for t in trials:
        groups.setdefault(group(t), []).append(float(getattr(t, field)))
    return {k: sum(v) / len(v) for k, v in groups.items()}


def accuracy(trials: list[RetrievalTrial], field: str = "correct") -> dict[tuple[int, float], float]:
    """Share of right answers per (length, depth), in the order first seen (``field="digits_right"``: of digits)."""
    return _mean_by(trials, lambda t: (t.length, t.depth), field)


def accuracy_by_length(trials: list[RetrievalTrial], field: str = "correct") -> dict[int, float]:
    """Share of right answers per length, over every depth (``field="digits_right"``: of digits)."""
    return _mean_by(trials, lambda t: t.length, field)


def copying_heads(heads: list[NeedleAttention]) -> list[NeedleAttention]:
    """Per (length, depth), the head that puts the most attention on the key's next token in the needle."""
    best: dict = {}
    for h in heads:
        if (h.length, h.depth) not in best or h.copy > best[h.length, h.depth].copy:
            best[h.length, h.depth] = h
    return list(best.values())
