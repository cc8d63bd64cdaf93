"""Teacher backends: the ``openai`` backend against ``cookbook serve`` on loopback gives the ``cookbook`` backend's
completions (greedy, seeded sampling, n, stop strings, several endpoints), retries what is worth retrying and fails
fast and clearly on the rest; the ``vllm`` adapter maps our parameters and vLLM's outputs (against a stand-in
``vllm`` module: real vLLM needs CUDA and is not run here); ``make_backend`` refuses bad choices in one line."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
import types
import urllib.request
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from cookbook.engine.checkpoint import Checkpointer
from cookbook.errors import CookbookError
from cookbook.inference.sampling import Completion, SamplingParams, cut_at_stop
from cookbook.model import ModelConfig, Transformer
from inference_distill.backends import (
    VLLM_MISSING,
    OpenAIBackend,
    VLLMBackend,
    make_backend,
    normalize_endpoint,
    split_tokens,
)

# a vocabulary padded past the tokenizer's 600 pieces, as pretraining pads it; a large init for clear greedy choices
TINY = dict(
    vocab_size=640,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=128,
    max_seq_len=128,
    init_std=0.2,
)
PROMPTS = ["def main(", "import os\n", "class A:", "x", "for i in range(10):\n    print(i)"]
SEEDS = [11, 12, 13, 14, 15]
GREEDY = SamplingParams(max_tokens=12, temperature=0)
SERVER_BATCH = 4
FAST = dict(backoff=0.01, max_backoff=0.05, timeout=5)  # retries in milliseconds, not seconds


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, sp_model) -> str:
    """A random tiny model saved by the Trainer's Checkpointer, its SentencePiece tokenizer named in config.toml."""
    torch.manual_seed(0)
    cfg = ModelConfig(**TINY)
    model = Transformer(cfg)
    sections = {
        "model": {k: v for k, v in cfg.to_dict().items() if v is not None},
        "data": {"tokenizer_model": str(sp_model)},
    }
    root = tmp_path_factory.mktemp("teacher") / "run"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        Checkpointer(root, keep_last=0, is_main=True).save(
            1, model, torch.optim.AdamW(model.parameters()), sections, {"step": 1}
        )
    return str(root)


@pytest.fixture(scope="module")
def local(checkpoint):
    from inference_distill.local import CookbookBackend

    backend = CookbookBackend(checkpoint, device="cpu", dtype="fp32", batch_size=SERVER_BATCH)
    yield backend
    backend.close()


def start(server) -> str:
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


def stop(server) -> None:
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def servers(checkpoint, local):
    """Two ``cookbook serve`` servers over the checkpoint on loopback, counting the completions requests they answer."""
    from inference_distill.server import ServeConfig, make_server

    out = []
    for _ in range(2):
        server = make_server(
            ServeConfig(checkpoint, port=0, device="cpu", max_batch_size=SERVER_BATCH, log_requests=False),
            generator=local.generator,
        )
        server.answered = 0
        read = server.read_completion

        def counted(body, server=server, read=read):
            server.answered += 1
            return read(body)

        server.read_completion = counted
        out.append((server, start(server)))
    yield out
    for server, _ in out:
        stop(server)


def oracle(local, prompts, params, seeds) -> list[list[Completion]]:
    """What a server answers for one prompt per request: the cookbook backend on that prompt alone, with its seed."""
    return [local.generate([p], params, [s])[0] for p, s in zip(prompts, seeds)]


def dead_endpoint() -> str:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class Stub(BaseHTTPRequestHandler):
    """An endpoint that answers ``script``'s statuses first, then forwards to ``upstream``; it records the requests."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.answer(None)

    def do_POST(self):
        self.answer(self.rfile.read(int(self.headers["Content-Length"])))

    def answer(self, body: bytes | None) -> None:
        srv = self.server
        srv.seen.append((self.path, dict(self.headers), body))
        status = srv.script.pop(0) if srv.script else 200
        if status == 200:
            request = urllib.request.Request(
                srv.upstream + self.path, data=body, headers={"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=30) as r:
                data = r.read()
        else:
            data = json.dumps({"error": {"message": f"scripted\nfailure {status}", "type": "x"}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 429:
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def stub(servers):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    server.daemon_threads = True
    server.seen, server.script, server.upstream = [], [], servers[0][1]
    server.url = start(server)
    yield server
    stop(server)


# --------------------------------------------------------------------------- openai against cookbook serve


def test_openai_backend_gives_the_cookbook_backends_completions(servers, local):
    (_, url), _ = servers
    progress = []
    with OpenAIBackend([url + "/v1/"], concurrency=3) as backend:  # the URL as a client library takes it
        assert backend.name == "openai" and backend.teacher == "run"  # asked of /v1/models: the folder's name
        out = backend.generate(
            PROMPTS, GREEDY, SEEDS, on_progress=lambda p, t: progress.append((p, t, threading.current_thread()))
        )
        assert out == local.generate(PROMPTS, GREEDY, SEEDS)  # greedy: the batch does not matter
        assert {c.finish_reason for cs in out for c in cs} <= {"stop", "length"} and out[0][0].tokens > 0
        # progress from the caller's thread, once per prompt, adding up to the tokens generated
        assert len(progress) == len(PROMPTS) and all(t is threading.main_thread() for _, _, t in progress)
        assert sum(p for p, _, _ in progress) == len(PROMPTS)
        assert sum(t for _, t, _ in progress) == sum(c.tokens for cs in out for c in cs)

        sampled = SamplingParams(
            max_tokens=10, temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.3, frequency_penalty=0.5
        )
        got = backend.generate(PROMPTS, sampled, SEEDS)
        assert got == oracle(local, PROMPTS, sampled, SEEDS)
        assert got == backend.generate(PROMPTS, sampled, SEEDS)  # the same seeds: the same completions
        assert got != backend.generate(PROMPTS, sampled, [s + 100 for s in SEEDS])
        assert backend.generate([], GREEDY, []) == []


def test_n_completions_per_prompt(servers, local):
    (_, url), _ = servers
    with OpenAIBackend([url]) as backend:
        params = SamplingParams(max_tokens=8, temperature=1.0, n=3)
        got, want = backend.generate(PROMPTS, params, SEEDS), oracle(local, PROMPTS, params, SEEDS)
        assert [len(cs) for cs in got] == [3] * len(PROMPTS)
        assert [[(c.text, c.finish_reason) for c in cs] for cs in got] == [
            [(c.text, c.finish_reason) for c in cs] for cs in want
        ]
        # the server reports only the total of n completions: the split keeps it, and is exact for those cut at max_tokens
        for g, w in zip(got, want):
            assert sum(c.tokens for c in g) == sum(c.tokens for c in w)
            assert all(a.tokens == b.tokens == 8 for a, b in zip(g, w) if b.finish_reason == "length")


def test_stop_strings(servers, local):
    (_, url), _ = servers
    free = local.generate(PROMPTS, GREEDY, SEEDS)
    stops = tuple({cs[0].text[4:6] for cs in free if len(cs[0].text) > 6})
    params = SamplingParams(max_tokens=12, temperature=0, stop=stops)
    with OpenAIBackend([url]) as backend:
        got = backend.generate(PROMPTS, params, SEEDS)
    assert got == local.generate(PROMPTS, params, SEEDS)
    cut = [(g, f) for (g,), (f,) in zip(got, free) if cut_at_stop(f.text, stops)[1]]
    assert cut, "no completion holds a stop string: the test proves nothing"
    for g, f in cut:
        assert g.finish_reason == "stop" and g.text == cut_at_stop(f.text, stops)[0] and g.tokens <= f.tokens


def test_prompts_spread_over_endpoints_and_a_dead_one_is_passed_over(servers, local):
    (a, url_a), (b, url_b) = servers
    before = a.answered, b.answered
    prompts, seeds = PROMPTS * 4, list(range(20))
    want = local.generate(prompts, GREEDY, seeds)
    with OpenAIBackend([url_a, url_b], concurrency=2) as backend:
        assert backend.generate(prompts, GREEDY, seeds) == want
    assert a.answered - before[0] > 0 and b.answered - before[1] > 0
    assert a.answered + b.answered - sum(before) == len(prompts)
    # a node that is down: its prompts go to the other endpoint, the run completes
    with OpenAIBackend([dead_endpoint(), url_b], model="run", concurrency=2, retries=3, **FAST) as backend:
        assert backend.generate(prompts, GREEDY, seeds) == want


def test_429_and_5xx_are_retried(stub, local):
    stub.script = [503, 429, 500]
    with OpenAIBackend([stub.url], model="run", retries=3, api_key="sk-test", **FAST) as backend:
        got = backend.generate(PROMPTS[:1], GREEDY, SEEDS[:1])
    assert got == local.generate(PROMPTS[:1], GREEDY, SEEDS[:1])
    assert len(stub.seen) == 4 and all(path == "/v1/completions" for path, _, _ in stub.seen)
    assert stub.seen[0][1]["Authorization"] == "Bearer sk-test"
    body = json.loads(stub.seen[-1][2])
    assert body["model"] == "run" and body["prompt"] == PROMPTS[0] and body["seed"] == SEEDS[0] and body["n"] == 1
    # too few retries: the error names the endpoint, the tries and the server's last word
    stub.script = [503] * 3
    with OpenAIBackend([stub.url], model="run", retries=2, **FAST) as backend:
        with pytest.raises(CookbookError) as e:
            backend.generate(PROMPTS[:1], GREEDY, SEEDS[:1])
    message = one_line(e)
    assert stub.url in message and "3 tries" in message and "HTTP 503: scripted failure 503" in message


def test_a_refused_request_fails_at_once_with_the_servers_message(stub):
    stub.script = [400]
    with OpenAIBackend([stub.url], model="run", retries=5, **FAST) as backend:
        with pytest.raises(CookbookError) as e:
            backend.generate(PROMPTS[:1], GREEDY, SEEDS[:1])
    assert len(stub.seen) == 1 and "HTTP 400" in one_line(e) and "scripted failure 400" in one_line(e)


def test_the_real_servers_refusal_is_one_line(servers):
    (_, url), _ = servers
    with OpenAIBackend([url], retries=5, backoff=10) as backend:  # a retry would take seconds: there is none
        t0 = time.monotonic()
        with pytest.raises(CookbookError) as e:
            backend.generate(PROMPTS[:1], SamplingParams(max_tokens=200), [0])  # past the model's 128 positions
        assert time.monotonic() - t0 < 5
    assert "HTTP 400" in one_line(e) and "maximum context length is 128" in one_line(e)
    with OpenAIBackend([url], model="another-model", retries=0) as backend, pytest.raises(CookbookError) as e:
        backend.generate(PROMPTS[:1], GREEDY, [0])
    assert "HTTP 404" in one_line(e) and "another-model" in one_line(e)


def test_a_dead_endpoint_fails_after_its_retries(local):
    url = dead_endpoint()
    with OpenAIBackend([url], model="run", retries=2, **FAST) as backend:
        t0 = time.monotonic()
        with pytest.raises(CookbookError) as e:
            backend.generate(PROMPTS, GREEDY, SEEDS)
        assert time.monotonic() - t0 < 5
    message = one_line(e)
    assert url in message and "3 tries" in message and "Connection" in message and "--retries" in message
    with pytest.raises(CookbookError) as e:  # no model named: it cannot even be asked which one is served
        OpenAIBackend([url], retries=1, **FAST)
    assert "which model it serves" in one_line(e) and "--teacher" in one_line(e)


def test_request_bodies_send_extensions_only_when_set():
    backend = OpenAIBackend(["http://127.0.0.1:9"], model="m")
    try:
        plain = backend.request_body("p", SamplingParams(max_tokens=5, temperature=0.7, top_p=0.9), 3)
        assert plain == {
            "model": "m",
            "prompt": "p",
            "max_tokens": 5,
            "n": 1,
            "temperature": 0.7,
            "top_p": 0.9,
            "seed": 3,
            "stream": False,
        }  # only OpenAI's own names: a strict server takes it
        full = backend.request_body(
            "p",
            SamplingParams(
                top_k=40,
                repetition_penalty=2.0,
                frequency_penalty=0.5,
                presence_penalty=-0.5,
                stop=("</s>", "\n\n"),
                n=2,
            ),
            4,
        )
        assert {
            k: full[k] for k in ("top_k", "repetition_penalty", "frequency_penalty", "presence_penalty", "stop", "n")
        } == {
            "top_k": 40,
            "repetition_penalty": 2.0,
            "frequency_penalty": 0.5,
            "presence_penalty": -0.5,
            "stop": ["</s>", "\n\n"],
            "n": 2,
        }
        with pytest.raises(CookbookError, match="seeds"):
            backend.generate(PROMPTS, GREEDY, [0])
    finally:
        backend.close()


def test_answers_are_mapped_by_index():
    backend = OpenAIBackend(["http://127.0.0.1:9"], model="m")
    params = SamplingParams(max_tokens=4, n=3, stop=("END",))
    answer = {
        "choices": [
            {"index": 2, "text": "cc", "finish_reason": "length"},
            {"index": 0, "text": "a END b", "finish_reason": "length"},  # a server that kept the stop string
            {"index": 1, "text": "bbbbbbbb", "finish_reason": None},
        ],
        "usage": {"completion_tokens": 10},
    }
    got = backend.completions(answer, params)
    assert [c.text for c in got] == ["a ", "bbbbbbbb", "cc"]
    assert [c.finish_reason for c in got] == ["stop", "length", "length"]
    assert sum(c.tokens for c in got) == 10
    with_ids = {
        "choices": [{"index": i, "text": "x", "finish_reason": "stop", "token_ids": [1] * (i + 1)} for i in range(3)]
    }
    assert [c.tokens for c in backend.completions(with_ids, params)] == [1, 2, 3]
    backend.close()


def test_split_tokens_keeps_the_total():
    def choice(text, reason):
        return {"text": text, "finish_reason": reason}

    assert split_tokens(9, [choice("aaaa", "length"), choice("xx", "stop"), choice("x", "stop")], 4) == [4, 3, 2]
    assert split_tokens(7, [choice("a", "stop"), choice("a", "stop"), choice("a", "stop")], 16) == [3, 2, 2]
    # fewer tokens than the cut-off choices must have: the server counted otherwise; all share by length
    assert split_tokens(3, [choice("abc", "length"), choice("abc", "length")], 4) == [2, 1]
    assert split_tokens(0, [choice("", "stop"), choice("", "stop")], 4) == [0, 0]
    assert split_tokens(8, [choice("abc", "length"), choice("", "length")], 4) == [4, 4]
    assert split_tokens(9, [choice("abc", "length"), choice("", "length")], 4) == [
        7,
        2,
    ]  # more than they hold: by length


def test_endpoint_urls():
    assert normalize_endpoint("http://h:8000") == normalize_endpoint("http://h:8000/v1/") == "http://h:8000"
    assert normalize_endpoint(" https://h/api/v1 ") == "https://h/api"
    for bad in ("h:8000", "ftp://h", "http://"):
        with pytest.raises(CookbookError, match="not an http"):
            normalize_endpoint(bad)
    with pytest.raises(CookbookError, match="given twice"):
        OpenAIBackend(["http://h:1", "http://h:1/v1"], model="m")
    with pytest.raises(CookbookError, match="--concurrency"):
        OpenAIBackend(["http://h:1"], model="m", concurrency=0)


# --------------------------------------------------------------------------- vllm (a stand-in module, not vLLM)


class FakeLLM:
    """Shaped like vLLM's ``LLM``: records what it was given; ``generate`` answers RequestOutput-like objects."""

    instances: list = []

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []
        FakeLLM.instances.append(self)

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((list(prompts), list(params), use_tqdm))
        outputs = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            reasons = ["stop", "length", "abort", None]
            outs = [
                types.SimpleNamespace(
                    index=j,
                    text=f"{prompt}|{p.seed}|{j} STOP tail",
                    token_ids=list(range(j + 2)),
                    finish_reason=reasons[(i + j) % 4],
                )
                for j in range(p.n)
            ]
            outputs.append(types.SimpleNamespace(request_id=str(i), prompt=prompt, outputs=outs[::-1]))  # any order
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    FakeLLM.instances = []
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_vllm_adapter_maps_parameters_and_outputs(fake_vllm):
    """Our mapping onto vLLM's API, checked against a stand-in module: real vLLM was not run here."""
    backend = VLLMBackend("org/teacher-hf", tensor_parallel_size=8, dtype="bf16", max_model_len=4096, seed=3)
    (llm,) = FakeLLM.instances
    assert llm.kwargs == {
        "model": "org/teacher-hf",
        "tensor_parallel_size": 8,
        "gpu_memory_utilization": 0.9,
        "dtype": "bfloat16",
        "seed": 3,
        "trust_remote_code": False,
        "max_model_len": 4096,
    }
    assert backend.name == "vllm" and backend.teacher == "org/teacher-hf"
    params = SamplingParams(
        max_tokens=4096, temperature=0.7, top_p=0.9, n=2, stop=("STOP",), frequency_penalty=0.5, repetition_penalty=2.0
    )
    progress = []
    out = backend.generate(["p0", "p1"], params, [7, 8], on_progress=lambda p, t: progress.append((p, t)))
    ((prompts, sent, use_tqdm),) = llm.calls
    assert prompts == ["p0", "p1"] and use_tqdm is False
    assert [vars(s) for s in sent] == [
        {
            "n": 2,
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": -1,
            "max_tokens": 4096,
            "stop": ["STOP"],
            "frequency_penalty": 0.5,
            "presence_penalty": 0.0,
            "repetition_penalty": 2.0,
            "seed": seed,
        }
        for seed in (7, 8)
    ]
    assert out == [
        [Completion("p0|7|0 ", 2, "stop"), Completion("p0|7|1 ", 3, "stop")],
        [Completion("p1|8|0 ", 2, "stop"), Completion("p1|8|1 ", 3, "stop")],
    ]  # cut at the stop string
    assert progress == [(2, 10)]  # vLLM batches the call: one report at its end

    # without a stop string: vLLM's finish reasons; "abort" and none mean a cut-off text, i.e. "length"
    out = backend.generate(["a", "b"], SamplingParams(max_tokens=5, top_k=20, n=2), [1, 2])
    assert vars(llm.calls[-1][1][0])["top_k"] == 20 and vars(llm.calls[-1][1][0])["stop"] is None
    assert [[c.finish_reason for c in cs] for cs in out] == [["stop", "length"], ["length", "length"]]
    assert out[0][0].text == "a|1|0 STOP tail"
    assert backend.generate([], GREEDY, []) == []
    with pytest.raises(CookbookError, match="seeds"):
        backend.generate(["a"], GREEDY, [])
    backend.close()


def test_vllm_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # ``import vllm`` raises ImportError
    with pytest.raises(CookbookError) as e:
        VLLMBackend("org/teacher-hf")
    assert one_line(e) == VLLM_MISSING and "--backend openai" in VLLM_MISSING


def test_vllm_refuses_a_cookbook_checkpoint(fake_vllm, checkpoint):
    for path in (checkpoint, f"{checkpoint}/step_000001"):
        with pytest.raises(CookbookError) as e:
            VLLMBackend(path)
        assert "cookbook convert --from cookbook --to hf" in one_line(e)
    assert FakeLLM.instances == []  # refused before vLLM was asked to load anything


# --------------------------------------------------------------------------- make_backend


def make(kind, **overrides):
    args = dict(
        teacher=None,
        endpoints=[],
        tensor_parallel_size=1,
        concurrency=4,
        timeout=5,
        retries=0,
        device="cpu",
        dtype="fp32",
        batch_size=4,
        tokenizer_model=None,
    )
    return make_backend(kind, **{**args, **overrides})


def test_make_backend(servers, checkpoint, fake_vllm):
    cases = [
        (("llamacpp",), "unknown --backend 'llamacpp'"),
        (("openai",), "needs at least one --endpoint"),
        (("cookbook",), "needs --teacher"),
        (("vllm",), "needs --teacher"),
        (("cookbook", {"teacher": checkpoint, "endpoints": ["http://h:1"]}), "--endpoint is for --backend openai"),
    ]
    for args, message in cases:
        kind, overrides = args[0], (args[1] if len(args) > 1 else {})
        with pytest.raises(CookbookError, match=message) as e:
            make(kind, **overrides)
        one_line(e)
    (_, url), _ = servers
    backend = make("openai", endpoints=[url])
    assert isinstance(backend, OpenAIBackend) and backend.teacher == "run" and backend.concurrency == 4
    backend.close()
    backend = make("vllm", teacher="org/teacher-hf", tensor_parallel_size=2, dtype="auto", gpu_memory_utilization=0.8)
    assert backend.name == "vllm"
    assert {
        k: FakeLLM.instances[-1].kwargs[k] for k in ("tensor_parallel_size", "dtype", "gpu_memory_utilization")
    } == {"tensor_parallel_size": 2, "dtype": "auto", "gpu_memory_utilization": 0.8}
    backend = make("cookbook", teacher=checkpoint)
    assert backend.name == "cookbook" and backend.teacher == checkpoint and backend.batch_size == 4
    backend.close()


class Slow(BaseHTTPRequestHandler):
    """An endpoint whose completions never come in time: it lists a model, then holds every POST."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        data = json.dumps({"object": "list", "data": [{"id": "slow"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        self.server.posts += 1
        time.sleep(60)

    def log_message(self, *args) -> None:
        pass


def test_sigterm_stops_an_openai_run_at_once(tmp_path, checkpoint):
    """Preemption (SIGTERM) or Ctrl-C ends `distill generate --backend openai` in seconds, abandoning requests in
    flight (a completion may take minutes), with exit code 130 and no shard written."""
    import signal
    import subprocess

    server = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    server.daemon_threads, server.posts = True, 0
    url = start(server)
    prompts = tmp_path / "docs.jsonl"
    prompts.write_text(
        "".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + 1\n" * 3}) + "\n" for i in range(6))
    )
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cookbook",
            "distill",
            "generate",
            "--backend",
            "openai",
            "--endpoint",
            url,
            "--teacher",
            checkpoint,
            "--prompts-from",
            str(prompts),
            "--prefix-tokens",
            "4",
            "--output",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while server.posts == 0:
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.stderr.read().decode() if proc.poll() is not None else "no request"
            )
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        start_wait = time.monotonic()
        _, err = proc.communicate(timeout=30)
        assert time.monotonic() - start_wait < 10
        assert proc.returncode == 130 and b"Traceback" not in err, err.decode()
        assert not list(out.glob("shard_*"))
    finally:
        proc.kill()
        stop(server)
