"""The ``cookbook`` backend: a cookbook checkpoint and its Hugging Face conversion complete alike, completions are
the generator's tokens decoded in context and cut at stop strings, order and seeds behave, bad teachers are clear."""

from __future__ import annotations

import shutil

import pytest

from cookbook.errors import CookbookError
from cookbook.inference.generator import LocalGenerator, generate
from cookbook.inference.load import load_model_and_tokenizer
from cookbook.inference.sampling import SamplingParams, cut_at_stop
from inference_distill.local import CookbookBackend

PROMPTS = ["def main(", "import os\n", "class A:", "x", "for i in range(10):\n    print(i)"]
GREEDY = SamplingParams(max_tokens=12, temperature=0)


def test_cookbook_and_hf_teachers_give_the_generators_completions(teacher, local):
    from_hf = LocalGenerator.load(teacher["hf"], device="cpu")
    seeds = list(range(len(PROMPTS)))
    ours = local.complete(PROMPTS, GREEDY, seeds, batch_size=2)
    assert from_hf.complete(PROMPTS, GREEDY, seeds, batch_size=3) == ours
    # the oracle: the generator's tokens, decoded after the prompt's text
    tok = local.tokenizer
    ids = [tok.tokenize(p) for p in PROMPTS]
    new = generate(local.model, ids, 12, temperature=0, eos_id=tok.eod)
    for prompt, tokens, (c,) in zip(ids, new, ours):
        text = tok.decode(prompt + [t for t in tokens if t != tok.eod and t < 600])[len(tok.decode(prompt)) :]
        assert c.text == text and c.tokens == len(tokens)
        assert c.finish_reason == ("stop" if tokens[-1] == tok.eod else "length")
    assert ids[0][0] == tok.bos  # text prompts are tokenized as Megatron does: with BOS
    # token-id prompts are used as they are
    assert local.complete(ids, GREEDY, seeds) == ours


def test_order_is_kept_under_length_sorting(local):
    prompts = PROMPTS + ["a much longer prompt than the others, " * 3, "y"]
    alone = [local.complete([p], GREEDY, [0])[0] for p in prompts]
    for batch_size in (2, 16):
        assert local.complete(prompts, GREEDY, [0] * len(prompts), batch_size=batch_size) == alone


def test_n_samples_per_prompt_and_seeds(local):
    params = SamplingParams(max_tokens=10, temperature=1.0, n=3)
    seeds = [5, 6]
    out = local.complete(PROMPTS[:2], params, seeds, batch_size=4)  # rows of prompt 1 straddle two batches
    assert [len(c) for c in out] == [3, 3]
    assert all(c.tokens >= 1 and c.finish_reason in ("stop", "length") for cs in out for c in cs)
    assert len({c.text for c in out[0]}) > 1  # samples of a prompt differ
    assert local.complete(PROMPTS[:2], params, seeds, batch_size=4) == out  # equal seeds: equal completions
    assert local.complete(PROMPTS[:2], params, [7, 8], batch_size=4) != out
    greedy = local.complete(PROMPTS[:2], SamplingParams(max_tokens=10, temperature=0, n=2), seeds)
    assert all(cs[0] == cs[1] for cs in greedy)


def test_stop_strings_cut_the_text_and_end_the_completion(local):
    free = local.complete(PROMPTS, SamplingParams(max_tokens=24, temperature=0), [0] * len(PROMPTS))
    # a stop string from the middle of each completion's text (several tokens apart), and one never seen
    for (c,), prompt in zip(free, PROMPTS):
        assert len(c.text) > 8, c
        stop = c.text[5:7]
        params = SamplingParams(max_tokens=24, temperature=0, stop=("\x00never\x00", stop))
        (cut,) = local.complete([prompt], params, [0])[0:1][0]
        want, found = cut_at_stop(c.text, (stop,))
        assert found and cut.text == want and cut.finish_reason == "stop"
        # tokens: the fewest whose text holds the stop string
        assert 1 <= cut.tokens <= c.tokens
        ids = local.encode(prompt)
        new = generate(local.model, [ids], cut.tokens, temperature=0)[0]
        assert stop in local.continuation(ids, new) and stop not in local.continuation(ids, new[:-1])


def test_a_stop_string_within_one_token_ends_the_row_at_that_token(local):
    ((c,),) = local.complete(["def main("], SamplingParams(max_tokens=24, temperature=0), [0])
    tok = local.tokenizer
    ids = tok.tokenize("def main(")
    new = generate(local.model, [ids], 24, temperature=0)[0]
    # a token of the completion whose own text is a single character: that character is a stop string
    texts = [tok.decode([t]) for t in new]
    k, char = next((k, s) for k, s in enumerate(texts) if k > 0 and len(s) == 1 and s != "\ufffd")  # not a lone byte
    assert tok.eod not in new[:k]
    stop = (char,)
    assert new[k] in local.stop_ids(stop)
    ((cut,),) = local.complete(["def main("], SamplingParams(max_tokens=24, temperature=0, stop=stop), [0])
    assert cut.text == cut_at_stop(c.text, stop)[0] and cut.finish_reason == "stop"


def test_cookbook_backend_reports_progress(teacher):
    backend = CookbookBackend(str(teacher["cookbook"]), device="cpu", batch_size=3)
    assert backend.name == "cookbook" and backend.teacher == str(teacher["cookbook"])
    seen = []
    params = SamplingParams(max_tokens=6, temperature=0.7, n=2)
    out = backend.generate(PROMPTS, params, list(range(len(PROMPTS))), on_progress=lambda p, t: seen.append((p, t)))
    assert len(out) == len(PROMPTS) and all(len(c) == 2 for c in out)
    assert len(seen) > 1 and all(p or t for p, t in seen)  # reported as the work goes, never an empty report
    assert sum(p for p, _ in seen) == len(PROMPTS)
    assert sum(t for _, t in seen) >= sum(c.tokens for cs in out for c in cs)
    backend.close()
    with pytest.raises(CookbookError, match="closed"):
        backend.generate(PROMPTS, params, [0] * len(PROMPTS))


def test_generate_command_loads_a_hugging_face_folder_too(teacher, local):
    from recipes.generate import GenerateConfig, run

    records = run(
        GenerateConfig(load=str(teacher["hf"]), prompts=PROMPTS[:2], max_new_tokens=12, temperature=0, device="cpu")
    )
    tok = local.tokenizer
    new = generate(local.model, [tok.tokenize(p) for p in PROMPTS[:2]], 12, temperature=0, eos_id=tok.eod)
    assert [r["tokens"] for r in records] == [len(t) for t in new]


def test_bad_teachers_and_requests_are_one_line_errors(teacher, tmp_path, local):
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copyfile(teacher["hf"] / f, no_tokenizer / f)
    cases = {
        tmp_path / "missing": "does not exist",
        tmp_path: "holds no cookbook checkpoint",
        no_tokenizer: "no tokenizer.json or tokenizer.model",
    }
    for path, message in cases.items():
        with pytest.raises(CookbookError, match=message) as e:
            load_model_and_tokenizer(path, device="cpu")
        assert "\n" not in str(e.value)
    model, tok = load_model_and_tokenizer(no_tokenizer, device="cpu", tokenizer_model=str(teacher["tokenizer"]))
    assert tok.vocab_size == 600 and model.config.vocab_size == 640
    with pytest.raises(CookbookError, match="dtype"):
        load_model_and_tokenizer(teacher["hf"], dtype="fp8")
    with pytest.raises(CookbookError, match="seeds"):
        local.complete(PROMPTS, GREEDY, [0])
    with pytest.raises(CookbookError, match="top_p"):
        local.complete(PROMPTS, SamplingParams(top_p=0), [0] * len(PROMPTS))
    with pytest.raises(CookbookError, match="vocabulary"):
        local.complete([[1, 2, 640]], GREEDY, [0])
