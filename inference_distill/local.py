"""The ``cookbook`` backend: our KV-cache generator (``recipes.generate``) on a cookbook or Hugging Face checkpoint,
in this process, behind the ``Backend`` interface; ``cookbook serve`` puts the same ``LocalGenerator`` behind HTTP.

How a completion is made, so that the same request means what it means in vLLM:

- Text prompts become ids with ``tokenizer.tokenize`` (Megatron-LM's: BOS and the like as the tokenizer adds them).
- ``n`` samples of a prompt are ``n`` rows; rows are sorted by prompt length (longest first) and cut into batches
  of ``batch_size`` rows, so a batch carries little padding; results come back in the prompts' order. Each batch
  is seeded from the seed of its first row's prompt, so the same prompts, parameters and seeds give the same
  completions (greedy completions do not depend on the batch at all).
- A completion's text is the continuation decoded in the context of its prompt (vLLM does the same: a
  SentencePiece piece "▁word" keeps its space), eos removed, and cut before the first stop string. A row ends at
  eos, at a token whose own text holds a stop string (checked once per vocabulary and stop list), or, for stop
  strings that span tokens, at the next check of its decoded text every few steps.
- ``finish_reason`` is "stop" for eos or a stop string, "length" when ``max_tokens`` ran out.
- ``tokens`` counts the generated tokens up to and including eos, or, when a stop string cut the text, up to
  and including the token that completed the stop string (what vLLM reports; the few tokens generated past
  it before the check saw it are not counted).
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Sequence

import torch

from cookbook.errors import CookbookError
from inference_distill.sampling import Completion, Progress, SamplingParams, cut_at_stop
from recipes.generate import generate

STOP_CHECK_EVERY = 8  # steps between looks at the decoded text for stop strings spanning tokens


# --------------------------------------------------------------------------- loading


def _hf_model(folder: Path, device: str, dtype: str):
    """Our Transformer with a Hugging Face folder's weights, read one tensor at a time."""
    from cookbook.engine.distributed import pick_device
    from cookbook.engine.precision import load_in_dtype
    from cookbook.formats import hf
    from cookbook.formats.stream import checked
    from cookbook.model import Transformer

    ckpt = hf.read(folder)
    with torch.device("meta"):
        model = Transformer(ckpt.config)
    model.to_empty(device=pick_device(device, 0))
    load_in_dtype(model, dtype)
    model.tie_weights()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in checked(ckpt.tensors(), ckpt.config, str(folder)):
            params[name].copy_(tensor)
    return model.eval()


def model_format(path: str | Path) -> str:
    """"cookbook" (a save folder or one step_* directory) or "hf" (a Hugging Face model folder); a missing path is
    named as missing first."""
    from cookbook.engine.checkpoint import find_checkpoint

    where = Path(path)
    if not where.exists():
        raise CookbookError(f"{path} does not exist; pass a cookbook checkpoint or a Hugging Face model folder")
    if find_checkpoint(where) is not None:
        return "cookbook"
    if (where / "config.json").is_file():
        return "hf"
    raise CookbookError(f"{path} holds no cookbook checkpoint (no 'latest' file and no .metadata/config.toml) and "
                        "is no Hugging Face model folder (no config.json); pass one of those")


def teacher_tokenizer(path: str | Path, tokenizer_model: str | None = None,
                      tokenizer_type: str | None = None) -> tuple[str, str | None]:
    """(tokenizer path, Megatron-LM type or None) of a teacher: ``tokenizer_model`` if given, else a cookbook
    checkpoint's recorded tokenizer, else a Hugging Face folder's own tokenizer.json / tokenizer.model."""
    from cookbook.engine.checkpoint import find_checkpoint, read_config
    from cookbook.formats.stream import hf_side_files, tokenizer_path

    if tokenizer_model:
        return str(tokenizer_model), tokenizer_type
    where = Path(path)
    if model_format(where) == "cookbook":
        data = read_config(find_checkpoint(where)).get("data", {})
        if not data.get("tokenizer_model"):
            raise CookbookError(f"the checkpoint {path} names no tokenizer; pass --tokenizer-model")
        return data["tokenizer_model"], tokenizer_type or data.get("tokenizer_type")
    tok = tokenizer_path(where, hf_side_files(where))
    if tok is None:
        raise CookbookError(f"{path} holds no tokenizer.json or tokenizer.model; pass --tokenizer-model")
    return str(tok), tokenizer_type


def load_teacher(path: str | Path, device: str = "auto", dtype: str = "fp32", tokenizer_model: str | None = None,
                 tokenizer_type: str | None = None):
    """(model in eval mode, tokenizer) from a cookbook checkpoint (a save folder or one step_* directory) or a
    Hugging Face model folder (config.json + safetensors), with the tokenizer ``teacher_tokenizer`` finds."""
    from cookbook.data.tokenizer import load_tokenizer
    from cookbook.engine.checkpoint import load_model
    from cookbook.engine.precision import check_dtype

    check_dtype(dtype)
    form = model_format(path)  # a missing or wrong path is named before anything else
    tok, kind = teacher_tokenizer(path, tokenizer_model, tokenizer_type)  # before the weights: found at once
    model = load_model(path, device, dtype)[0] if form == "cookbook" else _hf_model(Path(path), device, dtype)
    return model, load_tokenizer(tok, kind)


# --------------------------------------------------------------------------- the generator


class LocalGenerator:
    """A model and its tokenizer, completing prompts in batches (see the module's docstring)."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.eos = tokenizer.eod
        # ids the tokenizer can decode (a model's vocabulary may be padded beyond the tokenizer's)
        self.vocab_size = min(model.config.vocab_size, tokenizer.vocab_size)
        self._stop_ids: dict[tuple[str, ...], list[int]] = {}

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", dtype: str = "fp32", tokenizer_model: str | None = None,
             tokenizer_type: str | None = None) -> "LocalGenerator":
        return cls(*load_teacher(path, device, dtype, tokenizer_model, tokenizer_type))

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        return self.tokenizer.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([t for t in ids if 0 <= t < self.vocab_size and t != self.eos])

    def continuation(self, prompt: list[int], new: Sequence[int]) -> str:
        """The text of ``new`` as it reads after ``prompt`` (a leading space kept, as vLLM's detokenizer does)."""
        new = [t for t in new if t != self.eos]
        if not new:
            return ""
        head, full = self.decode(prompt), self.decode(prompt + new)
        return full[len(head):] if full.startswith(head) else self.decode(new)

    def stop_ids(self, stop: tuple[str, ...]) -> list[int]:
        """Tokens whose own text holds a stop string: generating one ends the row (its text is then cut there)."""
        if stop not in self._stop_ids:
            found = []
            if stop and not any("\ufffd" in s for s in stop):  # a lone byte of a character decodes to U+FFFD
                for t in range(self.vocab_size):
                    text = self.tokenizer.decode([t])
                    if any(s in text for s in stop):
                        found.append(t)
            if len(self._stop_ids) >= 256:  # a server sees many stop lists: keep the cache small
                self._stop_ids.clear()
            self._stop_ids[stop] = found
        return self._stop_ids[stop]

    def _finish(self, prompt: list[int], new: list[int], params: SamplingParams, ends: set[int]) -> Completion:
        text, found = cut_at_stop(self.continuation(prompt, new), params.stop)
        if found:
            lo, hi = 1, len(new)  # the fewest tokens whose text already holds a stop string
            while lo < hi:
                mid = (lo + hi) // 2
                if cut_at_stop(self.continuation(prompt, new[:mid]), params.stop)[1]:
                    hi = mid
                else:
                    lo = mid + 1
            return Completion(text, lo, "stop")
        ended = bool(new) and (new[-1] in ends or len(new) < params.max_tokens)
        return Completion(text, len(new), "stop" if ended else "length")

    def complete(self, prompts: list[str] | list[list[int]], params: SamplingParams, seeds: list[int],
                 batch_size: int = 16, on_progress: Progress | None = None,
                 stop_ids: Sequence[int] = ()) -> list[list[Completion]]:
        """``params.n`` completions per prompt (text, or token ids used as they are), in the prompts' order.
        ``seeds[i]`` belongs to prompt i; ``stop_ids`` are extra tokens that end a completion as eos does (vLLM's
        ``stop_token_ids``). ``on_progress(prompts, tokens)`` after each batch: the prompts whose completions are
        all done since the last call, and the tokens that batch generated (both increments)."""
        params.check()
        if len(seeds) != len(prompts):
            raise CookbookError(f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
        if batch_size < 1:
            raise CookbookError(f"batch size {batch_size} must be at least 1")
        ids = [self.encode(p) for p in prompts]
        rows = [(i, j) for i in range(len(ids)) for j in range(params.n)]
        order = sorted(range(len(rows)), key=lambda r: -len(ids[rows[r][0]]))  # stable: equal lengths keep order
        ends = set(stop_ids) | ({self.eos} if self.eos is not None else set())
        token_stops = sorted(set(stop_ids) | set(self.stop_ids(params.stop)))
        results: list[list[Completion | None]] = [[None] * params.n for _ in ids]
        left = [params.n] * len(ids)
        for start in range(0, len(order), batch_size):
            batch = [rows[r] for r in order[start : start + batch_size]]
            batch_prompts = [ids[i] for i, _ in batch]

            def stopped(running: dict[int, list[int]]) -> list[int]:
                return [r for r, new in running.items()
                        if cut_at_stop(self.continuation(batch_prompts[r], new), params.stop)[1]]

            new = generate(
                self.model, batch_prompts, params.max_tokens, temperature=params.temperature,
                top_k=params.top_k or None, top_p=params.top_p if params.top_p < 1 else None, eos_id=self.eos,
                seed=seeds[batch[0][0]], repetition_penalty=params.repetition_penalty,
                frequency_penalty=params.frequency_penalty, presence_penalty=params.presence_penalty,
                stop_ids=token_stops, stop_when=stopped if params.stop else None, stop_when_every=STOP_CHECK_EVERY,
            )
            finished = 0
            for (i, j), prompt, tokens in zip(batch, batch_prompts, new):
                results[i][j] = self._finish(prompt, tokens, params, ends)
                left[i] -= 1
                finished += left[i] == 0
            if on_progress is not None:
                on_progress(finished, sum(len(t) for t in new))
        return results  # type: ignore[return-value]


# --------------------------------------------------------------------------- the Backend


class CookbookBackend:
    """``Backend`` over a LocalGenerator: the teacher in this process, on CPU or one GPU."""

    name = "cookbook"

    def __init__(self, teacher: str, device: str = "auto", dtype: str = "fp32", batch_size: int = 16,
                 tokenizer_model: str | None = None):
        if batch_size < 1:
            raise CookbookError(f"--batch-size {batch_size} must be at least 1")
        self.teacher, self.batch_size = str(teacher), batch_size
        self.generator: LocalGenerator | None = LocalGenerator.load(teacher, device, dtype, tokenizer_model)

    def generate(self, prompts: list[str], params: SamplingParams, seeds: list[int],
                 on_progress: Progress | None = None) -> list[list[Completion]]:
        if self.generator is None:
            raise CookbookError("the cookbook backend was closed; create a new one")
        return self.generator.complete(prompts, params, seeds, self.batch_size, on_progress)

    def close(self) -> None:
        self.generator = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
