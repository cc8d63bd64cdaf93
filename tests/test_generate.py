"""Generation with the KV cache: the cache changes no logit, greedy decoding equals HF transformers', a prompt's
tokens do not depend on its batch, and the sampling filters do what they say (``cookbook.inference``)."""

from __future__ import annotations

import pytest
import torch

from cookbook.errors import CookbookError
from cookbook.inference.engine import STOP_CHECK_EVERY
from cookbook.inference.generator import generate
from cookbook.inference.sampling import filter_logits, sample
from cookbook.model import ModelConfig, Transformer
from cookbook.model.model import KVCache

TINY = dict(
    vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, max_seq_len=64
)
CASES = {
    "mha": dict(num_kv_heads=4),
    "gqa": dict(),
    "rope-linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "tied-qkv-bias": dict(tie_embeddings=True, qkv_bias=True),
}


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    # a larger init than the training default, so that logits differ enough for greedy choices to be clear
    return Transformer(ModelConfig(**{**TINY, "init_std": 0.2, **overrides})).eval()


def cached_logits(model: Transformer, tokens: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits for ``tokens`` [batch, seq] fed through a cache in chunks of the given sizes, then one at a time."""
    dtype = model.output.weight.dtype
    cache = KVCache(model.config, tokens.shape[0], tokens.shape[1] + 3, dtype=dtype)  # slots to spare: never read
    out, start = [], 0
    for size in chunks + [1] * (tokens.shape[1] - sum(chunks)):
        positions = torch.arange(start, start + size)[None]
        out.append(model(tokens[:, start : start + size], positions, cache=cache))
        start += size
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("case", list(CASES))
def test_cached_logits_equal_the_full_forward(case):
    model = tiny_model(init_std=0.02, **CASES[case])  # the training init: fp32 rounding stays far below 1e-5
    # 80 > max_seq_len: linear scaling's frequencies do not depend on the length, so the cache must agree there too
    for seq, chunks in ((24, [10]), (24, [7, 5, 3]), (80, [40, 16])):
        tokens = torch.randint(0, 128, (3, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            full, cached = model(tokens), cached_logits(model, tokens, chunks)
        assert (full - cached).abs().max().item() < 1e-5, f"{case}, {seq} tokens in chunks {chunks}"


def test_cache_stores_kv_heads_only_and_works_across_pipeline_stages():
    model = tiny_model()
    cache = KVCache(model.config, 2, 16)
    k, v = cache.buffers["0"]
    assert k.shape == v.shape == (2, 2, 16, 16)  # [batch, kv_heads (not 4 query heads), max_len, head_dim]

    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(tokens)
    # two stages as pipeline parallelism cuts them: stage 0 has no norm/output, stage 1 no embedding
    first, second = tiny_model(), tiny_model()
    del first.layers["1"], second.layers["0"]
    first.norm = first.output = second.tok_embeddings = None
    caches = KVCache(model.config, 2, 16), KVCache(model.config, 2, 16)
    with torch.no_grad():
        out = []
        for start, size in ((0, 8), (8, 1), (9, 1), (10, 2)):
            positions = torch.arange(start, start + size)[None]
            hidden = first(tokens[:, start : start + size], positions, cache=caches[0])
            out.append(second(hidden, positions, cache=caches[1]))
    assert (torch.cat(out, dim=1) - full).abs().max().item() < 1e-5


def test_rows_at_different_positions_match_their_own_forward():
    """A right-padded batch: each row reads only its own positions, never the padding."""
    model = tiny_model()
    a = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    b = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([a, torch.cat([b, torch.full((1, 4), 7)], dim=1)])
    cache = KVCache(model.config, 2, 12)
    with torch.no_grad():
        prefill = model(padded, cache=cache)
        nxt = torch.tensor([[11], [13]])
        step = model(nxt, torch.tensor([[9], [5]]), cache=cache)[:, -1]
        full_a = model(torch.cat([a, nxt[:1]], dim=1))
        full_b = model(torch.cat([b, nxt[1:]], dim=1))
    assert (prefill[0] - full_a[0, :9]).abs().max() < 1e-5 and (prefill[1, :5] - full_b[0, :5]).abs().max() < 1e-5
    assert (step[0] - full_a[0, -1]).abs().max() < 1e-5 and (step[1] - full_b[0, -1]).abs().max() < 1e-5


# --------------------------------------------------------------------------- greedy equals HF transformers


@pytest.mark.parametrize("case", ["mha", "rope-linear", "rope-dynamic"])  # the rope cases are GQA
def test_greedy_equals_transformers_generate(case):
    transformers = pytest.importorskip("transformers")
    from test_model import hf_model

    overrides = {**CASES, "rope-dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0})}[case]
    model = tiny_model(**overrides)
    hf = hf_model(model.config, model)
    hf.generation_config = transformers.GenerationConfig(eos_token_id=None, pad_token_id=0, bos_token_id=None)
    # the last prompt runs past max_seq_len (64), where dynamic NTK grows its base one position at a time
    for seed, length, new in ((0, 1, 12), (1, 9, 20), (2, 50, 30)):
        prompt = torch.randint(0, 128, (1, length), generator=torch.Generator().manual_seed(seed))
        ours = generate(model, prompt.tolist(), new, temperature=0)[0]
        with torch.no_grad():
            theirs = hf.generate(
                prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=new, min_new_tokens=new
            )[0, length:].tolist()
        assert ours == theirs, f"{case}, prompt of {length}"


# --------------------------------------------------------------------------- batching


def test_batched_greedy_equals_each_prompt_alone():
    model = tiny_model()
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (3, 17, 1, 8, 8, 30)]
    alone = [generate(model, [p], 15, temperature=0)[0] for p in prompts]
    assert generate(model, prompts, 15, temperature=0) == alone
    assert generate(model, prompts[::-1], 15, temperature=0) == alone[::-1]
    assert generate(model, prompts[2:4], 15, temperature=0) == alone[2:4]
    assert len({tuple(a) for a in alone}) == len(set(map(tuple, prompts)))  # the model does not ignore its prompt


def test_eos_stops_its_row_and_the_others_continue():
    model = tiny_model()
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (4, 11, 6)]
    free = generate(model, prompts, 12, temperature=0)
    # an eos that row 0 produces early and that the other rows never produce
    eos = next(t for t in free[0][1:6] if all(t not in row for row in free[1:]))
    stopped = generate(model, prompts, 12, temperature=0, eos_id=eos)
    cut = free[0].index(eos) + 1
    assert stopped[0] == free[0][:cut] and stopped[0][-1] == eos and cut < 12
    assert stopped[1:] == free[1:]
    # every row stopping ends the loop; each row still ends at its eos
    both = generate(model, prompts[:1] * 2, 12, temperature=0, eos_id=eos)
    assert both == [free[0][:cut]] * 2


def test_bfloat16_model_generates_in_its_dtype():
    model = tiny_model().to(torch.bfloat16)
    out = generate(model, [[1, 2, 3], [4]], 6, temperature=0.8, top_p=0.9)
    assert [len(r) for r in out] == [6, 6] and all(0 <= t < 128 for r in out for t in r)


# --------------------------------------------------------------------------- sampling


def test_top_k_1_equals_greedy():
    model = tiny_model()
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    greedy = generate(model, prompts, 10, temperature=0)
    assert generate(model, prompts, 10, temperature=1.0, top_k=1, seed=3) == greedy
    assert generate(model, prompts, 10, temperature=1.5, top_k=1, seed=4) == greedy


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 0.5 (1), 0.3 (3), 0.15 (2), 0.05 (0)
    logits = probs.log()
    kept = {
        p: set(torch.isfinite(filter_logits(logits, top_p=p)).nonzero().flatten().tolist())
        for p in (0.3, 0.5 - 1e-3, 0.6, 0.79, 0.9, 0.96, 1.0)
    }
    assert kept == {
        0.3: {1},
        0.5 - 1e-3: {1},
        0.6: {1, 3},
        0.79: {1, 3},
        0.9: {1, 3, 2},
        0.96: {0, 1, 2, 3},
        1.0: {0, 1, 2, 3},
    }
    # on a batch, per row, and top_k before top_p
    both = filter_logits(torch.stack([logits, logits.flip(0)]), top_k=3, top_p=0.9)
    assert torch.isfinite(both).tolist() == [[False, True, True, True], [True, True, True, False]]
    # sampling draws only from the kept set
    g = torch.Generator().manual_seed(0)
    draws = sample(logits.expand(2000, 4), torch.ones(2000), None, torch.full((2000,), 0.6), [g] * 2000)
    assert set(draws.tolist()) == {1, 3}
    assert abs((draws == 1).float().mean().item() - 0.5 / 0.8) < 0.05  # renormalised over the kept set


def test_sampling_is_reproducible_by_seed():
    model = tiny_model(init_std=0.02)  # flat logits: sampled sequences vary a lot
    prompts = [[1, 2, 3], [4, 5]]
    a = generate(model, prompts, 20, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    assert a == generate(model, prompts, 20, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    assert a != generate(model, prompts, 20, temperature=1.0, top_k=50, top_p=0.95, seed=8)
    assert a != generate(model, prompts, 20, temperature=0)


def test_bad_sampling_settings_and_prompts_are_clear_errors():
    model = tiny_model()
    nan, inf = float("nan"), float("inf")
    for kwargs in (
        dict(temperature=-1.0),
        dict(temperature=nan),
        dict(temperature=inf),
        dict(top_k=-1),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_p=nan),
        dict(repetition_penalty=inf),
        dict(frequency_penalty=nan),
        dict(presence_penalty=-inf),
    ):
        with pytest.raises(CookbookError) as e:
            generate(model, [[1, 2]], 3, **kwargs)
        assert next(iter(kwargs)) in str(e.value) and "\n" not in str(e.value)
    assert generate(model, [[5, 6]], 4, temperature=0, top_k=0) == generate(model, [[5, 6]], 4, temperature=0)
    for prompts in ([[]], [[1, 128]], [[-1]]):
        with pytest.raises(CookbookError):
            generate(model, prompts, 3)
    assert generate(model, [[1], [2, 3]], 0) == [[], []]


# --------------------------------------------------------------------------- penalties and stop ids


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_equals_transformers_generate(penalty):
    """HF's RepetitionPenaltyLogitsProcessor on a greedy run: prompt and generated tokens are penalised."""
    transformers = pytest.importorskip("transformers")
    from test_model import hf_model

    model = tiny_model()
    hf = hf_model(model.config, model)
    hf.generation_config = transformers.GenerationConfig(eos_token_id=None, pad_token_id=0, bos_token_id=None)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (1, 7, 20)]
    ours = generate(model, prompts, 24, temperature=0, repetition_penalty=penalty)  # one right-padded batch
    for prompt, row in zip(prompts, ours):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            theirs = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=24,
                min_new_tokens=24,
                repetition_penalty=penalty,
            )[0, len(prompt) :].tolist()
        assert row == theirs, f"prompt of {len(prompt)}"
    assert ours != generate(model, prompts, 24, temperature=0)  # the penalty changed something


def reference_penalised_greedy(
    model, prompt: list[int], new: int, frequency: float, presence: float, repetition: float = 1.0
) -> list[int]:
    """The penalties written out: a full forward per step, no cache, counts kept in a python dict."""
    seq, out = list(prompt), []
    for _ in range(new):
        with torch.no_grad():
            logits = model(torch.tensor([seq]))[0, -1].float().tolist()
        counts = {t: out.count(t) for t in set(out)}
        for t in set(seq) if repetition != 1.0 else ():
            logits[t] = logits[t] / repetition if logits[t] > 0 else logits[t] * repetition
        for t, c in counts.items():
            logits[t] -= frequency * c + presence
        token = max(range(len(logits)), key=lambda t: logits[t])
        out.append(token)
        seq.append(token)
    return out


@pytest.mark.parametrize("frequency,presence,repetition", [(1.5, 0.0, 1.0), (-0.3, 2.0, 1.0), (0.5, -0.5, 1.2)])
def test_frequency_and_presence_penalties_equal_a_reference_loop(frequency, presence, repetition):
    model = tiny_model()
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (3, 12, 5)]
    ours = generate(
        model,
        prompts,
        20,
        temperature=0,
        frequency_penalty=frequency,
        presence_penalty=presence,
        repetition_penalty=repetition,
    )
    assert ours == [reference_penalised_greedy(model, p, 20, frequency, presence, repetition) for p in prompts]
    assert ours != generate(model, prompts, 20, temperature=0)


def test_default_penalties_change_nothing_and_penalties_apply_before_sampling():
    model = tiny_model(init_std=0.02)
    prompts = [[1, 2, 3], [4, 5]]
    plain = generate(model, prompts, 16, temperature=0.9, top_p=0.9, seed=3)
    assert (
        generate(
            model,
            prompts,
            16,
            temperature=0.9,
            top_p=0.9,
            seed=3,
            repetition_penalty=1.0,
            frequency_penalty=0.0,
            presence_penalty=0.0,
            stop_ids=(),
        )
        == plain
    )
    # a strong presence penalty under sampling: no token is drawn twice within a row while others remain
    out = generate(model, prompts, 16, temperature=1.0, seed=3, presence_penalty=2.0, frequency_penalty=2.0)
    free = generate(model, prompts, 16, temperature=1.0, seed=3)
    repeats = lambda rows: sum(len(r) - len(set(r)) for r in rows)  # noqa: E731
    assert repeats(out) <= repeats(free)
    with pytest.raises(CookbookError, match="repetition_penalty"):
        generate(model, prompts, 3, repetition_penalty=0.0)


def test_stop_ids_end_their_rows_like_eos():
    model = tiny_model()
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (4, 9, 6)]
    free = generate(model, prompts, 14, temperature=0)
    # two stop ids: one that row 0 produces early, one that row 1 produces; row 2 produces neither
    a = next(t for t in free[0][1:6] if t not in free[2])
    b = next(t for t in free[1][1:8] if t not in free[2] and t != a)
    stopped = generate(model, prompts, 14, temperature=0, stop_ids=[a, b])
    for row, full in zip(stopped[:2], free[:2]):
        cut = min(full.index(t) for t in (a, b) if t in full) + 1
        assert row == full[:cut] and row[-1] in (a, b)
    assert stopped[2] == free[2]
    # with eos as well: whichever comes first ends the row
    assert generate(model, prompts, 14, temperature=0, eos_id=a, stop_ids=[b]) == stopped


def test_stop_when_ends_the_rows_it_names():
    model = tiny_model()
    prompts = [[3, 4, 5], [6, 7]]
    free = generate(model, prompts, 20, temperature=0)
    seen = []

    def stop_row_0(tokens: list[int]) -> bool:  # asked about each running row every STOP_CHECK_EVERY of its tokens
        seen.append(len(tokens))
        return tokens[:2] == free[0][:2]

    out = generate(model, prompts, 20, temperature=0, stop_when=stop_row_0)
    assert free[0][:2] != free[1][:2]
    assert out == [free[0][:STOP_CHECK_EVERY], free[1]]
    assert sorted(seen) == sorted([STOP_CHECK_EVERY] * 2 + list(range(2 * STOP_CHECK_EVERY, 20, STOP_CHECK_EVERY)))


def test_generate_commands_refuse_bad_sampling_in_one_line(teacher, tmp_path):
    """cookbook generate and distill generate check sampling with the same SamplingParams.check, before any work."""
    from helpers_data import assert_one_line_error, run_cli

    for flag, value in (("--temperature", "nan"), ("--temperature", "inf"), ("--top-p", "nan")):
        proc = run_cli("generate", "--load", teacher["cookbook"], "--prompt", "x", flag, value, "--device", "cpu")
        assert_one_line_error(proc, flag[2:].split("-")[0], value)
    proc = run_cli(
        "distill",
        "generate",
        "--dry-run",
        "--teacher",
        teacher["cookbook"],
        "--prompts-from",
        tmp_path / "docs.jsonl",
        "--output",
        tmp_path / "out",
        "--temperature",
        "inf",
    )
    assert_one_line_error(proc, "temperature", "inf")
