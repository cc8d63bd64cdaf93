"""``cookbook serve``: an OpenAI-compatible completions server over a checkpoint (the role of Megatron-LM's text
generation server, with vLLM's API), on the standard library's threading HTTP server and the continuous-batching
engine of ``cookbook.inference``.

Routes: ``POST /v1/completions``, ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``, and vLLM's
``POST /tokenize`` (``{"prompt", "add_special_tokens", "return_token_strs"}`` -> ``{"count", "max_model_len",
"tokens", "token_strs"}``), ``POST /detokenize`` (``{"tokens"}`` -> ``{"prompt"}``) and ``GET /tokenizer_info``
(the tokenizer's class and bos/eos strings, what lm-evaluation-harness asks before it tokenizes remotely).

A completions request names its sampling as OpenAI's legacy completions API does (``max_tokens`` 16 by default,
``temperature`` 1, ``top_p``, ``n``, ``stop``, ``seed``, ``echo``, ``logprobs``, ``stream``, ``stream_options``,
``frequency_penalty``, ``presence_penalty``) plus vLLM's ``top_k`` (-1 or 0 = off), ``repetition_penalty`` and
``stop_token_ids``; ``prompt`` is a string, a list of strings, a list of token ids or a list of such lists. Choices
come prompt-major (``index = prompt * n + sample``), as OpenAI orders them; ``usage`` counts each prompt's tokens
once and every completion's generated tokens (see ``cookbook.inference.generator`` for what a completion's token
count is when a stop string cut it).

Batching: every prompt x sample is one row of the engine; rows of all requests in flight share its batch (up to
``--max-batch-size`` rows and the KV budget), joining at the next decode step and leaving it when they finish. A
row's sample depends only on its prompt, its seed and its parameters: sample j of a prompt uses
``sample_seed(seed, j)``, so a prompt samples alike alone, inside a list or beside other requests. Without ``seed``
each row draws a fresh one. A client that disconnects, or a request past ``--request-timeout`` (408), has its rows
cancelled at the next step.

Logprobs (``logprobs: k``, 0..20), as vLLM answers them: per token its logprob and the k most likely alternatives
(``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``; ``top_logprobs`` holds the chosen token and
the top k, so k + 1 entries at most). With ``echo`` the prompt's tokens come first, the first with a null logprob;
``max_tokens: 0`` with ``echo`` scores the prompt and generates nothing. The numbers are the model's raw
distribution (fp32 log-softmax of the logits, before penalties, temperature, top-k and top-p), vLLM's default:
a token drawn at temperature 0.7 reports the model's logprob, not the tempered one. -inf is sent as -9999.0.
``tokens`` are the text each token adds (they join into the choice's text); alternatives are named by their own
text.

Streaming (``stream: true``): server-sent events in OpenAI's shape, one ``text_completion`` chunk per choice as its
text grows (the first carries the echoed prompt), ``finish_reason`` on its last chunk, a usage chunk with
``stream_options: {"include_usage": true}``, then ``data: [DONE]``. Text that may be the start of a stop string
is held back until it is known not to be.

What the server refuses, always in OpenAI's error shape ``{"error": {"message", "type", "param", "code"}}`` and
never with a traceback: 400 for a body that is not a JSON object (not UTF-8, not JSON, NaN or Infinity, nested
deeper than ``MAX_JSON_DEPTH``), a field of the wrong type or value at any depth, more than ``max_prompts``
prompts (or ``n`` above it), ``max_tokens`` above ``max_tokens_limit`` (or 0 without ``echo``), ``logprobs``
outside 0..20, a prompt plus ``max_tokens`` beyond ``max_model_len`` (code ``context_length_exceeded``), token ids
outside the vocabulary, and what it cannot do (``suffix``, ``best_of`` other than ``n``, ``logit_bias``, vLLM's
``ignore_eos``, ``min_tokens`` and ``prompt_logprobs``); 400 for a malformed request line or HTTP version; 404 for
another path or a ``model`` that is not the one served (code ``model_not_found``); 405 for another method; 408
past ``--request-timeout``; 411 without a Content-Length; 413 for a body over ``max_request_bytes`` (judged from
Content-Length, before the body is read); 414 for a request line over 64 KiB; 431 for a header line over 64 KiB or
more than 100 headers. 500 only when the model itself fails (out of memory, say), one line, after which the server
goes on serving. Fields the server does not know (``user``, ...) are ignored, as OpenAI's API tolerates them.
"""

from __future__ import annotations

import json
import math
import queue
import re
import select
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from cookbook.errors import CookbookError
from cookbook.inference.engine import Engine
from cookbook.inference.engine import Sequence as Row
from cookbook.inference.generator import LocalGenerator
from cookbook.inference.logprobs import MAX_LOGPROBS, TokenLogprob
from cookbook.inference.sampling import Completion, SamplingError, SamplingParams, check_seed, cut_at_stop
from cookbook.inference.text import Detokenizer

ROUTES = {
    "/v1/completions": "POST",
    "/v1/models": "GET",
    "/health": "GET",
    "/tokenize": "POST",
    "/detokenize": "POST",
    "/tokenizer_info": "GET",
}
MODEL_ROUTE = "/v1/models/"  # + a model id
DRAIN_LIMIT = 8 * 1024 * 1024  # a refused body up to this size is read and dropped, so the client sees the answer
DRAIN_WAIT = 2.0  # seconds the rest of a refused body may take to arrive
MAX_JSON_DEPTH = 64  # nesting of arrays and objects a request body may have
MAX_STOP = 32  # stop strings per request
POLL = 0.05  # seconds between looks at a waiting client's socket
# fields this server cannot honour, with the values that ask for nothing (anything else is refused)
UNSUPPORTED = {
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "ignore_eos": (None, False),
    "min_tokens": (None, 0),
    "prompt_logprobs": (None,),
}


@dataclass
class ServeConfig:
    load: str  # a cookbook checkpoint or a Hugging Face model folder
    host: str = "127.0.0.1"
    port: int = 8000  # 0 picks a free port
    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int = 32  # rows (prompts x n, of all requests) decoded together
    kv_cache_tokens: int | None = None  # rows x length of the KV cache at most (default: see Engine)
    request_timeout: float | None = None  # seconds a request may take; None: no limit
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


class ClientGone(Exception):
    """The client closed its connection before the answer."""


# --------------------------------------------------------------------------- reading a request


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a number")
    return value


def read_json(raw: bytes):
    """A request body -> its JSON value; ApiError 400 for text that is not UTF-8, not strict JSON (NaN, Infinity and
    numbers that overflow are refused) or nested deeper than MAX_JSON_DEPTH."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "the request body is not UTF-8 text") from None
    depth = 0
    for c in re.sub(r"[^\[\]{}]", "", _STRINGS.sub("", text)):
        depth += 1 if c in "[{" else -1
        if depth > MAX_JSON_DEPTH:
            raise ApiError(400, f"the request body is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({(str(e).splitlines() or [''])[0][:200]})") from None
    if "\\u" in text:  # escapes may spell lone surrogates, which no text can hold (or be answered with)
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(
                400, "the request body holds a lone surrogate escape (\\ud800-\\udfff); send valid Unicode"
            ) from None
    return value


def _kind(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    return {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object"}.get(
        type(v), "a value"
    )


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(body: dict, key: str, default: int | None) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not _is_int(v):
        raise ApiError(400, f"'{key}' must be an integer, not {_kind(v)}", key)
    return v


def _number(body: dict, key: str, default: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ApiError(400, f"'{key}' must be a number, not {_kind(v)}", key)
    try:
        return float(v)
    except OverflowError:  # an integer too large for a float
        raise ApiError(400, f"'{key}' is out of range", key) from None


def _bool(body: dict, key: str, default: bool = False) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ApiError(400, f"'{key}' must be true or false, not {_kind(v)}", key)
    return v


def _token_list(v, what: str) -> list[int]:
    if not isinstance(v, list) or not v or not all(_is_int(t) for t in v):
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
    raise ApiError(
        400, "'prompt' must be a string, a list of strings, a list of token ids or a list of token-id lists", "prompt"
    )


def read_stop(v) -> tuple[str, ...]:
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        if len(v) > MAX_STOP:
            raise ApiError(400, f"{len(v)} stop strings is above this server's limit of {MAX_STOP}", "stop")
        return tuple(v)
    raise ApiError(400, "'stop' must be a string or a list of strings", "stop")


def sampling_params(body: dict, max_prompts: int, max_tokens_limit: int, allow_no_tokens: bool) -> SamplingParams:
    """The request's sampling fields as SamplingParams, checked (400 naming the first bad one)."""
    top_k = _int(body, "top_k", -1)
    if top_k < -1:
        raise ApiError(400, f"top_k {top_k} must be -1 or 0 (off) or positive", "top_k")
    params = SamplingParams(
        max_tokens=_int(body, "max_tokens", 16),
        temperature=_number(body, "temperature", 1.0),
        top_p=_number(body, "top_p", 1.0),
        top_k=max(top_k, 0),
        n=_int(body, "n", 1),
        stop=read_stop(body.get("stop")),
        frequency_penalty=_number(body, "frequency_penalty", 0.0),
        presence_penalty=_number(body, "presence_penalty", 0.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0),
    )
    try:
        params.check(allow_no_tokens=allow_no_tokens)
    except SamplingError as e:
        message = str(e) + (
            "; max_tokens 0 needs echo (it scores the prompt)"
            if e.param == "max_tokens" and params.max_tokens == 0
            else ""
        )
        raise ApiError(400, message, e.param) from None
    if params.max_tokens > max_tokens_limit:
        raise ApiError(
            400, f"max_tokens {params.max_tokens} is above this server's limit of {max_tokens_limit}", "max_tokens"
        )
    if params.n > max_prompts:
        raise ApiError(400, f"n {params.n} is above this server's limit of {max_prompts} completions per prompt", "n")
    best_of = body.get("best_of")
    if best_of is not None and best_of != params.n:
        raise ApiError(400, "best_of other than n is not supported by this server; leave it out", "best_of")
    return params


@dataclass
class CompletionRequest:
    """A checked completions request."""

    prompts: list[str | list[int]]  # as sent
    ids: list[list[int]]
    params: SamplingParams
    seed: int | None
    echo: bool
    logprobs: int | None
    stream: bool
    include_usage: bool
    stop_ids: list[int]


# --------------------------------------------------------------------------- the server


class CompletionServer(ThreadingHTTPServer):
    """The HTTP server with the engine behind it; ``serve_forever`` answers requests, ``server_close`` also stops the
    engine."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256  # connections waiting to be accepted: many clients connect at once

    def __init__(self, cfg: ServeConfig, generator: LocalGenerator):
        self.cfg, self.generator = cfg, generator
        self.model_name = cfg.model_name or Path(cfg.load).resolve().name
        self.max_model_len = cfg.max_model_len or generator.model.config.max_seq_len
        self.engine = Engine(
            generator.model,
            eos_id=generator.eos,
            max_batch_size=cfg.max_batch_size,
            max_model_len=self.max_model_len,
            kv_tokens=cfg.kv_cache_tokens,
        )
        self.created = int(time.time())
        try:
            super().__init__((cfg.host, cfg.port), _Handler)
        except OSError as e:
            raise CookbookError(
                f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror or e}); pick another --port or --host"
            ) from None
        self.engine_thread = threading.Thread(target=self.engine.serve_forever, name="engine", daemon=True)
        self.engine_thread.start()

    def server_close(self) -> None:
        super().server_close()
        self.engine.shutdown()
        self.engine_thread.join(30)

    def handle_error(self, request, client_address) -> None:
        """One line instead of socketserver's traceback; nothing for a client that went away."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            return
        if self.cfg.log_requests:
            line = (str(error).splitlines() or [""])[0][:300]
            sys.stderr.write(f"{client_address[0]} connection error: {type(error).__name__}: {line}\n")

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/v1"

    def model_card(self) -> dict:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "cookbook",
            "root": self.cfg.load,
            "max_model_len": self.max_model_len,
        }

    def models(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, f"'model' must be a string, not {_kind(model)}", "model")
        if model is not None and model not in (self.model_name, self.cfg.load):
            raise ApiError(
                404,
                f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                "model",
                "model_not_found",
            )

    # ----------------------------------------------------------------------- tokenizer routes

    def tokenize(self, body) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        self.check_model(body)
        if "messages" in body:
            raise ApiError(400, "chat messages are not supported by this server; send 'prompt'", "messages")
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ApiError(400, f"'prompt' must be a string, not {_kind(prompt)}", "prompt")
        ids = self.generator.text.encode(prompt, _bool(body, "add_special_tokens", True))
        strs = self.generator.text.token_texts(ids) if _bool(body, "return_token_strs", False) else None
        return {"count": len(ids), "max_model_len": self.max_model_len, "tokens": ids, "token_strs": strs}

    def detokenize(self, body) -> dict:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        self.check_model(body)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(_is_int(t) for t in tokens):
            raise ApiError(400, "'tokens' must be a list of integer token ids", "tokens")
        vocab = self.generator.vocab_size
        if tokens and (min(tokens) < 0 or max(tokens) >= vocab):
            raise ApiError(400, f"'tokens' holds an id outside the vocabulary [0, {vocab})", "tokens")
        return {"prompt": self.generator.decode(tokens)}

    # ----------------------------------------------------------------------- completions

    def read_completion(self, body) -> CompletionRequest:
        """A completions request (parsed JSON) -> CompletionRequest, or an ApiError."""
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        cfg, gen = self.cfg, self.generator
        self.check_model(body)
        for key, allowed in UNSUPPORTED.items():
            if key in body and not any(body[key] == a and type(body[key]) is type(a) for a in allowed):
                raise ApiError(400, f"'{key}' is not supported by this server; leave it out", key)
        if "prompt" not in body:
            raise ApiError(400, "'prompt' is required", "prompt")
        prompts = read_prompts(body["prompt"])
        if len(prompts) > cfg.max_prompts:
            raise ApiError(
                400, f"{len(prompts)} prompts is above this server's limit of {cfg.max_prompts} per request", "prompt"
            )
        echo = _bool(body, "echo")
        params = sampling_params(body, cfg.max_prompts, cfg.max_tokens_limit, allow_no_tokens=echo)
        logprobs = _int(body, "logprobs", None)
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise ApiError(400, f"logprobs {logprobs} must be in 0..{MAX_LOGPROBS}", "logprobs")
        seed = _int(body, "seed", None)
        if seed is not None:
            try:
                check_seed(seed)
            except SamplingError as e:
                raise ApiError(400, str(e), "seed") from None
        stream = _bool(body, "stream")
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise ApiError(400, f"'stream_options' must be an object, not {_kind(options)}", "stream_options")
        include_usage = _bool(options or {}, "include_usage")
        stop_ids = body.get("stop_token_ids") or []
        if not isinstance(stop_ids, list) or not all(_is_int(t) and 0 <= t < gen.vocab_size for t in stop_ids):
            raise ApiError(
                400, f"'stop_token_ids' must be a list of token ids in [0, {gen.vocab_size})", "stop_token_ids"
            )

        ids = [gen.encode(p) for p in prompts]
        vocab = gen.vocab_size
        for i, p in enumerate(ids):
            if not p:
                raise ApiError(400, f"prompt {i} is empty (no tokens)", "prompt")
            if min(p) < 0 or max(p) >= vocab:
                raise ApiError(400, f"prompt {i} holds a token id outside the vocabulary [0, {vocab})", "prompt")
            if len(p) + params.max_tokens > self.max_model_len:
                raise ApiError(
                    400,
                    f"this model's maximum context length is {self.max_model_len} tokens, but prompt {i} "
                    f"has {len(p)} tokens and max_tokens is {params.max_tokens}; shorten the prompt or lower "
                    "max_tokens",
                    "prompt",
                    "context_length_exceeded",
                )
        return CompletionRequest(prompts, ids, params, seed, echo, logprobs, stream, include_usage, stop_ids)

    def rows(self, req: CompletionRequest, updates: queue.Queue) -> list[Row]:
        """The engine rows of a request, prompt-major; each puts itself on ``updates`` after every step when the
        request streams, else once, when it is done (so that waiting handlers do not wake at every step)."""
        deadline = None if self.cfg.request_timeout is None else time.monotonic() + self.cfg.request_timeout

        def finished(row: Row) -> None:
            if row.done:
                updates.put(row)

        rows = []
        for p in req.ids:
            rows += self.generator.rows(
                p,
                req.params,
                req.seed,
                req.stop_ids,
                top_logprobs=req.logprobs,
                prompt_top_logprobs=req.logprobs if req.echo else None,
                deadline=deadline,
                on_step=updates.put if req.stream else finished,
            )
        return rows

    def prompt_text(self, req: CompletionRequest, i: int) -> str:
        prompt = req.prompts[i]
        return prompt if isinstance(prompt, str) else self.generator.decode(req.ids[i])

    def logprobs(
        self, entries: list[TokenLogprob | None], tokens: list[tuple[int, str]], k: int, offset: int = 0
    ) -> dict:
        """OpenAI's legacy logprobs object for ``tokens`` (id, the text it adds) and their ``entries`` (None: no
        logprob, the first prompt token); alternatives are named by their own text, -inf is sent as -9999.0."""
        text = self.generator.text
        offsets, top, at = [], [], offset
        for e, (_, t) in zip(entries, tokens):
            offsets.append(at)
            at += len(t)
            if e is None:
                top.append(None)
                continue
            alternatives = {t: max(e.logprob, -9999.0)}
            for token, lp in e.top[:k]:
                alternatives.setdefault(text.piece(token), max(lp, -9999.0))
            top.append(alternatives)
        return {
            "tokens": [t for _, t in tokens],
            "token_logprobs": [None if e is None else max(e.logprob, -9999.0) for e in entries],
            "top_logprobs": top,
            "text_offset": offsets,
        }

    def choice(self, req: CompletionRequest, k: int, row: Row, done: Completion) -> dict:
        """Choice ``k`` (prompt k // n, sample k % n): its finished ``row`` and what it ``done`` as a completion."""
        gen = self.generator
        head = self.prompt_text(req, k // req.params.n) if req.echo else ""
        logprobs = None
        if req.logprobs is not None:
            entries: list = list(row.logprobs[: done.tokens])
            ids = row.tokens[: done.tokens]
            tokens = list(zip(ids, gen.text.token_texts(ids, row.prompt)))
            if req.echo:
                entries = list(row.prompt_logprobs or []) + entries
                tokens = list(zip(row.prompt, gen.text.token_texts(row.prompt))) + tokens
            logprobs = self.logprobs(entries, tokens, req.logprobs)
        return {"index": k, "text": head + done.text, "logprobs": logprobs, "finish_reason": done.finish_reason}

    def usage(self, req: CompletionRequest, done: list[Completion]) -> dict:
        prompt_tokens = sum(len(p) for p in req.ids)
        completion_tokens = sum(c.tokens for c in done)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    def response(self, req: CompletionRequest, rows: list[Row], rid: str, created: int) -> dict:
        done = [self.generator.finish(r, req.stop_ids) for r in rows]
        return {
            "id": rid,
            "object": "text_completion",
            "created": created,
            "model": self.model_name,
            "choices": [self.choice(req, k, r, c) for k, (r, c) in enumerate(zip(rows, done))],
            "usage": self.usage(req, done),
        }


def failure(rows: list[Row]) -> ApiError | None:
    """The error a request ends with when a row did not finish normally."""
    for r in rows:
        if r.finish_reason == "timeout":
            return ApiError(
                408, "the request ran past this server's --request-timeout and was cancelled", None, "timeout"
            )
        if r.finish_reason == "error":
            return ApiError(500, f"generation failed: {r.error}")
    return None


class _Stream:
    """What a streamed choice has read and sent so far."""

    def __init__(self, reader: Detokenizer):
        self.reader = reader  # the text of each generated token, as they come
        self.texts: list[str] = []  # of the tokens read so far
        self.text = ""  # generated text sent
        self.sent = 0  # characters sent, the echoed prompt included
        self.tokens = 0  # generated tokens sent (their logprobs)
        self.echoed = False
        self.finished = False


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client may send many requests on one connection
    server_version = "cookbook-serve"
    timeout = 300  # seconds a connection may sit idle (or a body take to arrive)
    server: CompletionServer

    # ----------------------------------------------------------------------- HTTP plumbing

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except (ConnectionError, TimeoutError):  # the client went away mid-request: nothing to answer
            self.close_connection = True

    def parse_request(self) -> bool:
        line = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = line.split()
        if len(words) < 3:  # empty, or HTTP/0.9 (which the standard library would answer without a status line)
            self.command, self.requestline, self.request_version = None, line, "HTTP/1.1"
            self.send_error(
                400,
                "HTTP/0.9 requests are not supported; send HTTP/1.0 or HTTP/1.1"
                if len(words) == 2
                else f"bad request line {line[:100]!r}; expected METHOD PATH HTTP/1.1",
            )
            return False
        return super().parse_request()

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's errors (bad request line, headers too long or too many, unknown method) in
        OpenAI's JSON shape and with a 4xx status."""
        if code == 501:
            code, message = 405, f"method {self.command!r} is not allowed"
        elif code >= 500:
            code = 400
        if self.request_version == "HTTP/0.9":  # else no status line would be written
            self.request_version = "HTTP/1.1"
        self.close_connection = True
        try:
            self._send(code, ApiError(code, message or "bad request").body(), close=True)
        except OSError:
            pass

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
            raise ApiError(400, f"Content-Length {raw[:40]!r} is not a byte count")
        limit = self.server.cfg.max_request_bytes
        if length > limit:
            raise ApiError(413, f"the request body has {length} bytes, above this server's limit of {limit}")
        return length

    def _read_body(self) -> bytes:
        length = self._body_length()
        raw = self.rfile.read(length)
        if len(raw) < length:
            raise ClientGone()
        return raw

    def _answer(self, method: str) -> None:
        path = urlsplit(self.path).path.rstrip("/") or "/"
        server = self.server
        self._body_read = False
        try:
            try:
                if path.startswith(MODEL_ROUTE):
                    route, allowed = "model", "GET"
                elif path in ROUTES:
                    route, allowed = path, ROUTES[path]
                else:
                    raise ApiError(
                        404,
                        f"no route {path[:200]}; use POST /v1/completions, GET /v1/models, GET /health, "
                        "POST /tokenize, POST /detokenize or GET /tokenizer_info",
                    )
                if method != allowed:
                    raise ApiError(405, f"{path[:200]} takes {allowed}, not {method}")
                if method == "GET":
                    self._drain()
                    if route == "model":
                        name = unquote(path[len(MODEL_ROUTE) :])
                        if name not in (server.model_name, server.cfg.load):
                            raise ApiError(
                                404,
                                f"the model '{name[:200]}' does not exist; this server serves '{server.model_name}'",
                                "model",
                                "model_not_found",
                            )
                        return self._send(200, server.model_card())
                    answers = {
                        "/health": lambda: {"status": "ok"},
                        "/v1/models": server.models,
                        "/tokenizer_info": lambda: server.generator.text.info(server.max_model_len),
                    }
                    return self._send(200, answers[route]())
                body = read_json(self._read_body_once())
                if route == "/tokenize":
                    return self._send(200, server.tokenize(body))
                if route == "/detokenize":
                    return self._send(200, server.detokenize(body))
                self._complete(server.read_completion(body))
            except ApiError as e:
                self._refuse(e)
        except (ClientGone, ConnectionError, TimeoutError):
            self.close_connection = True
            if server.cfg.log_requests:
                sys.stderr.write(f"{self.address_string()} left before the answer to {self.command} {path[:200]}\n")
        except Exception as e:  # a bug, not the request's fault: one line in the log and a 500, and the server goes on
            line = f"internal error: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
            sys.stderr.write(f"{self.address_string()} {line}\n")
            try:
                self._refuse(ApiError(500, line))
            except OSError:
                self.close_connection = True

    def _read_body_once(self) -> bytes:
        raw = self._read_body()
        self._body_read = True
        return raw

    def _drain(self) -> None:
        """Read and drop a body sent with a GET, so the next request on the connection starts where it should."""
        if self.headers.get("Content-Length") or self.headers.get("Transfer-Encoding"):
            self._read_body_once()

    # ----------------------------------------------------------------------- completions

    def _client_gone(self) -> bool:
        """True when the client closed its side (readable with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _complete(self, req: CompletionRequest) -> None:
        server = self.server
        updates: queue.Queue = queue.Queue()
        rows = server.rows(req, updates)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        try:
            server.engine.submit(rows)
        except CookbookError as e:
            raise ApiError(400, str(e)) from None
        try:
            if req.stream:
                self._stream(req, rows, updates, rid, created)
                return
            while not all(r.done for r in rows):
                try:
                    updates.get(timeout=POLL)
                except queue.Empty:
                    pass
                if self._client_gone():
                    raise ClientGone()
            error = failure(rows)
            if error is not None:
                raise error
            self._send(200, server.response(req, rows, rid, created))
        finally:
            server.engine.cancel(r for r in rows if not r.done)

    def _stream(self, req: CompletionRequest, rows: list[Row], updates: queue.Queue, rid: str, created: int) -> None:
        server, gen = self.server, self.server.generator
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        hold = max((len(s) for s in req.params.stop), default=1) - 1  # a stop string may still be forming
        state = {id(r): _Stream(Detokenizer(gen.text, r.prompt)) for r in rows}
        index = {id(r): k for k, r in enumerate(rows)}

        def event(payload) -> None:
            text = payload if isinstance(payload, bytes) else json.dumps(payload, ensure_ascii=False).encode()
            data = b"data: " + text + b"\n\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def chunk(row: Row) -> None:
            """Send what is new in ``row``: text known not to start a stop string, the tokens that text covers."""
            st, k = state[id(row)], index[id(row)]
            if st.finished or (row.done and row.finish_reason not in ("stop", "length")):
                return  # a failed row is answered after the loop
            if row.done:
                done = gen.finish(row, req.stop_ids)
                text, count, reason = done.text, done.tokens, done.finish_reason
                texts = gen.text.token_texts(row.tokens[:count], row.prompt)
            else:
                st.texts += [st.reader.add(t) for t in row.tokens[len(st.texts) :]]
                text, found = cut_at_stop(gen.continuation(row.prompt, row.tokens), req.params.stop)
                text = (text if found else text[: len(text) - hold]).rstrip("\ufffd")  # not yet: half a character
                reason, texts = None, st.texts
                count, covered = st.tokens, len("".join(texts[: st.tokens]))
                while count < len(texts) and covered + len(texts[count]) <= len(text):
                    covered += len(texts[count])
                    count += 1
            delta = text[len(st.text) :] if text.startswith(st.text) else ""
            head = server.prompt_text(req, k // req.params.n) if req.echo and not st.echoed else ""
            logprobs = None
            if req.logprobs is not None:
                entries = list(row.logprobs[st.tokens : count])
                new = [(row.tokens[i], texts[i]) for i in range(st.tokens, count)]
                if head:
                    prompt = list(row.prompt_logprobs or [])
                    entries = prompt + entries
                    new = list(zip(row.prompt, gen.text.token_texts(row.prompt))) + new
                logprobs = server.logprobs(entries, new, req.logprobs, offset=st.sent)
            if not (head or delta or reason or count > st.tokens):
                return
            st.text, st.sent = st.text + delta, st.sent + len(head) + len(delta)
            st.tokens, st.echoed, st.finished = count, True, reason is not None
            event(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": server.model_name,
                    "choices": [{"index": k, "text": head + delta, "logprobs": logprobs, "finish_reason": reason}],
                }
            )

        try:
            while True:
                try:
                    row = updates.get(timeout=POLL)
                    chunk(row)
                except queue.Empty:
                    if self._client_gone():
                        raise ClientGone() from None
                if all(r.done for r in rows) and updates.empty():
                    break
            error = failure(rows)
            if error is not None:
                event(error.body())
            elif req.include_usage:
                event(
                    {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": server.model_name,
                        "choices": [],
                        "usage": server.usage(req, [gen.finish(r, req.stop_ids) for r in rows]),
                    }
                )
            event(b"[DONE]")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            raise ClientGone() from None

    # ----------------------------------------------------------------------- answers

    def _refuse(self, error: ApiError) -> None:
        """Answer an error; a body left unread is drained when small (so the client reads the answer) and the
        connection closed, since what follows on it cannot be trusted to be the next request."""
        if not self._body_read and not self.headers.get("Transfer-Encoding") and self.headers.get("Content-Length"):
            try:
                left = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                left = 0
            if 0 < left <= max(DRAIN_LIMIT, self.server.cfg.max_request_bytes):
                self.connection.settimeout(DRAIN_WAIT)  # a client that announced more than it sends is not waited for
                try:
                    while left > 0:
                        chunk = self.rfile.read(min(left, 65536))
                        if not chunk:
                            break
                        left -= len(chunk)
                except TimeoutError:
                    pass
            self._send(error.status, error.body(), close=True)
        else:
            self._send(
                error.status, error.body(), close=not self._body_read and bool(self.headers.get("Transfer-Encoding"))
            )

    def _send(self, status: int, payload: dict, close: bool = False) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 405 and getattr(self, "path", None):
            route = urlsplit(self.path).path.rstrip("/")
            self.send_header("Allow", "GET" if route.startswith(MODEL_ROUTE) else ROUTES.get(route, "GET"))
        if close or self.command == "HEAD":  # a HEAD client reads no body: the connection cannot go on
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        if self.server.cfg.log_requests:
            line = " ".join((format % args).split())[:400]  # one line, whatever the request held
            sys.stderr.write(f"{self.address_string()} {line}\n")

    def __getattr__(self, name: str):
        if name.startswith("do_"):  # every method: GET and POST are routed, the others answered 405
            return lambda: self._answer(name[3:])
        raise AttributeError(name)


# --------------------------------------------------------------------------- entry points


def check(cfg: ServeConfig) -> None:
    if not 0 <= cfg.port <= 65535:
        raise CookbookError(f"--port {cfg.port} is not a TCP port (0-65535; 0 picks a free one)")
    for name in ("max_batch_size", "max_request_bytes", "max_prompts", "max_tokens_limit"):
        if getattr(cfg, name) < 1:
            raise CookbookError(f"--{name.replace('_', '-')} {getattr(cfg, name)} must be at least 1")
    if cfg.max_model_len is not None and cfg.max_model_len < 2:
        raise CookbookError(f"--max-model-len {cfg.max_model_len} must be at least 2 (one prompt token, one new one)")
    if cfg.request_timeout is not None and not (math.isfinite(cfg.request_timeout) and cfg.request_timeout > 0):
        raise CookbookError(f"--request-timeout {cfg.request_timeout} must be a positive number of seconds")
    if cfg.kv_cache_tokens is not None and cfg.kv_cache_tokens < 1:
        raise CookbookError(f"--kv-cache-tokens {cfg.kv_cache_tokens} must be at least 1")


def make_server(cfg: ServeConfig, generator: LocalGenerator | None = None) -> CompletionServer:
    """The server, bound to ``cfg.host``:``cfg.port`` (``server.server_address`` has the port 0 picked) with the
    model loaded (or ``generator``, already loaded) and its engine running, not yet serving HTTP: call
    ``serve_forever``, and ``server_close`` at the end."""
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
