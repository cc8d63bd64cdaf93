"""``recipes.eval``: perplexity over windows of a token stream.

Oracles: HF transformers' LlamaForCausalLM computing its own ``labels`` loss per window (Hugging
Face's "perplexity of fixed-length models" recipe with ``max_length = seq_length + 1``), models whose
answer is known in closed form, and the tokenizer / dataset the streams are made from.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers_data import make_texts, write_jsonl
from torch import nn

from cookbook.data.indexed import IndexedDatasetWriter
from cookbook.data.tokenizer import load_tokenizer
from cookbook.errors import CookbookError
from cookbook.formats.hf import hf_config, hf_name
from cookbook.inference.perplexity import PerplexityResult, evaluate, file_stream, indexed_stream, window_nll, windows
from cookbook.model import ModelConfig, Transformer
from recipes.eval import dump, render

CFG = dict(
    vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=160, max_seq_len=32
)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**CFG)).eval()


@pytest.fixture(scope="module")
def stream() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, CFG["vocab_size"], (103,), generator=g)  # 102 targets: no length below divides it


@pytest.fixture(scope="module")
def hf(model):
    """The same weights in transformers' LlamaForCausalLM."""
    transformers = pytest.importorskip("transformers")
    conf = hf_config(model.config)
    conf.pop("architectures"), conf.pop("model_type")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**conf, attn_implementation="eager")).eval()
    missing, unexpected = hf.load_state_dict({hf_name(k): v for k, v in model.state_dict().items()}, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    return hf


def hf_recipe(hf, stream: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """Hugging Face's recipe, written out: windows of ``max_length`` tokens every ``stride``; each
    window's targets are the tokens not scored before; HF's model computes the loss from ``labels``."""
    n = len(stream)
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        trg_len = end - prev_end
        ids = stream[begin:end][None]
        labels = ids.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(input_ids=ids, labels=labels).loss
        k = int((labels[:, 1:] != -100).sum())  # the loss is shifted: the first label is never predicted
        nll += loss.double().item() * k
        count += k
        prev_end = end
        if end == n:
            break
    return nll, count


# --------------------------------------------------------------------------- 1, 2: against HF


@pytest.mark.parametrize("seq_length,stride", [(16, None), (16, 16), (40, None), (16, 5), (16, 3), (200, 7)])
def test_window_nll_equals_the_hf_recipe(model, hf, stream, seq_length, stride):
    nll, count = window_nll(model, stream, seq_length, stride, 2, CPU, show_progress=False)
    want, want_count = hf_recipe(hf, stream, seq_length + 1, stride or seq_length)
    assert count == want_count == len(stream) - 1  # every token after the first, exactly once
    assert nll == pytest.approx(want, rel=1e-6)


def test_windows_read_at_most_seq_length_and_later_ones_score_their_last_stride():
    for n, length, stride in [(103, 16, 16), (103, 16, 5), (10, 16, 3), (2, 4, 4), (33, 16, 16), (34, 16, 16)]:
        spans = list(windows(n, length, stride))
        scored = [p for b, e, s in spans for p in range(e - s + 1, e + 1)]  # predicted positions that count
        assert scored == list(range(1, n)), (n, length, stride)
        for k, (b, e, s) in enumerate(spans):
            assert b == k * stride and 0 < e - b <= length
            if k > 0:
                assert s <= stride and (s == stride or e == n - 1)


class PositionModel(nn.Module):
    """Logit of token 0 is j at window position j, all others 0: on a stream without token 0,
    -log p = log(e^j + V - 1) reveals which positions of each window were scored."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, self.vocab)
        logits[..., 0] = torch.arange(tokens.shape[1], dtype=torch.float32)
        return logits


def test_later_windows_score_only_their_last_stride_positions():
    vocab, n, length, stride = 8, 50, 12, 5
    stream = torch.arange(n) % (vocab - 1) + 1
    nll, count = window_nll(PositionModel(vocab), stream, length, stride, 1, CPU, show_progress=False)
    f = lambda j: math.log(math.exp(j) + vocab - 1)  # noqa: E731
    # window 0 reads positions 0..11 and scores all 12; windows at 5, 10, ..., 35 read 12 and score
    # positions 7..11; the last, at 40, is cut at the stream's end (reads 40..48: 9) and scores 7, 8.
    want = sum(f(j) for j in range(12)) + 7 * sum(f(j) for j in range(7, 12)) + f(7) + f(8)
    assert count == 12 + 7 * 5 + 2 == n - 1
    assert nll == pytest.approx(want, rel=1e-6)  # scoring one position wrong moves it by ~1e-3


# --------------------------------------------------------------------------- 3: batching


@pytest.mark.parametrize("stride", [None, 6])
def test_batch_size_does_not_change_the_result(model, stream, stride):
    one = window_nll(model, stream, 16, stride, 1, CPU, show_progress=False)
    three = window_nll(model, stream, 16, stride, 3, CPU, show_progress=False)
    assert one[1] == three[1]
    assert one[0] == pytest.approx(three[0], rel=1e-6)


def test_model_mode_is_restored_and_no_grad(model, stream):
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, tokens):
            seen.append((self.training, torch.is_grad_enabled()))
            return self.inner(tokens)

    spy = Spy().train()
    window_nll(spy, stream, 32, None, 2, CPU, show_progress=False)
    assert seen and all(s == (False, False) for s in seen)
    assert spy.training


# --------------------------------------------------------------------------- 4: streams


@pytest.fixture(scope="module")
def tokenizer(sp_model):
    return load_tokenizer(sp_model)


def test_file_stream_concatenates_tokenize_of_each_document(tmp_path, tokenizer):
    texts = make_texts(25, seed=3) + ["", "  ", "<s> literal control"]
    path = write_jsonl(tmp_path / "a.jsonl", [{"body": t, "other": 1} for t in texts])
    want = [i for t in texts for i in tokenizer.tokenize(t)]
    assert file_stream(path, tokenizer, text_key="body").tolist() == want
    got = file_stream(path, tokenizer, text_key="body", append_eod=True).tolist()
    assert got == [i for t in texts for i in tokenizer.tokenize(t) + [tokenizer.eod]]


def test_indexed_stream_is_the_datasets_tokens(tmp_path):
    docs = [np.arange(5), np.arange(100, 103), np.zeros(0, np.int64), np.arange(60000, 60007)]
    with IndexedDatasetWriter(tmp_path / "d", np.uint16) as w:
        for d in docs:
            w.add_documents(d, np.array([len(d)]))
    got = indexed_stream(tmp_path / "d")
    assert got.dtype == torch.int64
    assert got.tolist() == np.concatenate(docs).tolist()
    assert indexed_stream(f"{tmp_path / 'd'}.bin").tolist() == got.tolist()


# --------------------------------------------------------------------------- 5: known answers


class NextOf(nn.Module):
    """Predicts (token + 1) mod period with all its mass, in ``dtype``."""

    def __init__(self, vocab: int, period: int, dtype=torch.float32):
        super().__init__()
        self.vocab, self.period, self.dtype = vocab, period, dtype

    def forward(self, tokens):
        return 60.0 * nn.functional.one_hot((tokens + 1) % self.period, self.vocab).to(self.dtype)


class Uniform(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, tokens):
        return torch.zeros(*tokens.shape, self.vocab)


def test_a_perfect_model_has_perplexity_one_and_a_uniform_one_the_vocabulary():
    vocab, period = 128, 7
    stream = torch.arange(500) % period
    for dtype in (torch.float32, torch.bfloat16):
        [r] = evaluate(NextOf(vocab, period, dtype), {"periodic": stream}, [32], None, 4, CPU, show_progress=False)
        assert r.tokens == 499 and r.ppl == pytest.approx(1.0, abs=1e-6)
    [r] = evaluate(Uniform(vocab), {"periodic": stream}, [32], 8, 4, CPU, show_progress=False)
    assert r.ppl == pytest.approx(vocab, rel=1e-6) and r.nll == pytest.approx(math.log(vocab), rel=1e-6)


class RandomLogits(nn.Module):
    def __init__(self, vocab: int, dtype):
        super().__init__()
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)).mul(4).to(dtype)

    def forward(self, tokens):
        return self.table[tokens]


def test_bf16_logits_get_an_fp32_log_softmax():
    vocab = 128
    stream = torch.randint(0, vocab, (300,), generator=torch.Generator().manual_seed(2))
    model = RandomLogits(vocab, torch.bfloat16)
    nll, count = window_nll(model, stream, 64, None, 2, CPU, show_progress=False)
    logits = model.table[stream[:-1]].float()  # this model's windows do not matter: context-free
    want = nn.functional.cross_entropy(logits, stream[1:], reduction="sum").item()
    in_bf16 = -model.table[stream[:-1]].log_softmax(-1).gather(-1, stream[1:, None]).float().sum().item()
    assert count == 299 and nll == pytest.approx(want, rel=1e-6)
    assert abs(in_bf16 - want) > 1e-5 * abs(want)  # the check above can tell the two apart


def test_evaluate_render_and_dump(tmp_path, model, stream):
    results = evaluate(model, {"a": stream, "b": stream[:40]}, [8, 16], 4, 4, CPU, show_progress=False)
    assert [(r.name, r.seq_length) for r in results] == [("a", 8), ("a", 16), ("b", 8), ("b", 16)]
    nll, count = window_nll(model, stream, 16, 4, 1, CPU, show_progress=False)
    assert results[1].tokens == count and results[1].nll == pytest.approx(nll / count, rel=1e-9)
    assert results[1].ppl == pytest.approx(math.exp(results[1].nll), rel=1e-12)
    # longer context can only help this random model a little; the point is that the two differ
    assert results[0].nll != results[1].nll

    table = render(results)
    assert table.row_count == 4 and len(table.columns) == 5

    path = dump(results, tmp_path / "out" / "eval", {"load": tmp_path, "stride": 4})
    data = json.loads(path.read_text())
    assert data["stride"] == 4 and data["load"] == str(tmp_path)
    assert [PerplexityResult(**r) for r in data["results"]] == results
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


# --------------------------------------------------------------------------- 6: bad input


def test_bad_inputs_are_clear_errors(tmp_path, model, stream, tokenizer):
    run = lambda **kw: window_nll(
        **{
            **dict(
                model=model,
                stream=stream,
                seq_length=16,
                stride=None,  # noqa: E731
                batch_size=1,
                device=CPU,
                show_progress=False,
            ),
            **kw,
        }
    )
    for kw, needle in [
        (dict(seq_length=0), "--seq-length"),
        (dict(seq_length=-4), "--seq-length"),
        (dict(stride=17), "larger than --seq-length"),
        (dict(stride=0), "--stride"),
        (dict(batch_size=0), "--batch-size"),
        (dict(stream=stream[:1]), "at least 2"),
        (dict(stream=stream[None]), "1-D"),
        (dict(stream=torch.tensor([1, 128, 3])), "vocabulary has 128"),
        (dict(stream=torch.tensor([1, -1, 3])), "negative"),
    ]:
        with pytest.raises(CookbookError, match=needle):
            run(**kw)
    with pytest.raises(CookbookError, match="does not exist"):
        file_stream(tmp_path / "missing.jsonl", tokenizer)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(CookbookError, match="no documents"):
        file_stream(tmp_path / "empty.jsonl", tokenizer)
    write_jsonl(tmp_path / "other.jsonl", [{"content": "hello"}])
    with pytest.raises(CookbookError, match="has no key 'text'"):
        file_stream(tmp_path / "other.jsonl", tokenizer)
    with pytest.raises(CookbookError, match="does not exist"):
        indexed_stream(tmp_path / "nothing")
    with IndexedDatasetWriter(tmp_path / "one", np.uint16) as w:
        w.add_documents(np.array([5]), np.array([1]))
    with pytest.raises(CookbookError, match="at least 2"):
        indexed_stream(tmp_path / "one")
    with pytest.raises(CookbookError, match="nothing to evaluate"):
        evaluate(model, {}, [16], None, 1, CPU)
    with pytest.raises(CookbookError, match="no sequence length"):
        evaluate(model, {"a": stream}, [], None, 1, CPU)
    with pytest.raises(CookbookError, match="larger than --seq-length"):  # checked before any work
        evaluate(model, {"a": stream}, [32, 8], 16, 1, CPU)
    (tmp_path / "afile").write_text("")
    with pytest.raises(CookbookError, match="is a file"):
        dump([], tmp_path / "afile", {})
