"""``cookbook serve`` on loopback: OpenAI's completions shape, the same completions as LocalGenerator, every refusal
with its status and OpenAI's error shape, and a server that keeps serving after errors and under concurrency."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers_distill import serving

from cookbook.inference.sampling import SamplingParams
from inference_distill.server import ServeConfig, make_server

LIMITS = dict(max_request_bytes=4000, max_prompts=4, max_tokens_limit=40, max_model_len=64, log_requests=False)


@pytest.fixture(scope="module")
def server(teacher, local):
    with serving(ServeConfig(str(teacher["cookbook"]), port=0, max_batch_size=3, **LIMITS), local) as srv:
        yield srv


def call(
    server, path: str, body=None, method: str | None = None, raw: bytes | None = None, headers: dict | None = None
) -> tuple[int, dict]:
    host, port = server.server_address[:2]
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(
        f"http://{host}:{port}{path}",
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def complete(server, **body) -> dict:
    status, out = call(server, "/v1/completions", body)
    assert status == 200, out
    return out


def test_text_prompt_gives_the_generators_greedy_completion(server, local):
    out = complete(server, prompt="def main(", max_tokens=10, temperature=0)
    ((want,),) = local.complete(["def main("], SamplingParams(max_tokens=10, temperature=0), [0])
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-") and isinstance(out["created"], int)
    assert out["model"] == server.model_name == "ckpt"
    assert out["choices"] == [{"index": 0, "text": want.text, "finish_reason": want.finish_reason, "logprobs": None}]
    prompt_tokens = len(local.tokenizer.tokenize("def main("))
    assert out["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": want.tokens,
        "total_tokens": prompt_tokens + want.tokens,
    }


def test_prompt_shapes_n_and_choice_order(server, local):
    prompts = ["import os\n", "class A:", "x"]
    ids = [local.tokenizer.tokenize(p) for p in prompts]
    want = local.complete(prompts, SamplingParams(max_tokens=8, temperature=0), [0] * 3)
    texts = [[c.text for c in cs] for cs in want]
    by_text = complete(server, prompt=prompts, max_tokens=8, temperature=0, n=2)
    by_ids = complete(server, prompt=ids, max_tokens=8, temperature=0, n=2)
    for out in (by_text, by_ids):
        assert [c["index"] for c in out["choices"]] == list(range(6))
        assert [c["text"] for c in out["choices"]] == [t for ts in texts for t in ts * 2]  # prompt-major, then sample
        assert out["usage"]["prompt_tokens"] == sum(map(len, ids))  # each prompt counted once
        assert out["usage"]["completion_tokens"] == 2 * sum(c.tokens for cs in want for c in cs)
    one = complete(server, prompt=ids[1], max_tokens=8, temperature=0)  # a single list of token ids
    assert one["choices"][0]["text"] == texts[1][0]


def test_sampling_seed_stop_echo_and_model_field(server, local):
    body = dict(
        prompt=["def main(", "x"],
        max_tokens=12,
        temperature=1.0,
        top_p=0.9,
        top_k=-1,
        n=2,
        seed=11,
        frequency_penalty=0.5,
        presence_penalty=0.1,
        repetition_penalty=1.1,
        user="someone",
        model="ckpt",
        best_of=2,
        logprobs=None,
        stream=False,
        unknown_field=[1],
    )
    first = complete(server, **body)
    assert [c["text"] for c in complete(server, **body)["choices"]] == [c["text"] for c in first["choices"]]
    texts = {c["text"] for c in first["choices"]}
    assert len(texts) > 1
    # stop: the text cut before it, finish_reason "stop"
    greedy = complete(server, prompt="def main(", max_tokens=20, temperature=0)["choices"][0]["text"]
    stop = greedy[6:8]
    cut = complete(server, prompt="def main(", max_tokens=20, temperature=0, stop=[stop, "\x00"])["choices"][0]
    assert cut["text"] == greedy[: greedy.index(stop)] and cut["finish_reason"] == "stop"
    assert complete(server, prompt="def main(", max_tokens=20, temperature=0, stop=stop)["choices"][0] == cut
    # echo puts the prompt's text first (decoded, for token ids)
    echoed = complete(server, prompt="def main(", max_tokens=20, temperature=0, echo=True)["choices"][0]["text"]
    assert echoed == "def main(" + greedy
    ids = local.tokenizer.tokenize("def main(")
    echoed = complete(server, prompt=ids, max_tokens=20, temperature=0, echo=True)["choices"][0]["text"]
    assert echoed == local.decode(ids) + greedy  # the ids' text, without BOS
    # max_tokens defaults to 16, as in OpenAI's API
    assert complete(server, prompt=ids, temperature=0)["usage"]["completion_tokens"] <= 16


def test_models_and_health(server):
    status, out = call(server, "/v1/models")
    assert status == 200 and out["object"] == "list"
    assert [(m["id"], m["object"], m["max_model_len"]) for m in out["data"]] == [("ckpt", "model", 64)]
    assert call(server, "/v1/models/ckpt") == (200, out["data"][0])
    assert call(server, "/v1/models/other")[1]["error"]["code"] == "model_not_found"
    assert call(server, "/health") == (200, {"status": "ok"})


BAD = [  # (request body, status, param)
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "logprobs": -1}, 400, "logprobs"),
    ({"prompt": "x", "logprobs": True}, 400, "logprobs"),
    ({"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ({"prompt": "x", "best_of": 3}, 400, "best_of"),
    ({"prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 41}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "temperature": True}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "top_k": -2}, 400, "top_k"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "n": 5}, 400, "n"),
    ({"prompt": "x", "stop": 3}, 400, "stop"),
    ({"prompt": "x", "stop": [""]}, 400, "stop"),
    ({"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ({"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"prompt": "x", "echo": "yes"}, 400, "echo"),
    ({"prompt": "x", "seed": "1"}, 400, "seed"),
    ({}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [1, "a"]}, 400, "prompt"),
    ({"prompt": [[1, 2], []]}, 400, "prompt"),
    ({"prompt": [1, True]}, 400, "prompt"),
    ({"prompt": ["a", "b", "c", "d", "e"]}, 400, "prompt"),  # above max_prompts
    ({"prompt": [1, 2, 600]}, 400, "prompt"),  # the tokenizer has 600 pieces (the model's 640 rows are padding)
    ({"prompt": [-1]}, 400, "prompt"),
    ({"prompt": list(range(1, 40)), "max_tokens": 30}, 400, "prompt"),  # 39 + 30 > max_model_len 64
    ({"prompt": "x", "model": "another"}, 404, "model"),
]


@pytest.mark.parametrize(
    "body,status,param", BAD, ids=[f"{i}-{b.get('prompt', '')!s:.6}" for i, (b, _, _) in enumerate(BAD)]
)
def test_bad_requests_are_refused_in_openais_shape(server, body, status, param):
    got, out = call(server, "/v1/completions", body)
    assert got == status, out
    error = out["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and "\n" not in error["message"]
    if status == 404:
        assert error["code"] == "model_not_found"
    if body.get("max_tokens") == 30:
        assert error["code"] == "context_length_exceeded"


def test_http_level_refusals_and_the_server_keeps_serving(server):
    host, port = server.server_address[:2]
    cases = [
        (dict(path="/v1/nothing"), 404),
        (dict(path="/v1/completions", body={"prompt": "x"}, method="GET"), 405),
        (dict(path="/v1/models", body={"prompt": "x"}), 405),
        (dict(path="/health", method="DELETE"), 405),
        (dict(path="/v1/completions", raw=b"{not json"), 400),
        (dict(path="/v1/completions", raw=b"\xff\xfe"), 400),
        (dict(path="/v1/completions", raw=b"[1, 2]"), 400),
        (dict(path="/v1/completions", raw=json.dumps({"prompt": "x" * 5000}).encode()), 413),
    ]
    for kwargs, status in cases:
        got, out = call(server, **kwargs)
        assert got == status and set(out["error"]) == {"message", "type", "param", "code"}, (kwargs, out)
    # without a Content-Length (411), and a huge one refused before any byte of the body is sent (413)
    for headers, status in (({}, 411), ({"Content-Length": str(10**9)}, 413), ({"Content-Length": "x"}, 400)):
        conn = http.client.HTTPConnection(host, port, timeout=30)
        conn.putrequest("POST", "/v1/completions")
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        assert r.status == status and "error" in json.loads(r.read())
        conn.close()
    assert call(server, "/health")[0] == 200
    assert complete(server, prompt="x", max_tokens=2)["usage"]["completion_tokens"] >= 1


def test_an_internal_error_is_a_500_and_the_server_goes_on(server, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("the model fell over\nsecond line")

    monkeypatch.setattr(server.engine, "model", broken)
    status, out = call(server, "/v1/completions", {"prompt": "x"})
    assert status == 500 and out["error"]["type"] == "server_error"
    assert out["error"]["message"] == "generation failed: RuntimeError: the model fell over"
    monkeypatch.undo()
    assert complete(server, prompt="x", max_tokens=2)["choices"][0]["finish_reason"] in ("stop", "length")


def test_keep_alive_connection_serves_several_requests(server):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    for body in ({"prompt": "x", "max_tokens": 2}, {"prompt": "x", "n": 99}, {"prompt": "y", "max_tokens": 2}):
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == (400 if body.get("n") else 200) and json.loads(r.read())
    conn.close()


def test_concurrent_requests_are_all_answered(server, local):
    prompts = ["def main(", "import os\n", "class A:", "x", "for i in", "y = ", "print(", "z"]
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda p: complete(server, prompt=p, max_tokens=6, temperature=0), prompts))
    want = local.complete(prompts, SamplingParams(max_tokens=6, temperature=0), [0] * len(prompts))
    assert [o["choices"][0]["text"] for o in outs] == [cs[0].text for cs in want]


def test_make_server_loads_the_model_and_picks_a_port(teacher):
    srv = make_server(ServeConfig(str(teacher["hf"]), port=0, model_name="tiny", log_requests=False))
    try:
        assert srv.server_address[1] > 0 and srv.model_name == "tiny" and srv.max_model_len == 128
        assert srv.url == f"http://127.0.0.1:{srv.server_address[1]}/v1"
    finally:
        srv.server_close()


def test_serve_prints_its_address_and_stops_cleanly_on_sigterm(teacher):
    code = (
        "from inference_distill.server import ServeConfig, serve; "
        f"serve(ServeConfig({str(teacher['cookbook'])!r}, port=0, device='cpu', log_requests=False))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("serving ckpt at http://127.0.0.1:") and line.endswith("/v1"), (line, proc.stderr.read())
        url = line.split(" at ")[1].removesuffix("/v1")
        with urllib.request.urlopen(url + "/health", timeout=30) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- logprobs, echo, tokenizer routes


def test_logprobs_and_echo_equal_transformers_log_softmax(server, teacher, local):
    transformers = pytest.importorskip("transformers")
    import torch

    hf = transformers.AutoModelForCausalLM.from_pretrained(teacher["hf"], dtype=torch.float32).eval()
    ids = local.encode("def main(")
    with torch.no_grad():
        new = hf.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=6,
            min_new_tokens=6,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(ids) :].tolist()
        lp = torch.log_softmax(hf(torch.tensor([ids + new])).logits[0].float(), dim=-1)
    want = [lp[i - 1, t].item() for i, t in enumerate(ids + new) if i > 0]
    out = complete(server, prompt="def main(", max_tokens=6, temperature=0, logprobs=3, echo=True)["choices"][0]
    got = out["logprobs"]
    assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
    assert got["token_logprobs"][1:] == pytest.approx(want, abs=1e-4)
    assert out["text"] == "def main(" + local.continuation(ids, new)
    if "\ufffd" not in out["text"]:  # token texts join into the text (bytes that make no character may decode apart)
        assert "".join(got["tokens"]) == out["text"]
    assert got["text_offset"] == [sum(len(t) for t in got["tokens"][:i]) for i in range(len(ids) + 6)]
    for i, top in enumerate(got["top_logprobs"][1:], 1):  # the chosen token and the 3 most likely, by their text
        best = lp[i - 1].topk(3).values.tolist()
        assert top[got["tokens"][i]] == pytest.approx(want[i - 1], abs=1e-4) and 2 <= len(top) <= 4
        assert max(top.values()) == pytest.approx(max(best[0], want[i - 1]), abs=1e-4)
        assert all(min(abs(v - w) for w in best + [want[i - 1]]) < 1e-4 for v in top.values())
    # greedy: the chosen token is the most likely (what lm-eval's is_greedy reads)
    assert all(got["token_logprobs"][i] == max(got["top_logprobs"][i].values()) for i in range(len(ids), len(ids) + 6))
    # max_tokens 0 with echo scores the prompt and generates nothing; without echo the logprobs of the new tokens
    scored = complete(server, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert scored["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(want[: len(ids) - 1], abs=1e-4)
    assert scored["usage"]["completion_tokens"] == 0 and scored["choices"][0]["text"] == local.decode(ids)
    plain = complete(server, prompt=ids, max_tokens=6, temperature=0, logprobs=1)["choices"][0]["logprobs"]
    assert plain["token_logprobs"] == pytest.approx(want[len(ids) - 1 :], abs=1e-4) and plain["text_offset"][0] == 0
    # lm-eval's loglikelihood request: several prompts, echo, one token, logprobs 1
    two = complete(server, prompt=[ids, ids[:3]], max_tokens=1, temperature=0, logprobs=1, echo=True, seed=1234)
    assert [len(c["logprobs"]["tokens"]) for c in two["choices"]] == [len(ids) + 1, 4]


def test_tokenizer_routes_take_vllms_shapes_and_lm_eval_uses_them(server, local):
    status, out = call(server, "/tokenize", {"prompt": "def main(", "return_token_strs": True})
    assert status == 200 and out["tokens"] == local.encode("def main(") and out["count"] == len(out["tokens"])
    assert out["max_model_len"] == 64 and "".join(out["token_strs"]) == local.decode(out["tokens"])
    plain = call(server, "/tokenize", {"prompt": "def main(", "add_special_tokens": False})[1]
    assert plain["tokens"] == out["tokens"][1:] and plain["token_strs"] is None  # no BOS
    assert call(server, "/detokenize", {"tokens": out["tokens"]}) == (200, {"prompt": local.decode(out["tokens"])})
    status, info = call(server, "/tokenizer_info")
    assert status == 200 and (info["eos_token"], info["bos_token"]) == ("</s>", "<s>")
    # lm-eval finds the eos and bos ids by tokenizing their strings
    ids = call(server, "/tokenize", {"prompt": "</s>x<s>", "add_special_tokens": False})[1]["tokens"]
    assert (ids[0], ids[-1]) == (local.eos, local.tokenizer.bos) and local.eos not in ids[1:-1]
    utils = pytest.importorskip("lm_eval.utils")
    host, port = server.server_address[:2]
    base = f"http://{host}:{port}/v1/completions"
    assert utils.check_remote_tokenizer_support(base)
    remote = utils.RemoteTokenizer(base)
    assert (remote.eos_token_id, remote.bos_token_id) == (local.eos, local.tokenizer.bos)
    assert remote.encode("def main(") == plain["tokens"] and remote.decode(plain["tokens"]) == local.decode(
        plain["tokens"]
    )


# --------------------------------------------------------------------------- batching, seeds, streaming, the openai client


def test_a_sample_is_the_same_alone_as_inside_a_batch_of_mixed_requests(server):
    alone = complete(server, prompt="def main(", max_tokens=12, temperature=1.0, top_p=0.95, seed=5)["choices"][0][
        "text"
    ]
    mixed = [  # sent together: other prompts, greedy and penalised, n > 1, a list around it, a stream
        dict(prompt="def main(", max_tokens=12, temperature=1.0, top_p=0.95, seed=5),
        dict(prompt=["x", "def main(", "class A:"], max_tokens=12, temperature=1.0, top_p=0.95, seed=5),
        dict(prompt="def main(", max_tokens=12, temperature=1.0, top_p=0.95, seed=5, n=3),
        dict(prompt="import os\n", max_tokens=20, temperature=0),
        dict(prompt=["y", "z"], max_tokens=15, temperature=0.8, repetition_penalty=1.2, seed=9),
        dict(prompt="for i in", max_tokens=10, temperature=1.0),
    ]
    with ThreadPoolExecutor(len(mixed)) as pool:
        outs = list(pool.map(lambda body: complete(server, **body), mixed))
    assert outs[0]["choices"][0]["text"] == alone
    assert outs[1]["choices"][1]["text"] == alone  # inside a list, the same seed
    assert outs[2]["choices"][0]["text"] == alone and len({c["text"] for c in outs[2]["choices"]}) > 1


def test_requests_join_the_running_batch_and_a_timeout_cancels(server, teacher, local, monkeypatch):
    model = server.engine.model

    def slow(*args, **kwargs):  # 20 ms a forward, so that the long request is surely running
        time.sleep(0.02)
        return model(*args, **kwargs)

    monkeypatch.setattr(server.engine, "model", slow)
    with ThreadPoolExecutor(1) as pool:
        long = pool.submit(complete, server, prompt="def main(", max_tokens=40, temperature=0)
        for _ in range(200):
            if server.engine.running:
                break
            time.sleep(0.01)
        short = complete(server, prompt="x", max_tokens=2, temperature=0)  # joins at the next step
        assert not long.done() and server.engine.running, "the short request waited for the long one"
        assert long.result()["usage"]["completion_tokens"] > 0 and short["usage"]["completion_tokens"] <= 2
    monkeypatch.setattr(server.cfg, "request_timeout", 0.2)
    status, out = call(server, "/v1/completions", {"prompt": "def main(", "max_tokens": 40, "temperature": 0})
    assert status == 408 and out["error"]["code"] == "timeout"
    for _ in range(100):
        if not server.engine.running:
            break
        time.sleep(0.02)
    assert not server.engine.running


def test_the_official_openai_client_streams_and_retrieves_the_model(server, local):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
    assert client.models.retrieve("ckpt").id == "ckpt" and [m.id for m in client.models.list()] == ["ckpt"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    body = dict(
        model="ckpt",
        prompt=["def main(", "class A:"],
        max_tokens=10,
        temperature=1.0,
        seed=3,
        n=2,
        echo=True,
        logprobs=2,
    )
    whole = client.completions.create(**body)
    stream = client.completions.create(**body, stream=True, stream_options={"include_usage": True})
    texts, reasons, tokens, usage = {}, {}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            tokens[c.index] = tokens.get(c.index, []) + list(c.logprobs.tokens)
            reasons[c.index] = c.finish_reason or reasons.get(c.index)
    for c in whole.choices:  # the chunks join into the whole answer (bytes that make no character aside: decoders
        # such as Hugging Face's byte fallback turn a run of them into U+FFFD differently as the run grows)
        assert texts[c.index] == c.text or "\ufffd" in c.text, (texts[c.index], c.text)
    assert [reasons[c.index] for c in whole.choices] == [c.finish_reason for c in whole.choices]
    assert [tokens[c.index] for c in whole.choices] == [c.logprobs.tokens for c in whole.choices]
    assert usage.completion_tokens == whole.usage.completion_tokens
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="ckpt", prompt="x", logprobs=21)
    assert e.value.status_code == 400 and "logprobs" in str(e.value)
