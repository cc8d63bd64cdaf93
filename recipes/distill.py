"""``cookbook distill``: teach a student what a larger teacher writes.

The Megatron Cookbook distilled Qwen-72B and DeepSeek-67B into its 13B model in two steps, and so does this:

1. ``distill generate``: prompt the teacher with the first tokens of pretraining documents and keep what it
   writes (``inference_distill/``: prompts, backends, filters, resumable shards). The teacher runs in vLLM in this
   process, behind any number of OpenAI-compatible servers (``vllm serve``, SGLang, ``cookbook serve``), or in
   our own generator (any machine, CPU included).
2. ``distill train``: tokenize the synthetic shards with the preprocess code and continue training the student on
   them with the shared Trainer, blended with original data by weight if asked; ``--kd-teacher`` adds logit
   distillation, (1 - r) CE + r KL(teacher || student), when teacher and student share a tokenizer.

Both steps resume by running the same command again: generation skips the shards already written (a shard is
a fixed block of prompts, so there are no duplicates or gaps), and training continues from ``--save``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cookbook.data.loader import parse_data_path
from cookbook.engine import job
from cookbook.errors import CookbookError
from cookbook.fileio import write_text_atomic
from cookbook.inference.sampling import Completion, SamplingParams
from cookbook.progress import console
from inference_distill.filters import FilterConfig

# --------------------------------------------------------------------------- distill train

SYNTHETIC_KEY = "text"  # the jsonl key distill generate writes the training text under


@dataclass
class DistillTrainConfig:
    synthetic: list[str]  # distill generate output folders, or jsonl files
    synthetic_weight: float | None = (
        None  # share of training samples from the synthetic data (default: all, or 0.5 with --data-path)
    )
    synthetic_prefix: str | None = None  # where the tokenized synthetic data go (default: SAVE/synthetic/synthetic)
    workers: int = max(1, min(8, os.cpu_count() or 1))
    wait_seconds: float = 3600.0  # how long other ranks wait for rank 0's preprocessing


def synthetic_files(inputs: list[str]) -> list[Path]:
    """The jsonl shards of ``distill generate`` output folders (complete shards only), or jsonl files given directly."""
    files: list[Path] = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            shards = sorted(path.glob("shard_*.jsonl"))
            if not shards:
                raise CookbookError(
                    f"--synthetic {path} holds no shard_*.jsonl; point it at a distill generate --output folder"
                )
            if not (path / "summary.json").is_file():
                console.print(
                    f"[yellow]{path}: generation is not finished (no summary.json); training on its {len(shards)} complete shards[/yellow]"
                )
            files += shards
        elif path.is_file():
            files.append(path)
        else:
            raise CookbookError(f"--synthetic {path} does not exist")
    return files


def blend(data_path: list[str], synthetic: str, weight: float | None) -> list[str]:
    """Megatron-LM ``--data-path`` pairs giving ``synthetic`` the share ``weight`` of the samples and the original
    data the rest, in their own proportions."""
    if not data_path:
        if weight not in (None, 1.0):
            raise CookbookError(f"--synthetic-weight {weight:g} needs original data to blend with: add --data-path")
        return [synthetic]
    weight = 0.5 if weight is None else weight
    if not 0 < weight < 1:
        raise CookbookError(
            f"--synthetic-weight {weight:g} must lie strictly between 0 and 1 when blending with --data-path"
        )
    pairs = parse_data_path(data_path, check_files=False)  # the data may live only where the job runs (--dry-run)
    total = sum(w for w, _ in pairs)
    out = []
    for w, prefix in pairs:
        out += [f"{(1 - weight) * w / total:.6g}", prefix]
    return out + [f"{weight:.6g}", synthetic]


def _synthetic_prefix(opts: DistillTrainConfig, save: str) -> str:
    return opts.synthetic_prefix or str(Path(save) / "synthetic" / "synthetic")


def _dataset(prefix: str) -> str:
    """The indexed dataset preprocess writes for ``prefix`` (Megatron-LM's ``PREFIX_text_document``)."""
    from cookbook.data.indexed import output_prefix

    return output_prefix(prefix, SYNTHETIC_KEY)


def _stamp(files: list[Path], tokenizer: str, tokenizer_type: str | None) -> dict:
    """What the tokenized synthetic data were made from: the inputs, and the tokenizer by its content (a continued
    run reads the same tokenizer from the copy inside its own save)."""
    import hashlib

    from cookbook.formats.stream import tokenizer_files

    digest = hashlib.sha256()
    for name, path in sorted(tokenizer_files(Path(tokenizer)).items()):
        digest.update(name.encode() + b"\0" + path.read_bytes())
    return {
        "tokenizer": digest.hexdigest(),
        "tokenizer_type": tokenizer_type,
        "inputs": [[str(f.resolve()), f.stat().st_size, int(f.stat().st_mtime)] for f in files],
    }


def tokenize_synthetic(
    files: list[Path], prefix: str, tokenizer: str, tokenizer_type: str | None, opts: DistillTrainConfig
) -> str:
    """The indexed dataset of the synthetic text (``PREFIX_text_document``), made by rank 0 with the preprocess
    code and reused while the inputs and tokenizer are unchanged; other ranks wait for it."""
    from recipes.preprocess import PreprocessConfig
    from recipes.preprocess import run as preprocess

    dataset = _dataset(prefix)
    stamp_path = Path(dataset + ".inputs.json")
    stamp = _stamp(files, tokenizer, tokenizer_type)
    current = lambda: stamp_path.is_file() and json.loads(stamp_path.read_text()) == stamp  # noqa: E731
    if not job.main_process():
        deadline = time.monotonic() + opts.wait_seconds
        while not current():
            if time.monotonic() > deadline:
                raise CookbookError(
                    f"rank 0 did not tokenize the synthetic data into {dataset} within {opts.wait_seconds:.0f} s (all ranks need one shared filesystem)"
                )
            time.sleep(2)
        return dataset
    if current():
        console.print(f"synthetic data already tokenized in {dataset}")
        return dataset
    summary = preprocess(
        PreprocessConfig(
            inputs=[str(f) for f in files],
            output_prefix=prefix,
            tokenizer_model=tokenizer,
            tokenizer_type=tokenizer_type,
            json_keys=[SYNTHETIC_KEY],
            append_eod=True,
            workers=opts.workers,
        ),
        show_progress=console.is_terminal,
    )
    write_text_atomic(stamp_path, json.dumps(stamp, indent=1) + "\n")
    console.print(
        f"tokenized {summary.documents:,} synthetic documents ({summary.tokens:,} tokens) from {len(files)} files into {dataset}"
    )
    return dataset


def train_job(
    config_file: str | Path | None, flags: dict[str, dict], opts: DistillTrainConfig, here: bool = True
) -> job.Job:
    """The student's training job: ``--load``'s weights (the run in --save when the same command runs again) on the
    synthetic data, blended with --data-path. Where the student is not here (a dry run), --preset stands in."""
    ck = job.read_sections(config_file, flags).get("checkpoint", {})
    if not ck.get("save"):
        raise CookbookError("cookbook distill train needs --save: the folder for the distilled student")
    if not ck.get("load"):
        raise CookbookError("cookbook distill train needs --load: the student checkpoint to continue training")
    j = job.resolve(config_file, flags, continue_in_save="the distillation", here=here)
    dataset = _dataset(_synthetic_prefix(opts, ck["save"]))
    data_path = blend(j.sections.get("data", {}).get("data_path") or [], dataset, opts.synthetic_weight)
    return j.replace(dataclasses.replace(j.config, data=dataclasses.replace(j.config.data, data_path=data_path)))


def train(config_file: str | Path | None, flags: dict[str, dict], opts: DistillTrainConfig) -> dict:
    """Tokenize the synthetic shards with the student's tokenizer and continue training the student on them."""
    if not opts.synthetic:
        raise CookbookError(
            "cookbook distill train needs --synthetic: the output folder(s) of cookbook distill generate"
        )
    j = train_job(config_file, flags, opts)
    data = j.config.data
    if not data.tokenizer_model:
        raise CookbookError("the student checkpoint names no tokenizer; pass --tokenizer-model (the student's)")
    if j.config.training.kd_teacher:  # another tokenizer fails before any tokenizing (the Trainer checks it again)
        from cookbook.engine.trainer import find_teacher

        find_teacher(j.config)
    files = synthetic_files(opts.synthetic)
    tokenize_synthetic(
        files, _synthetic_prefix(opts, j.config.checkpoint.save), data.tokenizer_model, data.tokenizer_type, opts
    )
    return job.run(j)


def train_dry_run(
    config_file: str | Path | None, flags: dict[str, dict], opts: DistillTrainConfig, world_size: int, gpu: str
) -> None:
    """Check a distill train job for ``world_size`` processes without devices; ``--preset`` stands in for a
    student checkpoint that is not on this machine, and synthetic data need not be here yet."""
    job.dry_run(train_job(config_file, flags, opts, here=False), world_size, gpu)


# --------------------------------------------------------------------------- distill generate


@dataclass
class DistillGenerateConfig:
    output: str  # folder of shards
    prompts_from: str  # indexed dataset prefix, jsonl file or folder of jsonl
    backend: str = "cookbook"  # cookbook | openai | vllm
    teacher: str | None = None  # HF folder or cookbook checkpoint (cookbook, vllm; openai: only its tokenizer is read)
    served_model_name: str | None = None  # openai: the model to ask the servers for (default: their first)
    # prompts
    prefix_tokens: int | None = 128
    prefix_fraction: float | None = None
    num_prompts: int | None = None
    min_doc_tokens: int | None = None
    seed: int = 1234
    text_key: str = "text"
    tokenizer_model: str | None = None  # counts prefix tokens / decodes indexed data (default: the teacher's)
    tokenizer_type: str | None = None
    # sampling, in OpenAI / vLLM names
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # output
    prompts_per_shard: int = 2048
    continuation_only: bool = False  # text = the continuation, not prefix + continuation
    filters: FilterConfig = field(default_factory=FilterConfig)
    # backends
    endpoints: list[str] = field(default_factory=list)
    concurrency: int = 64
    timeout: float = 600.0
    retries: int = 5
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.9
    device: str = "auto"
    dtype: str = "auto"  # cookbook: cookbook/engine/precision.py's choice; vllm: its own
    batch_size: int = 16


def prompt_tokenizer(opts: DistillGenerateConfig):
    """The tokenizer prompts are measured and (for indexed data) decoded with: --tokenizer-model, else the
    teacher's own (a cookbook checkpoint's recorded tokenizer, a Hugging Face folder's tokenizer files)."""
    from cookbook.data.tokenizer import load_tokenizer
    from cookbook.inference.load import find_tokenizer

    if not opts.tokenizer_model and not opts.teacher:
        raise CookbookError(
            "no tokenizer for the prompts: pass --tokenizer-model (the teacher's tokenizer; for an indexed "
            "dataset, the one it was preprocessed with)"
        )
    return load_tokenizer(*find_tokenizer(opts.teacher, opts.tokenizer_model, opts.tokenizer_type))


def _identity(opts: DistillGenerateConfig, source, teacher: str) -> dict:
    """What decides the output: a run resumes only into a folder made with the same values."""
    return {
        "prompts_from": str(Path(opts.prompts_from).resolve()),
        **source.identity(),
        "backend": opts.backend,
        "teacher": teacher,
        "sampling": opts.sampling.to_dict(),
        "continuation_only": opts.continuation_only,
        "filters": asdict(opts.filters),
    }


def _record(prompt, j: int, completion: Completion, text: str, teacher: str, sampling: dict) -> dict:
    return {
        "text": text,
        "prefix": prompt.text,
        "doc_id": prompt.doc_id,
        "prompt_index": prompt.index,
        "sample": j,
        "teacher": teacher,
        "prefix_tokens": prompt.tokens,
        "generated_tokens": completion.tokens,
        "finish_reason": completion.finish_reason,
        "sampling": sampling,
    }


def generate(opts: DistillGenerateConfig, show_progress: bool | None = None) -> dict:
    """Prompt the teacher with document prefixes and write what it writes, shard by shard; returns the summary.
    Run it again after an interruption: the shards already written are kept and the rest are made."""
    from cookbook.engine.checkpoint import model_format
    from inference_distill.backends import check_backend, make_backend
    from inference_distill.filters import Filter
    from inference_distill.prompts import PromptSource
    from inference_distill.shards import ShardWriter

    teacher = opts.served_model_name if opts.backend == "openai" else opts.teacher
    check_backend(opts.backend, teacher, opts.endpoints)
    if opts.backend == "cookbook":
        model_format(opts.teacher)  # a teacher that is not here is named first (vllm's may be a hub name)
    opts.sampling.check()
    opts.filters.check()
    if opts.prompts_per_shard < 1:
        raise CookbookError(f"--prompts-per-shard {opts.prompts_per_shard} must be at least 1")
    source = PromptSource(
        opts.prompts_from,
        prompt_tokenizer(opts),
        opts.prefix_tokens,
        opts.prefix_fraction,
        opts.min_doc_tokens,
        opts.num_prompts,
        opts.seed,
        opts.text_key,
    )
    total = source.count()

    def start_backend():
        return make_backend(
            opts.backend,
            teacher=teacher,
            endpoints=opts.endpoints,
            tensor_parallel_size=opts.tensor_parallel_size,
            concurrency=opts.concurrency,
            timeout=opts.timeout,
            retries=opts.retries,
            device=opts.device,
            dtype=opts.dtype,
            batch_size=opts.batch_size,
            tokenizer_model=opts.tokenizer_model,
            gpu_memory_utilization=opts.gpu_memory_utilization,
        )

    # the output folder is checked before a teacher is loaded (minutes for a 70B); the servers' model name is cheap
    backend = start_backend() if opts.backend == "openai" else None
    try:
        name = backend.teacher if backend is not None else str(teacher)
        with ShardWriter(opts.output, _identity(opts, source, name), total, opts.prompts_per_shard) as writer:
            if writer.done_stats():
                done = writer.totals()
                console.print(
                    f"resuming {opts.output}: {done['shards']} of {writer.num_shards} shards already written "
                    f"({done['prompts']:,} prompts)"
                )
            if writer.pending():
                backend = backend or start_backend()
                _generate_shards(
                    opts, source, backend, writer, Filter(opts.filters, writer.seen_hashes()), show_progress
                )
            summary = writer.finish()
    finally:
        if backend is not None:
            backend.close()
    filtered = ", ".join(f"{n:,} {why}" for why, n in summary.get("filtered", {}).items() if n) or "none"
    console.print(
        f"[green]wrote[/green] {summary['records']:,} records from {summary['prompts']:,} prompts "
        f"({summary.get('generated_tokens', 0):,} generated tokens) in {writer.num_shards} shards to {opts.output}; "
        f"filtered: {filtered}"
    )
    return summary


def _generate_shards(opts: DistillGenerateConfig, source, backend, writer, keep, show_progress: bool | None) -> None:
    from cookbook.progress import GenerationBar

    sampling = opts.sampling.to_dict()
    done = writer.totals()["prompts"]
    with GenerationBar(
        writer.total, done, enabled=console.is_terminal if show_progress is None else show_progress
    ) as bar:
        for k in writer.pending():
            start, stop = writer.bounds(k)
            prompts = source.prompts(start, stop)
            seeds = [opts.seed * 1_000_003 + p.index for p in prompts]  # per prompt: a resumed shard is the same shard
            results = backend.generate([p.text for p in prompts], opts.sampling, seeds, on_progress=bar.advance)
            records = []
            for prompt, completions in zip(prompts, results):
                for j, completion in enumerate(completions):
                    text = completion.text if opts.continuation_only else prompt.text + completion.text
                    if keep.keep(text, completion) is None:
                        records.append(_record(prompt, j, completion, text, backend.teacher, sampling))
            stats, hashes = keep.end_shard()
            writer.write(k, records, stats, hashes)
            bar.shard_done(stop)


def generate_dry_run(opts: DistillGenerateConfig) -> None:
    """Check a generation job without the teacher: the flags, and the prompts where their data are here."""
    import importlib.util

    from inference_distill.backends import check_backend
    from inference_distill.prompts import PromptSource

    check_backend(opts.backend, opts.served_model_name if opts.backend == "openai" else opts.teacher, opts.endpoints)
    opts.sampling.check()
    opts.filters.check()
    if opts.prompts_per_shard < 1:
        raise CookbookError(f"--prompts-per-shard {opts.prompts_per_shard} must be at least 1")
    console.print(
        f"[bold]teacher[/bold] {opts.teacher or opts.served_model_name or '(the servers’ model)'} via {opts.backend}"
        + (f" at {', '.join(opts.endpoints)}" if opts.endpoints else "")
        + (f", tensor parallel {opts.tensor_parallel_size}" if opts.backend == "vllm" else "")
    )
    console.print(f"[bold]sampling[/bold] {json.dumps(opts.sampling.to_dict())}")
    console.print(f"[bold]filters[/bold] {json.dumps(asdict(opts.filters))}")
    if opts.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        console.print(
            "[yellow]vLLM is not installed here (needed where the job runs: pip install 'cookbook\\[vllm]')[/yellow]"
        )
    if opts.teacher and opts.backend != "openai" and not Path(opts.teacher).exists():
        console.print(f"[yellow]--teacher {opts.teacher} is not here (needed where the job runs)[/yellow]")
    if not Path(opts.prompts_from).exists() and not Path(opts.prompts_from + ".idx").exists():
        console.print(f"[yellow]--prompts-from {opts.prompts_from} is not here (needed where the job runs)[/yellow]")
    else:
        try:
            tokenizer = prompt_tokenizer(opts)
        except CookbookError as e:
            console.print(f"[yellow]prompts not counted: {e}[/yellow]")
        else:
            source = PromptSource(
                opts.prompts_from,
                tokenizer,
                opts.prefix_tokens,
                opts.prefix_fraction,
                opts.min_doc_tokens,
                opts.num_prompts,
                opts.seed,
                opts.text_key,
            )
            total = source.count()
            console.print(
                f"[bold]prompts[/bold] {total:,} of {source.documents:,} documents, {-(-total // opts.prompts_per_shard):,} "
                f"shards; the first: {source.prompts(0, 1)[0].text[:80]!r}"
            )
    console.print("[green]dry run: the generation job is valid[/green]")
