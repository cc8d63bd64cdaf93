"""``cookbook serve`` under malformed input on loopback, raw sockets included: every request that is not a valid
completion request gets a 4xx in OpenAI's JSON error shape (never a 500, never a traceback in the log), a client
that leaves early costs one log line and its rows, and afterwards a normal request still gets the right answer."""

from __future__ import annotations

import json
import socket
import time

import pytest
from helpers_distill import serving

from cookbook.inference.sampling import SamplingParams
from inference_distill.server import MAX_JSON_DEPTH, ServeConfig

LIMIT = 1_000_000  # the default request size limit


@pytest.fixture(scope="module")
def server(teacher, local):
    cfg = ServeConfig(
        str(teacher["cookbook"]),
        port=0,
        max_batch_size=4,
        max_request_bytes=LIMIT,
        max_prompts=4,
        max_tokens_limit=40,
        max_model_len=64,
        log_requests=True,
    )
    with serving(cfg, local) as srv:
        yield srv


def exchange(server, data: bytes, timeout: float = 30) -> tuple[int, dict]:
    """Send raw bytes on a fresh connection; the status and JSON body of the answer."""
    host, port = server.server_address[:2]
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = s.recv(65536)
            assert chunk, f"closed without an answer to {data[:80]!r}"
            buf += chunk
        head, body = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = int(next(v for k, v in (line.split(": ", 1) for line in lines[1:]) if k.lower() == "content-length"))
        while len(body) < length:
            chunk = s.recv(65536)
            assert chunk
            body += chunk
    assert lines[0].startswith("HTTP/1.1 ") and ("Content-Type", "application/json") in [
        tuple(line.split(": ", 1)) for line in lines[1:]
    ]
    return status, json.loads(body)


def post(body: bytes, path: str = "/v1/completions", headers: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{headers}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def deep(levels: int) -> bytes:
    return b'{"prompt": ' + b"[" * levels + b"1" + b"]" * levels + b"}"


RAW = [  # (what, bytes, status)
    ("one word", b"GARBAGE\r\n\r\n", 400),
    ("four words", b"GET /health HTTP/1.1 extra\r\n\r\n", 400),
    ("HTTP/9.9", b"GET /health HTTP/9.9\r\n\r\n", 400),
    ("HTTP/1.x", b"GET /health HTTP/1.x\r\n\r\n", 400),
    ("HTTP/0.9", b"GET /health\r\n", 400),
    ("empty line", b"\r\n", 400),
    ("binary", b"\x00\xff\xfe \x80garbage \x81\r\n\r\n", 400),
    ("long request line", b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\n\r\n", 414),
    ("long header", b"GET /health HTTP/1.1\r\nX-A: " + b"b" * 70_000 + b"\r\n\r\n", 431),
    ("101 headers", b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n", 431),
    ("unknown method", b"BREW /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    ("HEAD", b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    ("negative length", post(b"{}").replace(b"Content-Length: 2", b"Content-Length: -5"), 400),
    ("two lengths", post(b"{}").replace(b"Content-Length: 2", b"Content-Length: 2, 2"), 400),
    ("no length", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n", 411),
    ("chunked", b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", 411),
    ("too large", post(b" " * (LIMIT + 1)), 413),
    ("too large, never sent", post(b"{}").replace(b"Content-Length: 2", b"Content-Length: %d" % (LIMIT + 1)), 413),
    ("not UTF-8", post(b'{"prompt": "\xff\xfe"}'), 400),
    ("NaN", post(b'{"prompt": "x", "temperature": NaN}'), 400),
    ("Infinity", post(b'{"prompt": "x", "temperature": Infinity}'), 400),
    ("-Infinity", post(b'{"prompt": "x", "top_p": -Infinity}'), 400),
    ("overflowing float", post(b'{"prompt": "x", "temperature": 1e999}'), 400),
    ("5000-digit integer", post(b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}"), 400),
    ("lone surrogate", post(b'{"prompt": "a\\ud800b"}'), 400),
    ("depth limit + 1", post(deep(MAX_JSON_DEPTH)), 400),
    ("depth 400000", post(deep(400_000)), 400),
    ("unclosed depth", post(b"[" * 900_000), 400),
    ("size at the limit", post(json.dumps({"prompt": "word " * ((LIMIT - 20) // 5)}).encode()[:LIMIT]), 400),
    ("not an object", post(b"[1, 2]"), 400),
    ("null", post(b"null"), 400),
    ("tokenize: list prompt", post(b'{"prompt": ["a"]}', "/tokenize"), 400),
    ("tokenize: chat", post(b'{"messages": []}', "/tokenize"), 400),
    ("detokenize: strings", post(b'{"tokens": ["1"]}', "/detokenize"), 400),
    ("detokenize: out of range", post(b'{"tokens": [1, 100000]}', "/detokenize"), 400),
    ("unknown model by path", b"GET /v1/models/other HTTP/1.1\r\nHost: x\r\n\r\n", 404),
]

TYPES = [  # wrong types and values at any depth
    {"prompt": [[1, [2]]]},
    {"prompt": [[1, "2"]]},
    {"prompt": [{"a": 1}]},
    {"prompt": [[1, 2.5]]},
    {"prompt": {"a": "b"}},
    {"prompt": "x", "stop": [["x"]]},
    {"prompt": "x", "stop": ["a"] * 33},
    {"prompt": "x", "stop_token_ids": [[1]]},
    {"prompt": "x", "stop_token_ids": [-1]},
    {"prompt": "x", "stream_options": {"include_usage": {"a": [1]}}},
    {"prompt": "x", "stream_options": [True]},
    {"prompt": "x", "logit_bias": {"1": [1]}},
    {"prompt": "x", "model": ["ckpt"]},
    {"prompt": "x", "max_tokens": {"x": 1}},
    {"prompt": "x", "temperature": [0.5]},
    {"prompt": "x", "seed": 2**70},
    {"prompt": "x", "seed": 1.5},
    {"prompt": "x", "n": 1e300},
    {"prompt": "x", "max_tokens": 10**30},
    {"prompt": "x", "temperature": 10**400},
    {"prompt": "x", "echo": "true"},
    {"prompt": "x", "logprobs": "1"},
    {"prompt": "x", "best_of": "2"},
    {"prompt": "x", "top_k": -7},
    {"prompt": "x", "top_p": 0.0},
    {"prompt": "x", "frequency_penalty": 2.5},
    {"prompt": "x", "repetition_penalty": -1},
    {"prompt": "x", "ignore_eos": 0},
    {"prompt": "x", "min_tokens": False},
    {"prompt": "x", "max_tokens": 0},
]


def test_every_malformed_request_gets_a_4xx_in_openais_shape(server, local, capfd):
    cases = [(what, data, status) for what, data, status in RAW]
    cases += [(f"types {i}", post(json.dumps(body).encode()), 400) for i, body in enumerate(TYPES)]
    for what, data, status in cases:
        got, answer = exchange(server, data)
        assert got == status, (what, answer)
        error = answer["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error", what
        assert error["message"] and "\n" not in error["message"] and len(error["message"]) < 1000, what
    # odd but valid values are served, not refused: a huge top_k is no top-k, a huge temperature a flat draw
    for body in (
        {"prompt": "x", "top_k": 10**30, "max_tokens": 2},
        {"prompt": "x", "temperature": 1e300, "max_tokens": 2},
        {"prompt": "x", "user": {"deep": [[[1]]]}, "max_tokens": 2},
    ):
        got, answer = exchange(server, post(json.dumps(body).encode()))
        assert got == 200 and answer["usage"]["completion_tokens"] == 2, (body, answer)
    # afterwards a normal request gets the right answer, and the log holds one line per message, no traceback
    got, answer = exchange(
        server, post(json.dumps({"prompt": "def main(", "max_tokens": 10, "temperature": 0}).encode())
    )
    ((want,),) = local.complete(["def main("], SamplingParams(max_tokens=10, temperature=0), [0])
    assert got == 200 and answer["choices"][0]["text"] == want.text
    log = capfd.readouterr().err
    assert "Traceback" not in log and "Error" not in log.replace("Error:", ""), log[-2000:]
    assert all(line.startswith("127.0.0.1 ") for line in log.splitlines()), log[-2000:]


def test_a_client_that_leaves_early_costs_one_line_and_its_rows(server, local, capfd, monkeypatch):
    host, port = server.server_address[:2]
    model, made = server.engine.model, []

    def slow(*args, **kwargs):  # 20 ms a forward: 40 tokens take far longer than the client stays
        time.sleep(0.02)
        return model(*args, **kwargs)

    def rows(req, updates, make=server.rows):
        made.extend(make(req, updates))
        return made[-len(req.ids) * req.params.n :]

    monkeypatch.setattr(server.engine, "model", slow)
    monkeypatch.setattr(server, "rows", rows)
    heavy = json.dumps({"prompt": ["def main(", "x", "import os", "y"], "max_tokens": 40, "temperature": 1.0})
    for data in (
        post(heavy.encode()),  # the whole request, then gone before the answer
        post(heavy.encode())[:-10],
    ):  # gone in the middle of the body: never reaches the engine
        s = socket.create_connection((host, port), timeout=10)
        s.sendall(data)
        time.sleep(0.3)
        s.close()
        for _ in range(200):  # bounded: the rows leave the engine within a step of the server noticing
            if not server.engine.running and not server.engine.waiting:
                break
            time.sleep(0.05)
        assert not server.engine.running and not server.engine.waiting
    assert len(made) == 4 and all(r.finish_reason == "cancelled" and len(r.tokens) < 40 for r in made), made
    monkeypatch.undo()
    got, answer = exchange(
        server, post(json.dumps({"prompt": "def main(", "max_tokens": 10, "temperature": 0}).encode())
    )
    ((want,),) = local.complete(["def main("], SamplingParams(max_tokens=10, temperature=0), [0])
    assert got == 200 and answer["choices"][0]["text"] == want.text
    log = capfd.readouterr().err.splitlines()
    left = [line for line in log if "left before the answer" in line]
    assert len(left) <= 2 and not any("Traceback" in line or "Broken" in line for line in log), log
