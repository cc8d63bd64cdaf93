"""Passkey retrieval (``cookbook eval --passkey``): can a model retrieve a number hidden at a chosen depth of a long context?

The test of Mohtashami & Jaggi (2023), used by the Position Interpolation paper: a random ``digits``-digit pass key
sits inside repeated filler text; the prompt ends with a question, and the model's greedy continuation must start
with the key. A prompt is exactly ``length`` tokens (the pieces are tokenized apart and joined, so lengths are
exact for any tokenizer), with the key sentence placed after a fraction ``depth`` of the filler::

    [intro] [filler ... ] [The pass key is 71432. Remember it. 71432 is the pass key.] [... filler] [question]
            |<-- depth x filler -->|

Accuracy is reported per (length, depth) over ``trials`` keys; the keys come from ``seed``, so runs compare.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from cookbook.errors import CookbookError

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "What is the pass key? The pass key is"


@dataclass
class PasskeyTrial:
    length: int
    depth: float
    key: str
    answer: str  # the decoded continuation
    correct: bool


def passkey_prompt(tokenize, length: int, depth: float, key: str) -> list[int]:
    """Token ids of a prompt of exactly ``length`` tokens with ``key`` after a ``depth`` (0..1) share of the filler."""
    if not 0 <= depth <= 1:
        raise CookbookError(f"passkey depth {depth} is not in [0, 1]")
    intro, needle, question = tokenize(INTRO), tokenize(NEEDLE.format(key=key)), tokenize(QUESTION)
    unit = tokenize(FILLER)
    room = length - len(intro) - len(needle) - len(question)
    if room < 0 or not unit:
        raise CookbookError(
            f"a passkey prompt needs at least {len(intro) + len(needle) + len(question)} tokens with this tokenizer; "
            f"{length} is too short: use a longer --seq-length"
        )
    filler = (unit * (room // len(unit) + 1))[:room]
    cut = round(depth * room)
    return intro + filler[:cut] + needle + filler[cut:] + question


def read_answer(text: str) -> str:
    """The first run of digits in a continuation ('' when there is none)."""
    match = re.search(r"\d+", text)
    return match.group(0) if match else ""


def passkey_eval(
    model,
    tokenizer,
    lengths: list[int],
    depths: list[float],
    trials: int = 5,
    digits: int = 5,
    seed: int = 0,
    batch_size: int = 8,
) -> list[PasskeyTrial]:
    """Greedy retrieval of ``trials`` random keys at every (length, depth)."""
    from cookbook.inference.generator import generate

    if trials < 1 or digits < 1:
        raise CookbookError(f"--passkey-trials {trials} and --passkey-digits {digits} must be at least 1")
    rng = random.Random(seed)
    cases = [
        (length, depth, str(rng.randrange(10 ** (digits - 1), 10**digits)))
        for length in lengths
        for depth in depths
        for _ in range(trials)
    ]
    prompts = [passkey_prompt(tokenizer.tokenize, length, depth, key) for length, depth, key in cases]
    new_tokens = len(tokenizer.tokenize(" " + "9" * digits)) + 2  # the key and a little slack
    results = []
    for start in range(0, len(cases), batch_size):
        outputs = generate(model, prompts[start : start + batch_size], new_tokens, temperature=0.0)
        for (length, depth, key), out in zip(cases[start : start + batch_size], outputs, strict=True):
            answer = tokenizer.decode(out)
            results.append(PasskeyTrial(length, depth, key, answer, read_answer(answer) == key))
    return results


def accuracy(trials: list[PasskeyTrial]) -> dict[tuple[int, float], float]:
    """Share of correct retrievals per (length, depth), in the order first seen."""
    groups: dict[tuple[int, float], list[bool]] = {}
    for t in trials:
        groups.setdefault((t.length, t.depth), []).append(t.correct)
    return {k: sum(v) / len(v) for k, v in groups.items()}
