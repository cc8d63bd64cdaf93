"""Quality filters applied to completions before they are written: length, repetition, exact duplicates.

A completion is judged in this order and dropped for the first reason that applies:

``short``       the teacher generated fewer than ``min_tokens`` tokens for it;
``repetitive``  the record's text (what will be trained on) repeats itself: ``repeat_ratio(text, ngram)`` is above
                ``max_repeat_ratio``;
``duplicate``   its continuation, whitespace-stripped, is exactly one already kept (in this run or, on resume, in
                the shards already written: pass their hashes as ``seen``).

Only kept completions are remembered for dedup, so the hashes of the written records are the whole dedup state,
and a resumed run filters exactly as an uninterrupted one. ``Filter.end_shard()`` hands out, per shard, the counts
and the hashes a ``ShardWriter`` stores beside the shard. Memory: about 100 bytes per kept completion (a 16-byte
blake2b digest in a set).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from cookbook.errors import CookbookError
from cookbook.inference.sampling import Completion

REASONS = ("short", "repetitive", "duplicate")


def repeat_ratio(text: str, n: int = 3) -> float:
    """The share of the text's word ``n``-grams that repeat an earlier one: ``1 - unique / total``; 0 for a text
    of fewer than ``n`` words. Words are split on whitespace.

    >>> repeat_ratio("a b a b a b", 2)  # bigrams ab ba ab ba ab: 5, of which 2 unique
    0.6
    >>> repeat_ratio("the cat sat on the mat", 2)  # all 5 bigrams differ
    0.0
    """
    words = text.split()
    total = len(words) - n + 1
    if total <= 0:
        return 0.0
    unique = len({tuple(words[i : i + n]) for i in range(total)})
    return 1.0 - unique / total


def text_hash(continuation: str) -> bytes:
    """The dedup key of a continuation: blake2b (16 bytes) of its whitespace-stripped UTF-8."""
    return hashlib.blake2b(continuation.strip().encode("utf-8", "surrogatepass"), digest_size=16).digest()


@dataclass
class FilterConfig:
    min_tokens: int = 0  # completions with fewer generated tokens are dropped ("short")
    max_repeat_ratio: float | None = (
        None  # drop texts whose n-gram repeat ratio is above this ("repetitive"); None = off
    )
    ngram: int = 3  # n of the repeat ratio, in words
    dedup: bool = True  # drop exact duplicates of a kept continuation ("duplicate")

    def check(self) -> None:
        """A CookbookError naming the first bad value."""
        if self.min_tokens < 0:
            raise CookbookError(f"--min-tokens {self.min_tokens} is negative")
        if self.max_repeat_ratio is not None and not 0 <= self.max_repeat_ratio <= 1:
            raise CookbookError(
                f"--max-repeat-ratio {self.max_repeat_ratio} is not in [0, 1] (leave it out to keep repetitive texts)"
            )
        if self.ngram < 1:
            raise CookbookError(f"--ngram {self.ngram} must be at least 1")


@dataclass
class _Tally:
    completions: int = 0
    generated_tokens: int = 0
    filtered: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    hashes: list[bytes] = field(default_factory=list)


class Filter:
    """Judges completions one by one; remembers what it kept for dedup.

    ``counts``: completions dropped per reason since the filter was made (this process only; a resumed run's
    totals come from the shards' stats). ``end_shard()``: what happened since the previous call.
    """

    def __init__(self, cfg: FilterConfig, seen: set[bytes] | None = None):
        cfg.check()
        self.cfg = cfg
        self.seen: set[bytes] = set(seen) if seen else set()
        self.counts: dict[str, int] = dict.fromkeys(REASONS, 0)
        self.kept = 0
        self._shard = _Tally()

    def keep(self, record_text: str, completion: Completion) -> str | None:
        """None if the completion is kept, else why not (``short``, ``repetitive`` or ``duplicate``).
        ``record_text`` is the text the record will hold (prompt + continuation, or the continuation)."""
        cfg, shard = self.cfg, self._shard
        shard.completions += 1
        shard.generated_tokens += completion.tokens
        reason, key = None, None
        if completion.tokens < cfg.min_tokens:
            reason = "short"
        elif cfg.max_repeat_ratio is not None and repeat_ratio(record_text, cfg.ngram) > cfg.max_repeat_ratio:
            reason = "repetitive"
        elif cfg.dedup:
            key = text_hash(completion.text)
            if key in self.seen:
                reason = "duplicate"
        if reason is not None:
            self.counts[reason] += 1
            shard.filtered[reason] += 1
            return reason
        if key is not None:
            self.seen.add(key)
            shard.hashes.append(key)
        self.kept += 1
        return None

    def end_shard(self) -> tuple[dict, list[bytes]]:
        """(stats, hashes) of the completions judged since the last call: stats = ``completions``,
        ``generated_tokens``, ``filtered`` (per reason); hashes = the dedup keys of the kept ones, in order.
        Pass both to ``ShardWriter.write``."""
        shard, self._shard = self._shard, _Tally()
        return {
            "completions": shard.completions,
            "generated_tokens": shard.generated_tokens,
            "filtered": shard.filtered,
        }, shard.hashes
