"""The one job lifecycle every training command runs: ``cookbook pretrain``, ``extend``, prune's heal and
``distill train``.

    flags (over a TOML --config)  ->  resolve  ->  a command's change (JobConfig -> JobConfig)  ->  dry_run | run

``resolve`` turns the TOML file's sections, the flags over them field by field and a preset under both into one
``JobConfig``, and decides where training starts:

- from scratch;
- continuing a run: ``--load`` names a save whose optimizer state, step, data position and RNG come along (``--load X
  --save X`` both starts and continues a job: what a preemptible cluster needs);
- fine-tuning (``--finetune``): a save's weights only, a new run at step 0. A Hugging Face folder as ``--load`` is
  converted into a cookbook save inside ``--save`` (``.hf_source``) when the run starts, then fine-tuned from.

The model's shape comes from the checkpoint training starts from; flags that contradict it are refused (the RoPE
scaling, context and init std may change). ``continue_in_save`` (extend, prune's heal, distill train): the same
command run again continues the run in ``--save``; the first time it fine-tunes from ``--load``. A command then
changes the resolved config with ``dataclasses.replace`` (extend: the scaled RoPE and length; the heal: the pruned
model's teacher; distill: the blended data), and ``dry_run`` checks it for a world size without devices, or ``run``
trains it with the ``Trainer``. Where ``--load`` is not here (a dry run away from the cluster), ``stand_in`` or
``--preset`` stands in for its model.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from rich.markup import escape

from cookbook.data.tokenizer import load_tokenizer, padded_vocab_size
from cookbook.engine import checkpoint
from cookbook.engine.config import JobConfig, build_config, dumps_toml, merge, read_toml
from cookbook.errors import CookbookError
from cookbook.fileio import check_writable
from cookbook.model.config import ModelConfig, describe
from cookbook.progress import console

# fields a continued run may change; every other model field is fixed by the checkpoint's weights
ADJUSTABLE_MODEL_FIELDS = {"rope_scaling", "max_seq_len", "init_std"}
HF_SOURCE = ".hf_source"  # inside --save: a Hugging Face --load converted to a cookbook save


@dataclasses.dataclass
class Job:
    config: JobConfig
    start: Path | None  # the save training loads (None: from scratch); for a Hugging Face --load, its converted copy
    finetune: bool  # the weights only: a new run at step 0
    sections: dict[str, dict]  # the sections as given (TOML under flags): what the command asked for
    source: dict[str, dict] | None  # --load's config sections, when it is here
    hf: Path | None = None  # --load's Hugging Face folder, converted into ``start`` when the run starts

    def replace(self, config: JobConfig) -> Job:
        return dataclasses.replace(self, config=config)


def read_sections(config_file: str | Path | None, flags: dict[str, dict]) -> dict[str, dict]:
    """The TOML file's sections with the flags over them, field by field."""
    return merge(read_toml(config_file) if config_file else {}, flags)


def main_process() -> bool:
    """Rank 0 of a torchrun launch, or the only process (what prints a job's notes)."""
    return int(os.environ.get("RANK", 0)) == 0


def resolve(
    config_file: str | Path | None,
    flags: dict[str, dict],
    *,
    continue_in_save: str | None = None,
    here: bool = True,
    stand_in: ModelConfig | None = None,
) -> Job:
    """The job the flags describe (module docstring). ``continue_in_save``: what the run is called ("the
    extension"), for a command whose rerun continues its run in --save; ``here=False``: a dry run away from the
    cluster, where the checkpoint, the tokenizer and the data may be missing; ``stand_in``: the model of a --load
    not written yet."""
    sections = read_sections(config_file, flags)
    given = {name: dict(values) for name, values in sections.items()}
    ck = sections.setdefault("checkpoint", {})
    load, save = ck.get("load"), ck.get("save")
    if continue_in_save and not save:
        raise CookbookError("this command needs --save: the folder for the new run")
    form = _format(load) if load else None
    source = checkpoint.model_sections(load) if form else None
    start, finetune, hf = None, bool(ck.get("finetune")), None
    in_save = checkpoint.find_checkpoint(save) if continue_in_save and (Path(save) / "latest").is_file() else None
    if continue_in_save and in_save is not None:  # the same command again: continue its run
        start, finetune = in_save, False
        if main_process():
            console.print(f"continuing {continue_in_save} saved in {escape(str(save))}", highlight=False)
    elif form == "hf":
        if not (finetune or continue_in_save):
            raise CookbookError(
                f"--load {load} is a Hugging Face model folder: it holds weights, not a run; start a run "
                "from it with --finetune"
            )
        start, finetune, hf = Path(save or ".") / HF_SOURCE, True, Path(load)
    elif form == "cookbook":
        start, finetune = checkpoint.find_checkpoint(load), finetune or bool(continue_in_save)
    elif load:
        same = save and Path(load).resolve() == Path(save).resolve()
        if finetune and same:
            raise CookbookError(f"--finetune needs a checkpoint in --load {load}")
        if stand_in is None and not same:
            if here or not sections.get("model", {}).get("preset"):
                why = "no 'latest' file and no step_* save" if Path(load).exists() else "it does not exist"
                raise CookbookError(
                    f"--load {load} holds no checkpoint ({why})"
                    + ("" if here else "; give --preset for its model to check the job without it")
                )
            console.print(
                f"[yellow]--load {escape(str(load))} is not here (needed where the job runs): checking with "
                f"preset {sections['model']['preset']}[/yellow]",
                highlight=False,
            )
        finetune = False
    continuing = start is not None and not finetune and save and start.parent.resolve() == Path(save).resolve()
    if save and (Path(save) / "latest").is_file() and not continuing:
        raise CookbookError(
            f"--save {save} already holds a run; pass --load {save} to continue it, or choose another --save"
        )
    if save and here:
        check_writable(save, "--save", folder=True)

    if hf is not None:
        saved = source
    elif start is not None:
        saved = checkpoint.read_config(start)
    else:
        saved = {"model": stand_in.to_dict()} if stand_in is not None else None
    if saved is not None:
        sections["model"] = _model_of(sections.get("model", {}), saved["model"], start or load)
        data = sections.setdefault("data", {})
        for key in ("tokenizer_model", "tokenizer_type"):
            if data.get(key) is None and saved.get("data", {}).get(key) is not None:
                data[key] = saved["data"][key]
    _check_vocabulary(sections, new_model=saved is None, here=here)
    ck["finetune"] = finetune
    return Job(build_config(sections), start, finetune, given, source, hf)


def _format(load) -> str | None:
    """ "cookbook" or "hf" when --load holds a checkpoint of that format, else None (not written yet, or not here)."""
    if checkpoint.find_checkpoint(load) is not None:
        return "cookbook"
    return "hf" if (Path(load) / "config.json").is_file() else None


def _model_of(asked: dict, saved: dict, where) -> dict:
    """The checkpoint's model section, refusing flags that contradict its weights."""
    asked = {k: v for k, v in asked.items() if k != "preset"}
    for key, value in asked.items():
        if key not in ADJUSTABLE_MODEL_FIELDS and saved.get(key) != value:
            raise CookbookError(
                f"{where} holds a model with {key}={saved.get(key)}, not {value}; drop that setting (the "
                "shape comes from --load)"
            )
    return {**saved, **{k: v for k, v in asked.items() if k in ADJUSTABLE_MODEL_FIELDS}}


def _check_vocabulary(sections: dict[str, dict], new_model: bool, here: bool) -> None:
    """The tokenizer, before any work: it must exist, and a new model's vocabulary (the tokenizer's, padded, unless
    --vocab-size says otherwise) must hold every id it makes."""
    data, model = sections.setdefault("data", {}), sections.setdefault("model", {})
    if not data.get("tokenizer_model"):
        return
    if not here and not Path(data["tokenizer_model"]).exists():
        console.print(
            f"[yellow]tokenizer {escape(data['tokenizer_model'])} not found here (needed where the job runs)[/yellow]"
        )
        return
    tokenizer = load_tokenizer(data["tokenizer_model"], data.get("tokenizer_type"))
    if not new_model:  # the checkpoint's vocabulary is fixed by its weights; the data's ids are checked as read
        return
    vocab = model.get("vocab_size")
    if vocab is None:
        model["vocab_size"] = padded_vocab_size(tokenizer.vocab_size, data.get("make_vocab_size_divisible_by", 128))
    elif vocab < tokenizer.vocab_size:
        raise CookbookError(
            f"--vocab-size {vocab} is smaller than the tokenizer {data['tokenizer_model']}'s "
            f"{tokenizer.vocab_size} ids: drop --vocab-size (by default it is the tokenizer's, padded) "
            f"or give at least {tokenizer.vocab_size}"
        )


# --------------------------------------------------------------------------- dry run and run


def show_job(
    job: JobConfig, dims, global_batch: int, accumulation: int, where: str, dtype: str, full: bool = False
) -> None:
    """What a training job is, in five lines; the full config first with ``full`` or --print-config (every save holds
    it as config.toml)."""
    m, d, o, t, c = job.model, job.data, job.optimizer, job.training, job.checkpoint
    full = full or t.print_config
    if full:
        console.print(dumps_toml(job.to_dict()), highlight=False, markup=False)
    layout = f"pp {dims.pp} x dp {dims.dp} x cp {dims.cp} x tp {dims.tp}{' + SP' if dims.sequence_parallel else ''}"
    warmup = (
        f", warmup {o.lr_warmup_iters}"
        if o.lr_warmup_iters
        else (f", warmup {o.lr_warmup_fraction:g} of the decay" if o.lr_warmup_fraction else "")
    )
    tokens = t.train_iters * global_batch * d.seq_length
    if not c.save:
        saves = "none (no --save)"
    else:
        when = f"every {c.save_interval} iterations and at the end" if c.save_interval else "at the end"
        saves = f"{escape(c.save)} {when}, each with config.toml (the full config)"
    extras = [
        x
        for x in (
            f"recompute {t.recompute_granularity}" if t.recompute_granularity != "none" else "",
            "compile" if t.compile else "",
            "fp8" if t.fp8 else "",
            f"KD from {escape(t.kd_teacher)} (ratio {t.kd_ratio:g}, temperature {t.kd_temperature:g})"
            if t.kd_teacher
            else "",
        )
        if x
    ]
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


def dry_run(job: Job, world_size: int, gpu: str = "A100-80GB") -> None:
    """Validate a job for ``world_size`` processes without devices, and print its layout and the memory and
    step-time estimate of ``cookbook plan`` for it."""
    from cookbook.data.indexed import bin_path, idx_path
    from cookbook.data.loader import parse_data_path
    from cookbook.engine.plan import GPUS, estimate
    from cookbook.engine.trainer import check_layout

    cfg = job.config
    dims = cfg.parallel.resolve(world_size)
    global_batch, accumulation = check_layout(cfg, dims)
    show_job(cfg, dims, global_batch, accumulation, f"{world_size} processes (dry run)", cfg.training.dtype, full=True)
    try:
        parse_data_path(cfg.data.data_path)
    except CookbookError as e:
        missing = [
            p for p in " ".join(cfg.data.data_path).split() if not (idx_path(p).is_file() and bin_path(p).is_file())
        ]
        if not missing:
            raise
        console.print(
            f"[yellow]data not found here (needed where the job runs): {escape(str(e))}[/yellow]", highlight=False
        )
    if gpu not in GPUS:
        raise CookbookError(f"unknown --gpu {gpu!r}; choose one of {', '.join(GPUS)}")
    t = cfg.training
    layout = estimate(
        cfg.model,
        cfg.data.seq_length,
        global_batch,
        GPUS[gpu],
        world_size,
        min(world_size, 8),
        dims.tp,
        dims.pp,
        t.recompute_granularity,
        t.micro_batch_size,
    )
    if job.start or job.hf:
        console.print(f"[bold]from[/bold]     {escape(str(job.hf or job.start))}", highlight=False)
    console.print(
        f"[bold]estimate on {gpu}[/bold] (cookbook plan): {layout.total_gib:.1f} GiB per GPU "
        f"({'fits' if layout.fits else 'DOES NOT FIT'}), ~{layout.step_seconds:.1f} s per step, MFU ~{100 * layout.mfu:.0f}%"
    )
    if not layout.fits:
        raise CookbookError(
            f"the estimate needs {layout.total_gib:.1f} GiB per GPU, more than one {gpu} holds; see cookbook "
            "plan for layouts that fit"
        )
    console.print(f"[green]dry run: the job is valid for {world_size} processes[/green]")


def run(job: Job, iters_flag: str = "--train-iters") -> dict:
    """Train the job with the Trainer; ``iters_flag``: the flag that sets its length in the calling command (prune:
    --heal-steps). Returns the last logged record."""
    from cookbook.engine.distributed import barrier, init_distributed, shutdown
    from cookbook.engine.trainer import Trainer

    try:
        start = job.start
        if job.hf is not None:  # the converted copy of a Hugging Face --load, made once by rank 0
            init_distributed(job.config.training.device)
            if main_process():
                convert_hf(job.hf, job.start)
            barrier()
            start = checkpoint.find_checkpoint(job.start)
        trainer = Trainer(job.config, load=start)
        t = job.config.training
        if trainer.dist.is_main:
            show_job(
                job.config,
                trainer.dims,
                trainer.global_batch,
                trainer.accumulation,
                f"{trainer.device.type} x {trainer.dist.world_size}",
                f"{t.dtype} ({trainer.dtype_reason})",
            )
        if trainer.step >= t.train_iters:
            if trainer.dist.is_main:
                console.print(
                    f"[bold yellow]already trained {trainer.step} of {t.train_iters} iterations in "
                    f"{escape(str(job.config.checkpoint.save or job.start))}: nothing to do[/bold yellow]; raise "
                    f"{iters_flag} to train on, or choose another --save for a new run",
                    highlight=False,
                )
            return {}
        return trainer.train()
    finally:
        shutdown()


def convert_hf(folder: Path, target: Path) -> Path:
    """A Hugging Face folder as a cookbook save at ``target`` (kept and reused while its source is the same folder)."""
    from cookbook.engine import cookbook_format
    from cookbook.formats import hf
    from cookbook.formats.stream import checked

    made = checkpoint.find_checkpoint(target) if target.is_dir() else None
    source = str(folder.resolve())
    if made is not None and checkpoint.read_train_state(made).get("converted_from") == source:
        return made
    ckpt = hf.read(folder)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ckpt.description = source
    console.print(f"converting the Hugging Face model {escape(source)} into {escape(str(target))}", highlight=False)
    cookbook_format.write(tmp, target, ckpt, checked(ckpt.tensors(), ckpt.config, source), ckpt.dtypes)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return checkpoint.find_checkpoint(target)
