"""The generation engine: continuous batching over a KV cache of row slots.

A ``Sequence`` is one prompt and one sample of it. Sequences wait in a queue; each ``step``:

1. drops the rows that were cancelled or ran past their deadline (their slots free at once);
2. admits waiting sequences, first come first served, while there are rows free (``max_batch_size``) and the KV
   budget (``kv_tokens``: rows x the longest prompt + max_tokens among them) allows; one group of them, right-padded
   to at most ``max_prefill_tokens``, goes through one prefill forward, which samples their first token (and scores
   their prompt when asked);
3. runs one decode forward over every running row: each feeds its last token at its own position and samples the
   next.

A row finishes at eos or one of its stop ids, at ``max_tokens``, or when its stop check (every ``STOP_CHECK_EVERY``
of its tokens) says so; it leaves the batch at once and the last row moves into its slot, so the running rows are
always slots 0..n-1 and attention reads a view of the cache, never a copy. The cache is allocated as it is needed
(rows and length grow, up to the budget) and kept for the next requests.

What a row samples depends only on its prompt, seed and parameters (``cookbook.inference.sampling``): its random
stream is its own, and its positions and causal mask are its own, whatever else is in the batch.

Threads: ``submit`` and ``cancel`` may be called from any thread; ``step`` (or ``serve_forever``, which loops on it)
runs in one. ``run`` is the synchronous use: submit, then step until those sequences are done.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from cookbook.errors import CookbookError
from cookbook.inference.logprobs import TokenLogprob, token_logprobs
from cookbook.inference.sampling import SEED_MAX, SamplingParams, apply_penalties, sample
from cookbook.model.model import KVCache

STOP_CHECK_EVERY = 8  # a row's tokens between looks at its stop check (stop strings spanning tokens)
LENGTH_STEP = 128  # the cache's length grows in multiples of this
_SCORE_ELEMENTS = 1 << 26  # logits a scoring prefill may keep (every position's, not only the last)
WAITING_CHECK = 0.05  # seconds between looks at the waiting rows' deadlines


@dataclass(eq=False)
class Sequence:
    """One prompt, one sample. The engine fills ``tokens`` (the generated ids, eos or stop id included),
    ``logprobs`` (one per generated token when ``top_logprobs`` is set), ``prompt_logprobs`` (None for the first
    prompt token, when ``prompt_top_logprobs`` is set) and ``finish_reason``: "stop", "length", "cancelled",
    "timeout" or "error" (``error`` says what)."""

    prompt: list[int]
    params: SamplingParams
    seed: int | None = None  # None: a random seed (greedy rows draw nothing)
    stop_ids: frozenset[int] = frozenset()  # tokens that end the row as eos does
    top_logprobs: int | None = None  # alternatives per generated token (None: no logprobs at all)
    prompt_top_logprobs: int | None = None  # alternatives per prompt token (None: the prompt is not scored)
    stop_check: Callable[[list[int]], bool] | None = None  # True: end the row here (a stop string in its text)
    deadline: float | None = None  # time.monotonic() past which the row is cancelled ("timeout")
    on_step: Callable[[Sequence], None] | None = None  # in the engine's thread, after tokens came or it finished
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    error: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = field(default=None, repr=False)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def need(self) -> int:
        """Cache slots the row may fill: its prompt and every token but the last (which is never fed)."""
        return len(self.prompt) + max(self.params.max_tokens - 1, 0)


class _Rows(KVCache):
    """Slots ``start``..``stop``-1 of the engine's buffers as the model's KVCache: views, no copy."""

    def __init__(self, buffers: dict, start: int, stop: int, max_len: int):  # the buffers exist: no super().__init__
        self.buffers = {name: (k[start:stop], v[start:stop]) for name, (k, v) in buffers.items()}
        self.batch, self.max_len = stop - start, max_len


class Engine:
    """Continuous batching for one model (see the module's docstring). ``eos_id`` ends every row; ``max_model_len``
    bounds prompt + max_tokens (default: the model's max_seq_len); ``kv_tokens`` bounds the cache (rows x length
    slots; default: max_batch_size x max_model_len, and on CUDA what 90% of free memory holds)."""

    def __init__(
        self,
        model,
        *,
        eos_id: int | None,
        max_batch_size: int = 16,
        max_model_len: int | None = None,
        kv_tokens: int | None = None,
        max_prefill_tokens: int = 8192,
    ):
        if max_batch_size < 1 or max_prefill_tokens < 1:
            raise CookbookError(
                f"max_batch_size {max_batch_size} and max_prefill_tokens {max_prefill_tokens} must be at least 1"
            )
        self.model, self.cfg = model, model.config
        weight = next(model.parameters())
        self.device, self.dtype = weight.device, weight.dtype
        self.eos_id, self.vocab = eos_id, self.cfg.vocab_size
        self.max_batch_size, self.max_prefill_tokens = max_batch_size, max_prefill_tokens
        self.max_model_len = max_model_len or self.cfg.max_seq_len
        self.kv_tokens = kv_tokens or self._default_kv_tokens()
        if self.kv_tokens < self.max_model_len:
            raise CookbookError(
                f"a KV budget of {self.kv_tokens} tokens cannot hold one sequence of max_model_len "
                f"{self.max_model_len}; raise it or lower max_model_len"
            )
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.wake = threading.Condition()
        self.closed = False
        self.buffers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.rows_cap = self.len_cap = 0
        self.positions = torch.zeros(0, dtype=torch.long, device=self.device)  # the slot each row feeds next
        self.last = torch.zeros(0, dtype=torch.long, device=self.device)  # each row's last sampled token
        self.counts: torch.Tensor | None = None  # [max_batch_size, vocab] tokens generated (penalised rows)
        self.in_prompt: torch.Tensor | None = None  # [max_batch_size, vocab] tokens in the prompt
        self._params: tuple | None = None  # per-row sampling tensors of the running rows, rebuilt when they change
        self._recheck = False  # a waiting row may have been cancelled
        self._deadlines = False  # some row has a deadline
        self._next_check = 0.0

    def _default_kv_tokens(self) -> int:
        tokens = self.max_batch_size * self.max_model_len
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            per_token = 2 * self.cfg.num_layers * self.cfg.num_kv_heads * self.cfg.head_dim * self.dtype.itemsize
            tokens = min(tokens, max(self.max_model_len, int(0.9 * free) // per_token))
        return tokens

    # ----------------------------------------------------------------------- from any thread

    def check(self, seq: Sequence) -> None:
        """A CookbookError when the engine can never run ``seq`` (empty prompt, ids outside the vocabulary, longer
        than max_model_len)."""
        seq.params.check(allow_no_tokens=True)  # max_tokens 0: the prompt is read (and scored, if asked), no more
        if not seq.prompt:
            raise CookbookError("a prompt is empty; every prompt needs at least one token")
        if min(seq.prompt) < 0 or max(seq.prompt) >= self.vocab:
            raise CookbookError(
                f"a prompt holds a token id outside the vocabulary [0, {self.vocab}); check the tokenizer"
            )
        if len(seq.prompt) + seq.params.max_tokens > self.max_model_len:
            raise CookbookError(
                f"a prompt of {len(seq.prompt)} tokens and max_tokens {seq.params.max_tokens} exceed "
                f"max_model_len {self.max_model_len}"
            )

    def submit(self, seqs: Iterable[Sequence]) -> None:
        seqs = list(seqs)
        for s in seqs:
            self.check(s)
            if not s.params.greedy and s.params.max_tokens > 0:
                seed = s.seed if s.seed is not None else secrets.randbelow(SEED_MAX)
                s.generator = torch.Generator(device=self.device).manual_seed(seed & 0xFFFFFFFFFFFFFFFF)
        with self.wake:
            if self.closed:
                raise CookbookError("the engine is shut down")
            self.waiting.extend(seqs)
            self._deadlines = self._deadlines or any(s.deadline is not None for s in seqs)
            self.wake.notify_all()

    def cancel(self, seqs: Iterable[Sequence]) -> None:
        """Mark ``seqs`` cancelled: the next step drops them and frees their slots."""
        for s in seqs:
            s.cancelled = True
        with self.wake:
            self._recheck = True
            self.wake.notify_all()

    def shutdown(self) -> None:
        with self.wake:
            self.closed = True
            self.wake.notify_all()

    # ----------------------------------------------------------------------- the loop

    def run(self, seqs: list[Sequence], after_step: Callable[[], None] | None = None) -> list[Sequence]:
        """Generate ``seqs`` to the end in this thread (the engine must not be serving in another)."""
        self.submit(seqs)
        while self.waiting or self.running:
            self.step()
            if after_step is not None:
                after_step()
        return seqs

    def serve_forever(self) -> None:
        """Step while there is work, sleep while there is none, until ``shutdown``. A step that fails (out of
        memory, say) ends the rows it held with finish_reason "error"; the engine goes on."""
        while True:
            with self.wake:
                while not self.closed and not self.waiting and not self.running:
                    self.wake.wait()
                if self.closed:
                    break
            try:
                self.step()
            except Exception as e:  # the requests in flight fail, the server stays up
                line = (str(e).splitlines() or [""])[0][:300]
                self._fail(f"{type(e).__name__}: {line}")
        self._fail("the server is shutting down")

    @torch.no_grad()
    def step(self) -> None:
        """Drop cancelled rows, admit and prefill one group of waiting sequences, decode one token for every
        running row."""
        self._drop_cancelled()
        group = self._admit()
        if group:
            self._prefill(group)
        if self.running:
            n = len(self.running)
            view = _Rows(self.buffers, 0, n, self.len_cap)
            logits = self.model(self.last[:n, None], self.positions[:n, None], cache=view)[:, -1]
            self.positions[:n] += 1
            self._sample(0, logits)

    # ----------------------------------------------------------------------- admission and prefill

    def _drop_cancelled(self) -> None:
        """Rows cancelled or past their deadline leave: the running ones at every step, the waiting ones when a
        cancel came or, if any has a deadline, every WAITING_CHECK seconds (the queue may be long)."""
        now = time.monotonic()

        def over(s: Sequence) -> bool:
            if s.cancelled or (s.deadline is not None and now > s.deadline):
                s.finish_reason = "cancelled" if s.cancelled else "timeout"
                return True
            return False

        gone = [s for s in self.running if over(s)]
        self._remove(gone)
        if self._recheck or (self._deadlines and now >= self._next_check):
            with self.wake:
                self._recheck, self._next_check = False, now + WAITING_CHECK
                late = [s for s in self.waiting if over(s)]
                if late:
                    self.waiting = deque(s for s in self.waiting if not s.done)
            gone += late
        for s in gone:
            self._notify(s)

    def _length(self, need: int) -> int:
        """The cache length that holds ``need`` slots: a multiple of LENGTH_STEP, at most max_model_len."""
        return min(self.max_model_len, -(-need // LENGTH_STEP) * LENGTH_STEP)

    def _fits(self, rows: int, need: int) -> bool:
        if rows > self.max_batch_size:
            return False
        return (rows <= self.rows_cap and need <= self.len_cap) or rows * self._length(need) <= self.kv_tokens

    def _admit(self) -> list[Sequence]:
        """The next group to prefill: waiting sequences in order while rows, KV budget and prefill budget allow,
        all scoring their prompt or none (a scoring prefill keeps every position's logits: fewer tokens)."""
        group: list[Sequence] = []
        need = max((s.need for s in self.running), default=0)
        with self.wake:
            while self.waiting:
                s = self.waiting[0]
                scoring = s.prompt_top_logprobs is not None
                budget = self.max_prefill_tokens
                if scoring:
                    budget = max(1, min(budget, _SCORE_ELEMENTS // self.vocab))
                longest = max([len(s.prompt)] + [len(g.prompt) for g in group])
                if group and (
                    longest * (len(group) + 1) > budget or scoring != (group[0].prompt_top_logprobs is not None)
                ):
                    break
                if not self._fits(len(self.running) + len(group) + 1, max(need, s.need)):
                    break
                group.append(self.waiting.popleft())
                need = max(need, s.need)
        return group

    def _reserve(self, rows: int, need: int) -> None:
        """Buffers for ``rows`` rows of at least ``need`` slots, keeping the running rows (and their slots in use,
        all below ``need``): grown, or shrunk in length when the long rows have gone, when they do not fit."""
        if rows <= self.rows_cap and need <= self.len_cap:
            return
        length = self._length(need)
        grown = min(self.max_batch_size, 2 * self.rows_cap, self.kv_tokens // length)
        new_rows = max(rows, grown)
        shape = (new_rows, self.cfg.num_kv_heads, length, self.cfg.head_dim)
        n, kept = len(self.running), min(self.len_cap, length)
        old, self.buffers = self.buffers, {}
        for i in range(self.cfg.num_layers):
            k = torch.zeros(shape, device=self.device, dtype=self.dtype)
            v = torch.zeros(shape, device=self.device, dtype=self.dtype)
            if n:
                k[:n, :, :kept].copy_(old[str(i)][0][:n, :, :kept])
                v[:n, :, :kept].copy_(old[str(i)][1][:n, :, :kept])
            old.pop(str(i), None)  # each old layer goes before the next is allocated
            self.buffers[str(i)] = (k, v)
        self.positions = torch.cat([self.positions[:n], self.positions.new_zeros(new_rows - n)])
        self.last = torch.cat([self.last[:n], self.last.new_zeros(new_rows - n)])
        self.rows_cap, self.len_cap = new_rows, length

    def _prefill(self, group: list[Sequence]) -> None:
        start = len(self.running)
        m, longest = len(group), max(len(s.prompt) for s in group)
        self._reserve(start + m, max(s.need for s in self.running + group))
        tokens = torch.zeros(m, longest, dtype=torch.long)
        for row, s in enumerate(group):
            tokens[row, : len(s.prompt)] = torch.tensor(s.prompt)
        tokens = tokens.to(self.device)
        lengths = torch.tensor([len(s.prompt) for s in group], device=self.device)
        view = _Rows(self.buffers, start, start + m, self.len_cap)
        self.running += group  # before the forward: a failure ends these rows too
        self._params = None
        scoring = group[0].prompt_top_logprobs is not None
        if scoring:  # every position's logits: the prompt's own logprobs
            full = self.model(tokens, cache=view)
            for row, s in enumerate(group):
                n = len(s.prompt)
                s.prompt_logprobs = [None] + token_logprobs(full[row, : n - 1], tokens[row, 1:n], s.prompt_top_logprobs)
            logits = full[torch.arange(m, device=self.device), lengths - 1]
        else:
            logits = self.model(tokens, cache=view, last=lengths - 1)[:, 0]
        self.positions[start : start + m] = lengths
        if any(s.params.penalised for s in group):
            self._start_penalties(start, group)
        self._sample(start, logits)

    def _start_penalties(self, start: int, group: list[Sequence]) -> None:
        if self.counts is None:
            self.counts = torch.zeros(self.max_batch_size, self.vocab, device=self.device)
            self.in_prompt = torch.zeros(self.max_batch_size, self.vocab, dtype=torch.bool, device=self.device)
        for row, s in enumerate(group, start):
            if s.params.penalised:
                self.counts[row].zero_()
                self.in_prompt[row].zero_()
                self.in_prompt[row, torch.tensor(s.prompt, device=self.device)] = True

    # ----------------------------------------------------------------------- sampling and retiring rows

    def _row_params(self) -> tuple:
        """(temperature, top_k or None, top_p or None, penalties or None, generators) of the running rows."""
        if self._params is None:
            ps = [s.params for s in self.running]
            dev = self.device
            temperature = torch.tensor([max(p.temperature, 1e-30) for p in ps], dtype=torch.float32, device=dev)
            top_k = (
                torch.tensor([min(p.top_k or self.vocab, self.vocab) for p in ps], device=dev)
                if any(0 < p.top_k < self.vocab for p in ps)
                else None
            )
            top_p = torch.tensor([p.top_p for p in ps], device=dev) if any(p.top_p < 1 for p in ps) else None
            penalties = None
            if any(p.penalised for p in ps):
                penalties = tuple(
                    torch.tensor([getattr(p, name) for p in ps], device=dev)
                    for name in ("repetition_penalty", "frequency_penalty", "presence_penalty")
                )
            self._params = (
                temperature,
                top_k,
                top_p,
                penalties,
                [None if p.greedy else s.generator for p, s in zip(ps, self.running)],
            )
        return self._params

    def _sample(self, start: int, logits: torch.Tensor) -> None:
        """Sample the next token of rows ``start``.. from their raw logits, record it, retire finished rows."""
        rows = slice(start, len(self.running))
        seqs = self.running[rows]
        temperature, top_k, top_p, penalties, generators = self._row_params()
        x = logits
        if penalties is not None:
            x = apply_penalties(logits, self.counts[rows], self.in_prompt[rows], *(p[rows] for p in penalties))
        tokens = sample(
            x,
            temperature[rows],
            None if top_k is None else top_k[rows],
            None if top_p is None else top_p[rows],
            generators[rows],
        )
        self.last[rows] = tokens
        if penalties is not None:
            self.counts[rows].scatter_add_(1, tokens[:, None], torch.ones(len(seqs), 1, device=self.device))
        scored = [i for i, s in enumerate(seqs) if s.top_logprobs is not None and s.params.max_tokens > 0]
        if scored:
            index = torch.tensor(scored, device=self.device)
            k = max(seqs[i].top_logprobs for i in scored)
            for i, lp in zip(scored, token_logprobs(logits[index], tokens[index], k)):
                seqs[i].logprobs.append(TokenLogprob(lp.token, lp.logprob, lp.top[: seqs[i].top_logprobs]))
        finished = []
        for s, t in zip(seqs, tokens.tolist()):
            if s.params.max_tokens == 0:  # scoring only: nothing is generated
                s.finish_reason = "length"
            else:
                s.tokens.append(t)
                if t == self.eos_id or t in s.stop_ids:
                    s.finish_reason = "stop"
                elif len(s.tokens) >= s.params.max_tokens:
                    s.finish_reason = "length"
                elif s.stop_check is not None and len(s.tokens) % STOP_CHECK_EVERY == 0 and s.stop_check(s.tokens):
                    s.finish_reason = "stop"
            if s.done:
                finished.append(s)
        self._remove(finished)
        for s in seqs:
            self._notify(s)

    def _remove(self, seqs: list[Sequence]) -> None:
        """Take finished rows out; the last rows move into the freed slots (the running rows stay packed)."""
        if not seqs:
            return
        gone = {id(s) for s in seqs}
        n = len(self.running)
        keep = [i for i, s in enumerate(self.running) if id(s) not in gone]
        left = len(keep)
        holes = [i for i in range(left) if id(self.running[i]) in gone]
        movers = [i for i in keep if i >= left]
        for dst, src in zip(holes, movers):
            used = int(self.positions[src])  # slots 0..used-1 hold its tokens
            for k, v in self.buffers.values():
                k[dst, :, :used] = k[src, :, :used]
                v[dst, :, :used] = v[src, :, :used]
            self.positions[dst], self.last[dst] = self.positions[src], self.last[src]
            if self.counts is not None and self.running[src].params.penalised:
                self.counts[dst], self.in_prompt[dst] = self.counts[src], self.in_prompt[src]
            self.running[dst] = self.running[src]
        del self.running[left:n]
        self._params = None

    def _notify(self, s: Sequence) -> None:
        if s.on_step is not None:
            s.on_step(s)

    def _fail(self, message: str) -> None:
        with self.wake:
            seqs = self.running + list(self.waiting)
            self.waiting.clear()
        self.running = []
        self._params = None
        self.buffers, self.rows_cap, self.len_cap = {}, 0, 0
        self.positions, self.last = self.positions[:0], self.last[:0]
        for s in seqs:
            if not s.done:
                s.finish_reason, s.error = "error", message
                self._notify(s)
