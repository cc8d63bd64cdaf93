"""The teachers behind ``distill generate --backend``: OpenAI-compatible servers over HTTP, vLLM in process, and the
choice between them (our own generator is ``inference_distill.local.CookbookBackend``).

``openai`` (``OpenAIBackend``) talks to any server that speaks OpenAI's ``POST /v1/completions`` (``vllm serve``,
SGLang, ``cookbook serve``) at one or more endpoints, with the standard library only:

- one request per prompt, asking for its ``n`` completions; OpenAI's sampling names, plus vLLM's ``top_k`` and
  ``repetition_penalty`` only when they are not at their neutral values (a strict OpenAI server refuses names it
  does not know), and ``seed`` = that prompt's seed;
- a pool of ``concurrency x endpoints`` threads; each request goes to the endpoint with the fewest requests in
  flight (least busy, ties in turn), so no endpoint has more than ``concurrency`` in flight and a faster server
  takes more of the work; an endpoint that failed cools down (exponentially longer while it keeps failing) and a
  retry goes to another endpoint, so a dead node among several slows a run a little and does not stop it;
- ``timeout``: seconds to wait for a server's answer (it sends nothing before the whole completion is made);
- connection errors, timeouts, HTTP 408, 429 (after its Retry-After) and 5xx are retried ``retries`` times with
  exponential backoff and jitter; any other 4xx is the request's fault and fails at once with the server's
  message; after the last retry a ``CookbookError`` names the endpoint and the last error. The first failure
  cancels the prompts not yet sent;
- the token count of a completion is what the server's ``usage`` says (``token_ids`` per choice where the server
  sends them). With ``n > 1`` OpenAI's API gives only the total: a completion cut at ``max_tokens`` then counts
  ``max_tokens`` and the others share the rest in proportion to their text's length (the sum stays exact).

``vllm`` (``VLLMBackend``) runs vLLM's offline ``LLM`` in this process, one ``vllm.SamplingParams`` per prompt (for
its seed), batching left to vLLM. vLLM is imported when the backend is made, not before. vLLM is not installed in
cookbook's development environment: its tests run against a stand-in module that checks our mapping of
parameters and outputs, not vLLM itself.

``finish_reason``: "stop" only when the model ended the text (end of sequence or a stop string); anything else a
server or vLLM reports ("length", "abort", "content_filter", none) means the text was cut off, and is "length".
"""

from __future__ import annotations

import gc
import http.client
import itertools
import json
import os
import queue
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, as_completed
from pathlib import Path

from cookbook.errors import CookbookError
from cookbook.inference.sampling import Completion, Progress, SamplingParams, cut_at_stop
from inference_distill.sampling import Backend

BACKENDS = ("cookbook", "openai", "vllm")
VLLM_MISSING = (
    "vLLM is not installed; pip install 'cookbook[vllm]' (needs CUDA) or use --backend openai against a "
    "vllm serve, or --backend cookbook"
)
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # cookbook's names -> vLLM's


def one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def finish(reason: str | None) -> str:
    return "stop" if reason == "stop" else "length"


# --------------------------------------------------------------------------- openai


class _Retry(Exception):
    """A failure worth another try (connection, timeout, 429, 5xx, a garbled answer); ``wait`` is the server's
    Retry-After in seconds, if it sent one."""

    def __init__(self, message: str, wait: float | None = None):
        super().__init__(message)
        self.wait = wait


def normalize_endpoint(url: str) -> str:
    """``http://h:8000``, ``http://h:8000/`` or ``http://h:8000/v1`` -> ``http://h:8000`` (no trailing slash)."""
    base = url.strip().rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3].rstrip("/")
    if not base.startswith(("http://", "https://")) or len(base.split("://", 1)[1]) == 0:
        raise CookbookError(f"--endpoint {url!r} is not an http(s) URL; give it as http://HOST:PORT")
    return base


def split_tokens(total: int, choices: list[dict], max_tokens: int) -> list[int]:
    """Per-choice token counts when a server reports only the total of ``n`` choices: a choice cut at max_tokens
    counts max_tokens, the others share what is left in proportion to their text's length (largest remainders
    round up), so the counts add up to ``total``."""
    lengths = [finish(c.get("finish_reason")) == "length" for c in choices]
    counts = [max_tokens if cut else 0 for cut in lengths]
    rest = total - sum(counts)
    share = [i for i, cut in enumerate(lengths) if not cut]
    if rest < 0 or (rest > 0 and not share):  # the server did not count as we thought: share it all by length
        counts, rest, share = [0] * len(choices), total, list(range(len(choices)))
    if not share:
        return counts
    weights = [max(len(choices[i].get("text") or ""), 1) for i in share]
    exact = [rest * w / sum(weights) for w in weights]
    floors = [int(x) for x in exact]
    for j in sorted(range(len(share)), key=lambda j: floors[j] - exact[j])[: rest - sum(floors)]:
        floors[j] += 1
    for i, c in zip(share, floors):
        counts[i] += c
    return counts


class _Endpoints:
    """Which endpoint takes the next request: among those with a free slot, one that is not cooling down after a
    failure and is not the one this request just failed on, with the fewest in flight (ties go round). When every
    such endpoint is full, the request waits for a slot there rather than go to one that just failed; only when
    no other endpoint could take it does it go back to one that failed. A failed endpoint cools down for
    ``backoff * 2 ** (its consecutive failures - 1)`` seconds (at most ``max_backoff``), so a dead node is tried
    ever more rarely and costs the run little."""

    def __init__(self, urls: list[str], concurrency: int, backoff: float, max_backoff: float):
        self.urls, self.concurrency = urls, concurrency
        self.backoff, self.max_backoff = backoff, max_backoff
        self.inflight = [0] * len(urls)
        self.failures = [0] * len(urls)  # consecutive
        self.cooldown = [0.0] * len(urls)  # monotonic time until which a failed endpoint is passed over
        self.turn = itertools.count()
        self.ready = threading.Condition()

    def acquire(self, avoid: int | None = None) -> int:
        with self.ready:
            while True:
                now, start = time.monotonic(), next(self.turn)
                good = [i for i in range(len(self.urls)) if self.cooldown[i] <= now and i != avoid]
                if any(self.inflight[i] < self.concurrency for i in good) or not good:
                    break
                cooling = [self.cooldown[i] - now for i in range(len(self.urls)) if self.cooldown[i] > now]
                self.ready.wait(min(cooling) if cooling else None)  # a release, or a cool-down's end
            # the pool has concurrency x endpoints threads, so one slot is always free for the caller
            free = [i for i in range(len(self.urls)) if self.inflight[i] < self.concurrency]
            i = min(
                free, key=lambda i: (self.cooldown[i] > now, i == avoid, self.inflight[i], (i - start) % len(self.urls))
            )
            self.inflight[i] += 1
            return i

    def release(self, i: int, ok: bool) -> None:
        with self.ready:
            self.inflight[i] -= 1
            if ok:
                self.failures[i], self.cooldown[i] = 0, 0.0
            else:
                self.failures[i] += 1
                wait = min(self.max_backoff, self.backoff * 2 ** (self.failures[i] - 1))
                self.cooldown[i] = time.monotonic() + wait * random.uniform(0.5, 1.5)
            self.ready.notify_all()


class DaemonPool:
    """``submit`` runs calls on worker threads that never hold the process at exit: Ctrl-C or SIGTERM (a cluster's
    preemption) stops a run at once, abandoning requests in flight, where ``ThreadPoolExecutor`` would wait for
    every one of them (minutes for long completions). The results are ``concurrent.futures.Future``s."""

    def __init__(self, workers: int, name: str):
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._workers = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for worker in self._workers:
            worker.start()

    def _work(self) -> None:
        while (task := self._tasks.get()) is not None:
            future, fn, args = task
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # handed to whoever waits on the future
                    future.set_exception(e)

    def submit(self, fn, *args) -> Future:
        future: Future = Future()
        self._tasks.put((future, fn, args))
        return future

    def shutdown(self) -> None:
        """Queued calls are cancelled; calls running end on their own; the workers then stop."""
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task[0].cancel()
        for _ in self._workers:
            self._tasks.put(None)


class OpenAIBackend:
    """Completions from OpenAI-compatible servers (see the module's docstring for the scheduling and retries).

    ``backoff``: the first retry waits about that many seconds (times 0.5-1.5, doubling per retry, at most
    ``max_backoff``); ``model``: the served model's name, asked of the first endpoint's ``/v1/models`` when None."""

    name = "openai"

    def __init__(
        self,
        endpoints: list[str],
        model: str | None = None,
        concurrency: int = 8,
        timeout: float = 600,
        retries: int = 5,
        api_key: str | None = None,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
    ):
        if not endpoints:
            raise CookbookError("--backend openai needs at least one --endpoint URL (e.g. http://HOST:8000)")
        if concurrency < 1 or retries < 0 or timeout <= 0:
            raise CookbookError("--concurrency must be at least 1, --retries at least 0 and --timeout positive")
        urls = [normalize_endpoint(e) for e in endpoints]
        if len(set(urls)) != len(urls):
            raise CookbookError(
                f"an --endpoint is given twice: {', '.join(sorted({u for u in urls if urls.count(u) > 1}))}"
            )
        self.endpoints = urls
        self.concurrency, self.timeout, self.retries = concurrency, timeout, retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self._pick = _Endpoints(urls, concurrency, backoff, max_backoff)
        self._pool = DaemonPool(concurrency * len(urls), "openai-backend")
        self.teacher = model or self._served_model()

    # --- HTTP

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _call(self, endpoint: str, path: str, body: dict | None = None) -> dict:
        """One HTTP request: the JSON answer, ``_Retry`` for a failure worth retrying, CookbookError for the rest."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            endpoint + path, data=data, headers=self._headers(), method="GET" if body is None else "POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            message = server_message(e)
            if e.code in (408, 429) or e.code >= 500:
                raise _Retry(f"HTTP {e.code}: {message}", retry_after(e)) from None
            raise CookbookError(f"{endpoint}{path} refused the request (HTTP {e.code}): {message}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, DNS, timeout
            reason = getattr(e, "reason", None) or e
            raise _Retry(
                one_line(f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__)
            ) from None
        try:
            answer = json.loads(raw)
        except ValueError:
            raise _Retry(f"the answer is not JSON: {one_line(raw.decode(errors='replace'), 120)}") from None
        if not isinstance(answer, dict):
            raise _Retry(f"the answer is not a JSON object: {one_line(raw.decode(errors='replace'), 120)}")
        return answer

    def _with_retries(
        self, path: str, body: dict | None, check, cancelled: threading.Event | None = None, first: int | None = None
    ):
        """``check(answer)`` of the first good answer, trying endpoints as ``_Endpoints`` picks them (or only
        ``first`` when given), ``retries`` times more after the first try."""
        last_error, last_endpoint, avoid = "", "", None
        for attempt in range(self.retries + 1):
            if cancelled is not None and cancelled.is_set():
                raise CookbookError("cancelled")
            i = first if first is not None else self._pick.acquire(avoid)
            endpoint = self.endpoints[i]
            delay = min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.5)
            try:
                result = check(self._call(endpoint, path, body))
            except _Retry as e:
                last_error, last_endpoint, avoid = str(e), endpoint, i
                if e.wait is not None:
                    delay = min(self.max_backoff, max(delay, e.wait))
                if first is None:
                    self._pick.release(i, ok=False)
                if attempt < self.retries:
                    if cancelled is not None:
                        cancelled.wait(delay)
                    else:
                        time.sleep(delay)
                continue
            except BaseException:
                if first is None:
                    self._pick.release(i, ok=True)
                raise
            if first is None:
                self._pick.release(i, ok=True)
            return result
        tries = f"{self.retries + 1} tries" if self.retries else "1 try"
        raise CookbookError(
            f"{last_endpoint}{path} failed after {tries}: {last_error}; check that the server is up "
            "(GET /health) or raise --retries / --timeout"
        )

    def _served_model(self) -> str:
        def first_id(answer: dict) -> str:
            ids = [m.get("id") for m in answer.get("data") or [] if isinstance(m, dict) and m.get("id")]
            if not ids:
                raise _Retry("/v1/models lists no model")
            return ids[0]

        try:
            return self._with_retries("/v1/models", None, first_id, first=0)
        except CookbookError as e:
            raise CookbookError(
                f"cannot ask {self.endpoints[0]} which model it serves ({e}); pass --teacher MODEL_NAME to name it"
            ) from None

    # --- the Backend interface

    def request_body(self, prompt: str, params: SamplingParams, seed: int) -> dict:
        body = {
            "model": self.teacher,
            "prompt": prompt,
            "max_tokens": params.max_tokens,
            "n": params.n,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": seed,
            "stream": False,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        for key, neutral in (
            ("frequency_penalty", 0.0),
            ("presence_penalty", 0.0),
            ("top_k", 0),
            ("repetition_penalty", 1.0),
        ):
            if getattr(params, key) != neutral:
                body[key] = getattr(params, key)
        return body

    def completions(self, answer: dict, params: SamplingParams) -> list[Completion]:
        """The ``n`` completions of one prompt from a /v1/completions answer (``_Retry`` when malformed)."""
        choices = answer.get("choices")
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise _Retry("the answer has no list of choices")
        indices = sorted(c.get("index", j) for j, c in enumerate(choices))
        if indices != list(range(params.n)):
            raise _Retry(f"asked for {params.n} choices, the answer holds indices {indices}")
        choices = sorted(choices, key=lambda c: c.get("index", 0)) if len(choices) > 1 else choices
        usage = answer.get("usage") if isinstance(answer.get("usage"), dict) else {}
        if all(isinstance(c.get("token_ids"), list) for c in choices):
            counts = [len(c["token_ids"]) for c in choices]
        elif len(choices) == 1:
            counts = [int(usage.get("completion_tokens") or 0)]
        else:
            counts = split_tokens(int(usage.get("completion_tokens") or 0), choices, params.max_tokens)
        out = []
        for c, tokens in zip(choices, counts):
            text, stopped = cut_at_stop(c.get("text") or "", params.stop)  # a server that keeps the stop string
            out.append(Completion(text, tokens, "stop" if stopped else finish(c.get("finish_reason"))))
        return out

    def generate(
        self, prompts: list[str], params: SamplingParams, seeds: list[int], on_progress: Progress | None = None
    ) -> list[list[Completion]]:
        params.check()
        if len(seeds) != len(prompts):
            raise CookbookError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        cancelled = threading.Event()

        def one(i: int) -> list[Completion]:
            return self._with_retries(
                "/v1/completions",
                self.request_body(prompts[i], params, seeds[i]),
                lambda answer: self.completions(answer, params),
                cancelled,
            )

        futures = {self._pool.submit(one, i): i for i in range(len(prompts))}
        results: list[list[Completion] | None] = [None] * len(prompts)
        try:
            for future in as_completed(futures):
                results[futures[future]] = done = future.result()
                if on_progress is not None:
                    on_progress(1, sum(c.tokens for c in done))
        except BaseException:
            cancelled.set()
            for future in futures:  # queued prompts never start; requests in flight end within --timeout
                future.cancel()
            raise
        return results  # type: ignore[return-value]

    def close(self) -> None:
        """Stops the pool: queued requests are dropped, requests in flight end on their own (within --timeout)."""
        self._pool.shutdown()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def server_message(e: urllib.error.HTTPError) -> str:
    """The error message of an HTTP error answer, on one line (OpenAI's {"error": {"message"}}, vLLM's and
    FastAPI's {"message"} / {"detail"}, or the body's text)."""
    try:
        raw = e.read().decode(errors="replace")
    except Exception:
        raw = ""
    try:
        body = json.loads(raw)
    except ValueError:
        return one_line(raw or e.reason or "no message")
    if isinstance(body, dict):
        err = body.get("error")
        for candidate in (
            err.get("message") if isinstance(err, dict) else err,
            body.get("message"),
            body.get("detail"),
        ):
            if candidate:
                return one_line(candidate if isinstance(candidate, str) else json.dumps(candidate))
    return one_line(raw)


def retry_after(e: urllib.error.HTTPError) -> float | None:
    try:
        return max(0.0, float(e.headers.get("Retry-After")))
    except (TypeError, ValueError, AttributeError):
        return None


# --------------------------------------------------------------------------- vllm


class VLLMBackend:
    """vLLM's offline ``LLM`` in this process. The teacher is a Hugging Face folder or hub name: vLLM cannot read a
    cookbook checkpoint, which is refused with the ``cookbook convert`` command that makes one it can.

    Not run against a real vLLM in cookbook's tests (it needs CUDA); they check this adapter's parameter and output
    mapping against a stand-in ``vllm`` module."""

    name = "vllm"

    def __init__(
        self,
        teacher: str,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        dtype: str = "auto",
        max_model_len: int | None = None,
        seed: int = 0,
        trust_remote_code: bool = False,
    ):
        from cookbook.engine.checkpoint import find_checkpoint

        try:
            is_cookbook = find_checkpoint(teacher) is not None
        except CookbookError:  # a run folder whose ``latest`` is broken: still ours, not vLLM's
            is_cookbook = True
        if is_cookbook or (Path(teacher) / "latest").is_file():
            raise CookbookError(
                f"--teacher {teacher} is a cookbook checkpoint, which vLLM cannot load; convert it first: "
                f"cookbook convert --from cookbook --to hf --load-dir {teacher} --save-dir TEACHER_HF "
                "and pass --teacher TEACHER_HF"
            )
        try:
            import vllm
        except ImportError:
            raise CookbookError(VLLM_MISSING) from None
        self.vllm, self.teacher = vllm, teacher
        kwargs = dict(
            model=teacher,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            dtype=VLLM_DTYPES.get(dtype, dtype),
            seed=seed,
            trust_remote_code=trust_remote_code,
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        try:
            self.llm = vllm.LLM(**kwargs)
        except Exception as e:  # vLLM raises many kinds (ValueError, RuntimeError, OSError) for a bad model or GPU
            raise CookbookError(f"vLLM cannot load {teacher}: {one_line(e)}") from e

    def sampling_params(self, params: SamplingParams, seed: int):
        return self.vllm.SamplingParams(
            n=params.n,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k or -1,
            max_tokens=params.max_tokens,
            stop=list(params.stop) or None,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
            repetition_penalty=params.repetition_penalty,
            seed=seed,
        )

    def generate(
        self, prompts: list[str], params: SamplingParams, seeds: list[int], on_progress: Progress | None = None
    ) -> list[list[Completion]]:
        params.check()
        if len(seeds) != len(prompts):
            raise CookbookError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if not prompts:
            return []
        outputs = self.llm.generate(prompts, [self.sampling_params(params, s) for s in seeds], use_tqdm=False)
        if len(outputs) != len(prompts):
            raise CookbookError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        results = []
        for request in outputs:
            ordered = sorted(request.outputs, key=lambda o: getattr(o, "index", 0))
            completions = []
            for o in ordered:
                text, stopped = cut_at_stop(o.text, params.stop)
                completions.append(Completion(text, len(o.token_ids), "stop" if stopped else finish(o.finish_reason)))
            results.append(completions)
        if on_progress is not None:  # vLLM batches the whole call itself: one report at its end
            on_progress(len(prompts), sum(c.tokens for r in results for c in r))
        return results

    def close(self) -> None:
        self.llm = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


# --------------------------------------------------------------------------- choosing one


def check_backend(kind: str, teacher: str | None, endpoints: list[str]) -> None:
    """The flags a backend needs, checked before any work (``make_backend`` checks them again)."""
    if kind not in BACKENDS:
        raise CookbookError(f"unknown --backend {kind!r}; use {', '.join(BACKENDS)}")
    if kind != "openai" and endpoints:
        raise CookbookError(f"--endpoint is for --backend openai, not {kind}; drop it or pass --backend openai")
    if kind == "openai" and not endpoints:
        raise CookbookError(
            "--backend openai needs at least one --endpoint URL of an OpenAI-compatible server "
            "(e.g. http://HOST:8000 of a vllm serve or cookbook serve)"
        )
    if kind != "openai" and not teacher:
        raise CookbookError(
            f"--backend {kind} needs --teacher: a Hugging Face folder"
            + (" or a cookbook checkpoint" if kind == "cookbook" else "")
        )


def make_backend(
    kind: str,
    *,
    teacher: str | None,
    endpoints: list[str],
    tensor_parallel_size: int,
    concurrency: int,
    timeout: float,
    retries: int,
    device: str,
    dtype: str,
    batch_size: int,
    tokenizer_model: str | None,
    gpu_memory_utilization: float = 0.9,
) -> Backend:
    """The backend ``distill generate --backend KIND`` runs. ``teacher``: a checkpoint or HF folder (cookbook, vllm),
    or the served model's name (openai; None asks the server); ``dtype``: cookbook's names (auto, bf16, fp32), or
    vLLM's own ("auto", ...) for vllm."""
    check_backend(kind, teacher, endpoints)
    if kind == "openai":
        return OpenAIBackend(endpoints, model=teacher, concurrency=concurrency, timeout=timeout, retries=retries)
    if kind == "vllm":
        return VLLMBackend(
            teacher,
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
        )
    from inference_distill.local import CookbookBackend

    return CookbookBackend(teacher, device, dtype, batch_size, tokenizer_model=tokenizer_model)
