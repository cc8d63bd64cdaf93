"""The continuous-batching engine (cookbook.inference.engine): a row's tokens depend only on its prompt, seed and
parameters, whatever shares the batch and whenever it joins; rows and the KV budget bound the batch; cancelled and
timed-out rows leave at the next step; prompt and token logprobs are the model's fp32 log-softmax."""

from __future__ import annotations

import time

import pytest
import torch
from test_generate import tiny_model

from cookbook.errors import CookbookError
from cookbook.inference.engine import Engine, Sequence
from cookbook.inference.sampling import SamplingParams, sample_seed

MIXED = [  # (prompt length, params, seed): greedy, tempered, top-k, top-p, penalised, short and long
    (5, SamplingParams(max_tokens=12, temperature=0), None),
    (17, SamplingParams(max_tokens=20, temperature=0.8, top_k=20), 1),
    (3, SamplingParams(max_tokens=7, temperature=1.2, top_p=0.9), 2),
    (30, SamplingParams(max_tokens=16, temperature=1.0, repetition_penalty=1.3, presence_penalty=0.5), 3),
    (9, SamplingParams(max_tokens=25, temperature=0.7, top_k=50, top_p=0.95, frequency_penalty=1.0), 4),
    (1, SamplingParams(max_tokens=10, temperature=1.0), 5),
    (12, SamplingParams(max_tokens=4, temperature=0), None),
]


@pytest.fixture(scope="module")
def model():
    return tiny_model(init_std=0.05)  # flat enough that sampled rows vary, sharp enough that greedy is clear


def rows(spec=MIXED, seed_shift: int = 0) -> list[Sequence]:
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n, _, _ in spec]
    return [
        Sequence(p, params, seed=None if seed is None else seed + seed_shift)
        for p, (_, params, seed) in zip(prompts, spec)
    ]


def alone(model, seqs: list[Sequence]) -> list[list[int]]:
    out = []
    for s in seqs:
        one = Sequence(s.prompt, s.params, seed=s.seed)
        Engine(model, eos_id=None, max_batch_size=1, max_model_len=128).run([one])
        out.append(one.tokens)
    return out


def test_a_row_samples_the_same_alone_in_a_mixed_batch_and_joining_late(model):
    want = alone(model, rows())
    assert len({tuple(t) for t in want}) == len(want) and all(
        len(t) == p.max_tokens for t, (_, p, _) in zip(want, MIXED)
    )
    together = rows()
    Engine(model, eos_id=None, max_batch_size=8).run(together)
    assert [s.tokens for s in together] == want
    # three rows at a time: rows join as others finish and move between slots
    few = rows()
    Engine(model, eos_id=None, max_batch_size=3).run(few)
    assert [s.tokens for s in few] == want
    # half submitted, a few steps, then the rest join the running batch
    late = rows()
    engine = Engine(model, eos_id=None, max_batch_size=8)
    engine.submit(late[:4])
    for _ in range(3):
        engine.step()
    assert 0 < len(late[1].tokens) < late[1].params.max_tokens
    engine.run(late[4:])
    while not all(s.done for s in late):
        engine.step()
    assert [s.tokens for s in late] == want
    # another seed draws other tokens; sample j of a prompt is seeded sample_seed(seed, j)
    other = rows(seed_shift=100)
    Engine(model, eos_id=None, max_batch_size=8).run(other)
    assert [s.tokens for s in other][1:6] != want[1:6] and other[0].tokens == want[0]
    assert sample_seed(7, 0) == 7 and len({sample_seed(7, j) for j in range(50)}) == 50


def test_rows_and_the_kv_budget_bound_the_running_batch(model):
    spec = [
        (n, SamplingParams(max_tokens=m, temperature=0.9), i)
        for i, (n, m) in enumerate([(10, 12), (40, 8), (5, 20), (20, 4), (90, 10), (3, 5), (15, 9)])
    ]
    want = alone(model, rows(spec))
    for max_batch, kv in ((2, None), (8, 3 * 128), (8, 128)):
        seqs = rows(spec)
        engine = Engine(model, eos_id=None, max_batch_size=max_batch, max_model_len=128, kv_tokens=kv)
        engine.submit(seqs)
        peak = 0
        while not all(s.done for s in seqs):
            engine.step()
            peak = max(peak, len(engine.running))
            assert len(engine.running) <= max_batch and engine.rows_cap <= max_batch
            assert engine.rows_cap * engine.len_cap <= engine.kv_tokens
        assert peak == min(max_batch, engine.kv_tokens // 128)
        assert [s.tokens for s in seqs] == want, (max_batch, kv)


def test_cancelled_and_timed_out_rows_leave_at_the_next_step(model):
    seqs = rows([(6, SamplingParams(max_tokens=50, temperature=0.8), i) for i in range(4)])
    want = alone(model, seqs)
    engine = Engine(model, eos_id=None, max_batch_size=4)
    engine.submit(seqs)
    engine.step()
    engine.step()
    engine.cancel([seqs[1]])
    seqs[2].deadline = time.monotonic() - 1
    engine.step()
    assert (seqs[1].finish_reason, seqs[2].finish_reason) == ("cancelled", "timeout")
    assert len(seqs[1].tokens) == len(seqs[2].tokens) == 3 and len(engine.running) == 2  # prefill + 2 decodes
    waiting = Sequence([1, 2, 3], SamplingParams(max_tokens=5), seed=0)  # cancelled before it ever runs
    engine.submit([waiting])
    engine.cancel([waiting])
    engine.step()
    assert waiting.finish_reason == "cancelled" and not waiting.tokens
    while not all(s.done for s in seqs):
        engine.step()
    assert [seqs[0].tokens, seqs[3].tokens] == [want[0], want[3]]


def test_prompt_and_token_logprobs_are_the_models_log_softmax(model):
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 128, (14,), generator=g).tolist()
    # penalties and temperature change what is drawn, never the logprobs reported
    seq = Sequence(
        prompt,
        SamplingParams(max_tokens=6, temperature=0.7, repetition_penalty=1.5),
        seed=1,
        top_logprobs=3,
        prompt_top_logprobs=4,
    )
    score_only = Sequence(prompt, SamplingParams(max_tokens=0), prompt_top_logprobs=0)
    Engine(model, eos_id=None, max_batch_size=4).run([seq, score_only])
    ids = prompt + seq.tokens
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)
    assert seq.prompt_logprobs[0] is None and len(seq.prompt_logprobs) == len(prompt)
    for i, e in enumerate(seq.prompt_logprobs[1:], 1):
        assert e.token == ids[i] and abs(e.logprob - lp[i - 1, ids[i]].item()) < 1e-5
        values, top = lp[i - 1].topk(4)
        assert [t for t, _ in e.top] == top.tolist() and max(
            abs(v - w) for (_, v), w in zip(e.top, values.tolist())
        ) < 1e-5
    for i, e in enumerate(seq.logprobs):
        at = len(prompt) + i - 1
        assert e.token == seq.tokens[i] and abs(e.logprob - lp[at, e.token].item()) < 1e-5 and len(e.top) == 3
    assert not score_only.tokens and score_only.finish_reason == "length"
    assert [e.logprob for e in score_only.prompt_logprobs[1:]] == pytest.approx(
        [e.logprob for e in seq.prompt_logprobs[1:]], abs=1e-6
    )


def test_bad_rows_are_refused_before_any_work(model):
    engine = Engine(model, eos_id=None, max_batch_size=2, max_model_len=32)
    for seq, message in (
        (Sequence([], SamplingParams()), "empty"),
        (Sequence([1, 128], SamplingParams()), "vocabulary"),
        (Sequence([1] * 30, SamplingParams(max_tokens=3)), "max_model_len"),
        (Sequence([1], SamplingParams(temperature=float("nan"))), "temperature"),
    ):
        with pytest.raises(CookbookError, match=message):
            engine.submit([seq])
    assert not engine.waiting
    with pytest.raises(CookbookError, match="KV budget"):
        Engine(model, eos_id=None, max_model_len=64, kv_tokens=32)
