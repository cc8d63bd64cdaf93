"""``cookbook pretrain``: resolve the job config (preset, TOML, flags, a checkpoint), then train.

``--load`` continues a run (model, optimizer, step, data position, RNG); the model's shape then
comes from the checkpoint. ``--finetune`` starts a new run from the checkpoint's weights. When
``--load`` and ``--save`` name the same folder and it holds no checkpoint yet, training starts from
scratch, so one command both starts and resumes a job (what a preemptible cluster needs).
"""

from __future__ import annotations

from pathlib import Path

from rich.markup import escape

from cookbook.data.tokenizer import load_tokenizer
from cookbook.engine import checkpoint
from cookbook.engine.config import JobConfig, build_config, dumps_toml, merge, read_toml
from cookbook.engine.distributed import shutdown
from cookbook.engine.trainer import Trainer
from cookbook.errors import CookbookError
from cookbook.fileio import check_writable
from cookbook.model.config import describe
from cookbook.progress import console

# fields a continued run may change; every other model field is fixed by the checkpoint's weights
ADJUSTABLE_MODEL_FIELDS = {"rope_scaling", "max_seq_len", "init_std"}


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int = 1) -> int:
    """Megatron-LM's padding: the next multiple of ``divisible_by x tp``."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def _model_from_checkpoint(sections: dict, ckpt: Path) -> None:
    """Replace the model section by the checkpoint's, refusing flags that contradict its weights."""
    saved = checkpoint.read_config(ckpt)
    asked = {k: v for k, v in sections.get("model", {}).items() if k != "preset"}
    for key, value in asked.items():
        if key not in ADJUSTABLE_MODEL_FIELDS and saved["model"].get(key) != value:
            raise CookbookError(
                f"{ckpt} holds a model with {key}={saved['model'].get(key)}, not {value}; drop that setting (the shape comes from --load)"
            )
    sections["model"] = {**saved["model"], **{k: v for k, v in asked.items() if k in ADJUSTABLE_MODEL_FIELDS}}
    data = sections.setdefault("data", {})
    for key in ("tokenizer_model", "tokenizer_type"):
        if data.get(key) is None and saved.get("data", {}).get(key) is not None:
            data[key] = saved["data"][key]


def resolve(config_file: str | Path | None, overrides: dict[str, dict], here: bool = True) -> tuple[JobConfig, Path | None]:
    """The job config and the checkpoint to start from (None: from scratch). ``here=False`` (a dry run away from
    the cluster) lets the tokenizer be missing."""
    sections = merge(read_toml(config_file) if config_file else {}, overrides)
    ckpt_cfg = sections.get("checkpoint", {})
    ckpt = None
    if ckpt_cfg.get("load"):
        load = Path(ckpt_cfg["load"])
        ckpt = checkpoint.find_checkpoint(load)
        if ckpt is not None:
            _model_from_checkpoint(sections, ckpt)
        elif not (ckpt_cfg.get("save") and load.resolve() == Path(ckpt_cfg["save"]).resolve()):
            raise CookbookError(f"--load {load} holds no checkpoint (no 'latest' file and no step_* save)")
        if ckpt_cfg.get("finetune") and ckpt is None:
            raise CookbookError(f"--finetune needs a checkpoint in --load {load}")
    save = ckpt_cfg.get("save")
    continuing = ckpt is not None and not ckpt_cfg.get("finetune") and Path(save or "").resolve() == ckpt.parent.resolve()
    if save and (Path(save) / "latest").is_file() and not continuing:
        raise CookbookError(f"--save {save} already holds a run; pass --load {save} to continue it, or choose another --save")
    if save and here:
        check_writable(save, "--save", folder=True)
    _check_vocabulary(sections, ckpt, here)
    return build_config(sections), ckpt


def _check_vocabulary(sections: dict[str, dict], ckpt: Path | None, here: bool = True) -> None:
    """The tokenizer, before any work: it must exist, and a new model's vocabulary (the tokenizer's, padded, unless
    --vocab-size says otherwise) must hold every id it makes."""
    data, model = sections.setdefault("data", {}), sections.setdefault("model", {})
    if not data.get("tokenizer_model"):
        return
    if not here and not Path(data["tokenizer_model"]).exists():
        console.print(f"[yellow]tokenizer {data['tokenizer_model']} not found here (needed where the job runs)[/yellow]")
        return
    tokenizer = load_tokenizer(data["tokenizer_model"], data.get("tokenizer_type"))
    if ckpt is not None:  # the checkpoint's vocabulary is fixed by its weights; the data's ids are checked as read
        return
    vocab = model.get("vocab_size")
    if vocab is None:
        model["vocab_size"] = padded_vocab_size(tokenizer.vocab_size, data.get("make_vocab_size_divisible_by", 128))
    elif vocab < tokenizer.vocab_size:
        raise CookbookError(f"--vocab-size {vocab} is smaller than the tokenizer {data['tokenizer_model']}'s "
                            f"{tokenizer.vocab_size} ids: drop --vocab-size (by default it is the tokenizer's, padded) "
                            f"or give at least {tokenizer.vocab_size}")


def show_job(job: JobConfig, dims, global_batch: int, accumulation: int, where: str, dtype: str, full: bool = False) -> None:
    """What a training job is, in five lines; the full config first with ``full`` or --print-config (every save holds
    it as config.toml)."""
    m, d, o, t, c = job.model, job.data, job.optimizer, job.training, job.checkpoint
    full = full or t.print_config
    if full:
        console.print(dumps_toml(job.to_dict()), highlight=False, markup=False)
    layout = f"pp {dims.pp} x dp {dims.dp} x cp {dims.cp} x tp {dims.tp}{' + SP' if dims.sequence_parallel else ''}"
    warmup = f", warmup {o.lr_warmup_iters}" if o.lr_warmup_iters else (f", warmup {o.lr_warmup_fraction:g} of the decay" if o.lr_warmup_fraction else "")
    tokens = t.train_iters * global_batch * d.seq_length
    if not c.save:
        saves = "none (no --save)"
    else:
        when = f"every {c.save_interval} iterations and at the end" if c.save_interval else "at the end"
        saves = f"{escape(c.save)} {when}, each with config.toml (the full config)"
    extras = [x for x in (f"recompute {t.recompute_granularity}" if t.recompute_granularity != "none" else "",
                          "compile" if t.compile else "", "fp8" if t.fp8 else "",
                          f"KD from {escape(t.kd_teacher)} (ratio {t.kd_ratio:g}, temperature {t.kd_temperature:g})" if t.kd_teacher else "") if x]
    lines = [
        f"[bold]model[/bold]    {describe(m)}: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_heads} heads "
        f"({m.num_kv_heads} kv), ffn {m.intermediate_size}, vocab {m.vocab_size}, context {m.max_seq_len}",
        f"[bold]data[/bold]     {escape(' '.join(d.data_path)) or '(none)'}, split {d.split}, {d.seq_length} tokens per sample"
        + (f", tokenizer {escape(d.tokenizer_model)}" if d.tokenizer_model else ""),
        f"[bold]training[/bold] {t.train_iters:,} iterations of {global_batch} samples = {t.micro_batch_size} micro x {dims.dp} "
        f"data-parallel x {accumulation} accumulation ({tokens:,} tokens); lr {o.lr:g} {o.lr_decay_style}{warmup}"
        + (f"; {', '.join(extras)}" if extras else ""),
        f"[bold]device[/bold]   {where}, {layout}; dtype {escape(dtype)}",
        f"[bold]saves[/bold]    {saves}" + ("" if full else "; --print-config prints it here"),
    ]
    for line in lines:
        console.print(line, highlight=False)


def dry_run(config_file: str | Path | None, overrides: dict[str, dict], world_size: int, gpu: str = "A100-80GB") -> None:
    """Validate a job for ``world_size`` processes without devices, and print its layout and the
    memory and step-time estimate of ``cookbook plan`` for it."""
    from cookbook.data.indexed import bin_path, idx_path
    from cookbook.data.loader import parse_data_path
    from cookbook.engine.trainer import check_layout
    from cookbook.engine.plan import GPUS, estimate

    job, ckpt = resolve(config_file, overrides, here=False)
    dims = job.parallel.resolve(world_size)
    global_batch, accumulation = check_layout(job, dims)
    show_job(job, dims, global_batch, accumulation, f"{world_size} processes (dry run)", job.training.dtype, full=True)
    try:
        parse_data_path(job.data.data_path)
    except CookbookError as e:
        missing = [p for p in " ".join(job.data.data_path).split() if not (idx_path(p).is_file() and bin_path(p).is_file())]
        if not missing:
            raise
        console.print(f"[yellow]data not found here (needed where the job runs): {e}[/yellow]")
    if gpu not in GPUS:
        raise CookbookError(f"unknown --gpu {gpu!r}; choose one of {', '.join(GPUS)}")
    t = job.training
    mode = t.recompute_granularity
    layout = estimate(job.model, job.data.seq_length, global_batch, GPUS[gpu], world_size, min(world_size, 8),
                      dims.tp, dims.pp, mode, t.micro_batch_size)
    if ckpt:
        console.print(f"[bold]from[/bold]     {escape(str(ckpt))}", highlight=False)
    console.print(
        f"[bold]estimate on {gpu}[/bold] (cookbook plan): {layout.total_gib:.1f} GiB per GPU "
        f"({'fits' if layout.fits else 'DOES NOT FIT'}), ~{layout.step_seconds:.1f} s per step, MFU ~{100 * layout.mfu:.0f}%"
    )
    if not layout.fits:
        raise CookbookError(f"the estimate needs {layout.total_gib:.1f} GiB per GPU, more than one {gpu} holds; see cookbook plan for layouts that fit")
    console.print(f"[green]dry run: the job is valid for {world_size} processes[/green]")


def run(config_file: str | Path | None, overrides: dict[str, dict], iters_flag: str = "--train-iters") -> dict:
    """Train the job; ``iters_flag``: the flag that sets its length in the calling command (prune: --heal-steps)."""
    job, ckpt = resolve(config_file, overrides)
    trainer = Trainer(job, load=ckpt)
    try:
        if trainer.dist.is_main:
            show_job(job, trainer.dims, trainer.global_batch, trainer.accumulation,
                     f"{trainer.device.type} x {trainer.dist.world_size}", f"{job.training.dtype} ({trainer.dtype_reason})")
        if trainer.step >= job.training.train_iters:
            if trainer.dist.is_main:
                console.print(f"[bold yellow]already trained {trainer.step} of {job.training.train_iters} iterations in "
                              f"{escape(str(job.checkpoint.save or ckpt))}: nothing to do[/bold yellow]; raise {iters_flag} to train on, "
                              "or choose another --save for a new run", highlight=False)
            return {}
        return trainer.train()
    finally:
        shutdown()
