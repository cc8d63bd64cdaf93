"""``cookbook serve``: an OpenAI-compatible completions server over a checkpoint (the role of Megatron-LM's text
generation server), on the standard library's threading HTTP server and our ``LocalGenerator``.

Routes: ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``. A request names its sampling as OpenAI's
completions API does (``max_tokens`` 16 by default, ``temperature`` 1, ``top_p``, ``n``, ``stop``, ``seed``,
``echo``, ``frequency_penalty``, ``presence_penalty``) plus vLLM's ``top_k`` (-1 or 0 = off),
``repetition_penalty`` and ``stop_token_ids``; ``prompt`` is a string, a list of strings, a list of token ids or a
list of such lists. Choices come prompt-major (``index = prompt * n + sample``), as OpenAI orders them; ``usage``
counts each prompt's tokens once and every completion's generated tokens (see ``inference_distill.local`` for what
a completion's token count is when a stop string cut it).

What the server refuses, with OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}``:
400 for a body that is not a JSON object, a field of the wrong type or value, more than ``max_prompts`` prompts (or
``n`` above it), ``max_tokens`` above ``max_tokens_limit``, a prompt plus ``max_tokens`` beyond ``max_model_len``
(the model's ``max_seq_len`` unless set; code ``context_length_exceeded``), token ids outside the vocabulary, and
what it cannot do (``stream``, ``logprobs``, ``suffix``, ``best_of`` other than ``n``, ``logit_bias``, vLLM's
``ignore_eos`` and ``min_tokens``); 404 for another path or a ``model`` that is not the one served (code
``model_not_found``); 405 for another method; 411 without a Content-Length; 413 for a body over
``max_request_bytes`` (judged from Content-Length, before the body is read); 500, one line, when generation fails
for another reason, after which the server goes on serving. Fields the server does not know (``user``, ...) are
ignored, as OpenAI's API tolerates them.

One generation runs at a time (a lock around the model); HTTP is handled in a thread per connection. With ``seed``
a request is deterministic (the same request gets the same response); without, each draws a fresh seed.
"""

from __future__ import annotations

import json
import secrets
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

from cookbook.errors import CookbookError
from inference_distill.local import LocalGenerator
from inference_distill.sampling import SamplingParams

ROUTES = {"/v1/completions": "POST", "/v1/models": "GET", "/health": "GET"}
DRAIN_LIMIT = 8 * 1024 * 1024  # a refused body up to this size is read and dropped, so the client sees the answer
SEED_RANGE = 2**31
# fields this server cannot honour, with the values that ask for nothing (anything else is refused)
UNSUPPORTED = {"stream": (None, False), "logprobs": (None,), "suffix": (None, ""), "logit_bias": (None, {}),
               "ignore_eos": (None, False), "min_tokens": (None, 0), "prompt_logprobs": (None,)}
PARAMS = ("max_tokens", "temperature", "top_p", "top_k", "n", "frequency_penalty", "presence_penalty",
          "repetition_penalty", "stop")


@dataclass
class ServeConfig:
    load: str  # a cookbook checkpoint or a Hugging Face model folder
    host: str = "127.0.0.1"
    port: int = 8000  # 0 picks a free port
    device: str = "auto"
    dtype: str = "fp32"
    batch_size: int = 16  # rows (prompts x n) per forward
    model_name: str | None = None  # what /v1/models lists and requests may name; default: the folder's name
    max_request_bytes: int = 1_000_000
    max_prompts: int = 64  # prompts per request; also the largest n
    max_tokens_limit: int = 4096  # the largest max_tokens a request may ask for
    max_model_len: int | None = None  # prompt + max_tokens at most; default: the model's max_seq_len
    tokenizer_model: str | None = None  # default: the checkpoint's tokenizer
    tokenizer_type: str | None = None
    log_requests: bool = True  # one line per request on stderr


class ApiError(Exception):
    """An answer other than 200, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# --------------------------------------------------------------------------- reading a request


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(body: dict, key: str, default: int | None) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not _is_int(v):
        raise ApiError(400, f"'{key}' must be an integer, not {json.dumps(v)[:40]}", key)
    return v


def _number(body: dict, key: str, default: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(400, f"'{key}' must be a number, not {json.dumps(v)[:40]}", key)
    return float(v)


def _token_list(v, what: str) -> list[int]:
    if not v or not all(_is_int(t) for t in v):
        raise ApiError(400, f"{what} must be a non-empty list of integer token ids", "prompt")
    return v


def read_prompts(v) -> list[str | list[int]]:
    """OpenAI's four prompt shapes -> a list of strings or token-id lists."""
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and v:
        if all(isinstance(p, str) for p in v):
            return v
        if all(_is_int(t) for t in v):
            return [v]
        if all(isinstance(p, list) for p in v):
            return [_token_list(p, f"prompt {i}") for i, p in enumerate(v)]
    raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists",
                   "prompt")


def read_stop(v) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return tuple(v)
    raise ApiError(400, "'stop' must be a string or a list of strings", "stop")


def sampling_params(body: dict, max_prompts: int, max_tokens_limit: int) -> SamplingParams:
    """The request's sampling fields as SamplingParams, checked (400 naming the first bad one)."""
    top_k = _int(body, "top_k", -1)
    if top_k < -1:
        raise ApiError(400, f"top_k {top_k} must be -1 or 0 (off) or positive", "top_k")
    params = SamplingParams(
        max_tokens=_int(body, "max_tokens", 16), temperature=_number(body, "temperature", 1.0),
        top_p=_number(body, "top_p", 1.0), top_k=max(top_k, 0), n=_int(body, "n", 1), stop=read_stop(body.get("stop")),
        frequency_penalty=_number(body, "frequency_penalty", 0.0), presence_penalty=_number(body, "presence_penalty", 0.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0),
    )
    try:
        params.check()
    except CookbookError as e:
        message = str(e)
        raise ApiError(400, message, next((p for p in PARAMS if message.startswith(p)), "stop" if "stop" in message else None)) from None
    if params.max_tokens > max_tokens_limit:
        raise ApiError(400, f"max_tokens {params.max_tokens} is above this server's limit of {max_tokens_limit}", "max_tokens")
    if params.n > max_prompts:
        raise ApiError(400, f"n {params.n} is above this server's limit of {max_prompts} completions per prompt", "n")
    best_of = body.get("best_of")
    if best_of is not None and best_of != params.n:
        raise ApiError(400, "best_of other than n is not supported by this server; leave it out", "best_of")
    return params


# --------------------------------------------------------------------------- the server


class CompletionServer(ThreadingHTTPServer):
    """The HTTP server with the model behind it; ``serve_forever`` answers requests."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, cfg: ServeConfig, generator: LocalGenerator):
        self.cfg, self.generator = cfg, generator
        self.model_name = cfg.model_name or Path(cfg.load).resolve().name
        self.max_model_len = cfg.max_model_len or generator.model.config.max_seq_len
        self.lock = threading.Lock()  # one generation at a time
        self.created = int(time.time())
        try:
            super().__init__((cfg.host, cfg.port), _Handler)
        except OSError as e:
            raise CookbookError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror or e}); pick another --port or --host") from None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "cookbook", "root": self.cfg.load,
                                            "max_model_len": self.max_model_len}]}

    def complete(self, body) -> dict:
        """A completions request (parsed JSON) -> the response object, or an ApiError."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        cfg, gen = self.cfg, self.generator
        model = body.get("model")
        if model is not None and model not in (self.model_name, cfg.load):
            raise ApiError(404, f"the model '{model}' does not exist; this server serves '{self.model_name}'", "model",
                           "model_not_found")
        for key, allowed in UNSUPPORTED.items():
            if key in body and body[key] not in allowed:
                raise ApiError(400, f"'{key}' is not supported by this server; leave it out", key)
        if "prompt" not in body:
            raise ApiError(400, "'prompt' is required", "prompt")
        prompts = read_prompts(body["prompt"])
        if len(prompts) > cfg.max_prompts:
            raise ApiError(400, f"{len(prompts)} prompts is above this server's limit of {cfg.max_prompts} per request", "prompt")
        params = sampling_params(body, cfg.max_prompts, cfg.max_tokens_limit)
        echo = body.get("echo", False)
        if not isinstance(echo, bool):
            raise ApiError(400, "'echo' must be true or false", "echo")
        seed = _int(body, "seed", None)
        stop_ids = body.get("stop_token_ids") or []
        if not isinstance(stop_ids, list) or not all(_is_int(t) for t in stop_ids):
            raise ApiError(400, "'stop_token_ids' must be a list of integer token ids", "stop_token_ids")

        ids = [gen.encode(p) for p in prompts]
        vocab = gen.vocab_size
        for i, p in enumerate(ids):
            if not p:
                raise ApiError(400, f"prompt {i} is empty (no tokens)", "prompt")
            if min(p) < 0 or max(p) >= vocab:
                raise ApiError(400, f"prompt {i} holds a token id outside the vocabulary [0, {vocab})", "prompt")
            if len(p) + params.max_tokens > self.max_model_len:
                raise ApiError(400, f"this model's maximum context length is {self.max_model_len} tokens, but prompt {i} "
                               f"has {len(p)} tokens and max_tokens is {params.max_tokens}; shorten the prompt or lower "
                               "max_tokens", "prompt", "context_length_exceeded")
        base = seed % SEED_RANGE if seed is not None else secrets.randbelow(SEED_RANGE)
        seeds = [base + i for i in range(len(ids))]
        with self.lock:
            try:
                out = gen.complete(ids, params, seeds, cfg.batch_size, stop_ids=stop_ids)
            except CookbookError as e:
                raise ApiError(400, str(e)) from None
        choices = []
        for i, (prompt, completions) in enumerate(zip(prompts, out)):
            head = (prompt if isinstance(prompt, str) else gen.decode(ids[i])) if echo else ""
            for j, c in enumerate(completions):
                choices.append({"index": i * params.n + j, "text": head + c.text, "finish_reason": c.finish_reason,
                                "logprobs": None})
        prompt_tokens = sum(len(p) for p in ids)
        completion_tokens = sum(c.tokens for cs in out for c in cs)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client may send many requests on one connection
    server_version = "cookbook-serve"
    timeout = 300  # seconds a connection may sit idle (or a body take to arrive)
    server: CompletionServer

    def do_GET(self):
        self._answer("GET")

    def do_POST(self):
        self._answer("POST")

    def do_PUT(self):
        self._answer("PUT")

    def do_DELETE(self):
        self._answer("DELETE")

    def do_PATCH(self):
        self._answer("PATCH")

    def handle_expect_100(self):
        """A client that waits for 100 Continue is refused before it sends a body that is too large."""
        try:
            self._body_length()
        except ApiError as e:
            self._send(e.status, e.body(), close=True)
            return False
        return super().handle_expect_100()

    def _body_length(self) -> int:
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(411, "chunked request bodies are not accepted; send a Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise ApiError(411, "the request has no Content-Length; send one with the JSON body")
        try:
            length = int(raw)
        except ValueError:
            length = -1
        if length < 0:
            raise ApiError(400, f"Content-Length {raw!r} is not a byte count")
        limit = self.server.cfg.max_request_bytes
        if length > limit:
            raise ApiError(413, f"the request body has {length} bytes, above this server's limit of {limit}")
        return length

    def _answer(self, method: str) -> None:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        body_read = False
        try:
            if path not in ROUTES:
                raise ApiError(404, f"no route {path}; use POST /v1/completions, GET /v1/models or GET /health")
            if method != ROUTES[path]:
                raise ApiError(405, f"{path} takes {ROUTES[path]}, not {method}")
            if path == "/health":
                return self._send(200, {"status": "ok"})
            if path == "/v1/models":
                return self._send(200, self.server.models())
            length = self._body_length()
            raw = self.rfile.read(length)
            body_read = True
            if len(raw) < length:
                self.close_connection = True
                return
            try:
                body = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise ApiError(400, f"the request body is not valid JSON ({str(e).splitlines()[0][:200]})") from None
            self._send(200, self.server.complete(body))
        except ApiError as e:
            self._refuse(e, body_read)
        except Exception as e:  # the server goes on; the client hears one line
            line = (str(e).splitlines() or [""])[0][:300]
            self._refuse(ApiError(500, f"internal error: {type(e).__name__}: {line}"), body_read)

    def _refuse(self, error: ApiError, body_read: bool) -> None:
        """Answer an error; a body left unread is drained when small (so the client reads the answer) and the
        connection closed, since what follows on it cannot be trusted to be the next request."""
        if not body_read and self.command in ("POST", "PUT", "PATCH") and not self.headers.get("Transfer-Encoding"):
            try:
                left = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                left = 0
            if 0 < left <= max(DRAIN_LIMIT, self.server.cfg.max_request_bytes):
                while left > 0:
                    chunk = self.rfile.read(min(left, 65536))
                    if not chunk:
                        break
                    left -= len(chunk)
            self._send(error.status, error.body(), close=True)
        else:
            self._send(error.status, error.body(), close=error.status >= 500 and not body_read)

    def _send(self, status: int, payload: dict, close: bool = False) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 405:
            self.send_header("Allow", ROUTES.get(urlsplit(self.path).path.rstrip("/"), "GET"))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        if self.server.cfg.log_requests:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")


# --------------------------------------------------------------------------- entry points


def check(cfg: ServeConfig) -> None:
    if not 0 <= cfg.port <= 65535:
        raise CookbookError(f"--port {cfg.port} is not a TCP port (0-65535; 0 picks a free one)")
    for name in ("batch_size", "max_request_bytes", "max_prompts", "max_tokens_limit"):
        if getattr(cfg, name) < 1:
            raise CookbookError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be at least 1")
    if cfg.max_model_len is not None and cfg.max_model_len < 2:
        raise CookbookError(f"--max-model-len {cfg.max_model_len} must be at least 2 (one prompt token, one new one)")


def make_server(cfg: ServeConfig, generator: LocalGenerator | None = None) -> CompletionServer:
    """The server, bound to ``cfg.host``:``cfg.port`` (``server.server_address`` has the port 0 picked) with the
    model loaded (or ``generator``, already loaded), not yet serving: call ``serve_forever``."""
    check(cfg)
    if generator is None:
        generator = LocalGenerator.load(cfg.load, cfg.device, cfg.dtype, cfg.tokenizer_model, cfg.tokenizer_type)
    return CompletionServer(cfg, generator)


def serve(cfg: ServeConfig) -> None:
    """Serve until Ctrl-C or SIGTERM, then close the socket and return."""
    server = make_server(cfg)

    def stop(signum, frame):  # shutdown() waits for serve_forever to return: not from its own thread
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    print(f"serving {server.model_name} at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
