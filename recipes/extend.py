"""``cookbook extend``: stretch a model's context window by rescaling RoPE, then continue training at the new length.

Position Interpolation (Chen et al. 2023; Megatron-LM's ``--rotary-seq-len-interpolation-factor``) divides every
position by a factor ``s``, so a model trained on ``L`` tokens sees positions ``0 .. sL`` inside the range it knows,
then ~1000 iterations of training at ``sL`` adapt it (the Megatron Cookbook: Llama-2-7B 4k -> 8k, 13B 4k -> 32k).
The same command writes the other scalings HF transformers knows, in its ``rope_scaling`` form, so the extended
checkpoint converts to a config.json transformers runs as is:

    linear    {"rope_type": "linear", "factor": s}                   max_position_embeddings = sL   (PI)
    dynamic   {"rope_type": "dynamic", "factor": s}                  max_position_embeddings = L    (NTK, grows past L)
    yarn      {"rope_type": "yarn", "factor": s, "original_max_position_embeddings": L}      max = sL
    llama3    {"rope_type": "llama3", "factor": s, "low_freq_factor": 1, "high_freq_factor": 4,
               "original_max_position_embeddings": L}                                      max = sL

Training is the shared Trainer's: ``cookbook pretrain --load CKPT --finetune`` with the scaled model config and
``--seq-length sL``, so every training flag, parallel layout (context parallel for 32k and beyond) and
checkpoint rule applies. Run the same command again after an interruption and it continues from ``--save``.
``--no-train`` writes the scaled checkpoint without training (dynamic NTK and YaRN work training-free).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from cookbook.engine import checkpoint, job
from cookbook.engine.checkpoint import model_format
from cookbook.engine.config import JobConfig
from cookbook.errors import CookbookError
from cookbook.progress import console

ROPE_TYPES = ("linear", "dynamic", "yarn", "llama3")


@dataclass
class Extension:
    """What the extension changes: the model's RoPE scaling and context, and the training length."""

    rope_scaling: dict
    max_seq_len: int
    seq_length: int
    original: int  # the context the unscaled model was trained for
    current: int  # the context the checkpoint handles now (original x any linear factor it already has)
    note: str = ""


def original_context(model: dict) -> tuple[int, float]:
    """(context of the unscaled model, linear factor already applied) of a checkpoint's model section."""
    scaling = model.get("rope_scaling") or {}
    if not scaling:
        return int(model["max_seq_len"]), 1.0
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind != "linear":
        raise CookbookError(
            f"the checkpoint is already extended with {kind} RoPE scaling (factor {scaling.get('factor')}); only linear "
            "scaling composes: extend the unscaled checkpoint instead"
        )
    factor = float(scaling["factor"])
    return round(int(model["max_seq_len"]) / factor), factor


def plan_extension(model: dict, rope_type: str, factor: float, seq_length: int | None) -> Extension:
    """The scaled config for ``model`` (a checkpoint's model section): ``factor`` stretches the context it was
    trained for; a checkpoint already stretched linearly is stretched again (the factors multiply)."""
    if rope_type not in ROPE_TYPES:
        raise CookbookError(f"unknown --rope-type {rope_type!r}; choose one of {', '.join(ROPE_TYPES)}")
    if not factor > 1:
        raise CookbookError(
            f"--interp-factor {factor:g} must be greater than 1 (it stretches the context by that factor)"
        )
    original, before = original_context(model)
    if before > 1 and rope_type != "linear":
        raise CookbookError(
            f"the checkpoint is already extended linearly (factor {before:g}); extend it again with --rope-type linear, or start from the unscaled checkpoint"
        )
    current = round(original * before)  # the context the checkpoint handles now
    total = before * factor
    target = round(current * factor)
    if seq_length is None:
        seq_length = target
    elif seq_length != target:
        raise CookbookError(
            f"--seq-length {seq_length} does not match --interp-factor {factor:g}: the checkpoint's context is {current}, "
            f"stretched {factor:g} times it is {target}; use --seq-length {target} or --interp-factor {seq_length / current:g}"
        )
    scaling: dict = {"rope_type": rope_type, "factor": total}
    if rope_type in ("yarn", "llama3"):
        scaling["original_max_position_embeddings"] = original
    if rope_type == "llama3":
        scaling.update(low_freq_factor=1.0, high_freq_factor=4.0)
    # dynamic NTK grows the base only past max_position_embeddings: it stays the original context
    max_seq_len = original if rope_type == "dynamic" else round(original * total)
    note = f"composing with the checkpoint's linear factor {before:g}: total factor {total:g}" if before > 1 else ""
    return Extension(scaling, max_seq_len, seq_length, original, current, note)


def extended(config: JobConfig, ext: Extension) -> JobConfig:
    """The job at the new length: the scaled RoPE and context, and samples of the new length."""
    return dataclasses.replace(
        config,
        model=config.model.replace(rope_scaling=ext.rope_scaling, max_seq_len=ext.max_seq_len),
        data=dataclasses.replace(config.data, seq_length=ext.seq_length),
    )


def write_scaled(ckpt: Path, save: Path, ext: Extension) -> Path:
    """``--no-train``: a copy of ``ckpt`` (the same weights and state) whose config carries the scaling, as a save
    in ``save`` with its ``latest``. Written under a temporary name and renamed."""
    if (save / "latest").exists():
        raise CookbookError(f"--save {save} already holds a run; choose another --save")
    save.mkdir(parents=True, exist_ok=True)
    tmp, final = save / f".{ckpt.name}.tmp", save / ckpt.name
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ckpt, tmp)
    sections = checkpoint.read_config(ckpt)
    sections["model"] = {**sections["model"], "rope_scaling": ext.rope_scaling, "max_seq_len": ext.max_seq_len}
    sections.setdefault("data", {})["seq_length"] = ext.seq_length
    sections.setdefault("checkpoint", {})["save"] = str(save)
    checkpoint.write_save_files(tmp, sections, None)
    return checkpoint.commit_save(tmp, final)


def extension_job(
    config_file, flags: dict[str, dict], rope_type: str, interp_factor: float | None, here: bool = True
) -> tuple[job.Job, Extension]:
    """The training job of an extension, and the extension. The scaling is planned from --load's model (the same
    whether the run starts or continues in --save); where --load is not here (a dry run), --preset stands in."""
    _need_factor(interp_factor)
    if not job.read_sections(config_file, flags).get("checkpoint", {}).get("load"):
        raise CookbookError("cookbook extend needs --load: the checkpoint whose context to extend")
    j = job.resolve(config_file, flags, continue_in_save="the extension", here=here)
    model = j.source["model"] if j.source else j.config.model.to_dict()
    ext = plan_extension(model, rope_type, interp_factor, j.sections.get("data", {}).get("seq_length"))
    return j.replace(extended(j.config, ext)), ext


def dry_run(
    config_file: str | Path | None,
    flags: dict[str, dict],
    rope_type: str,
    interp_factor: float | None,
    world_size: int,
    gpu: str,
) -> None:
    """Validate an extension job for ``world_size`` processes without devices (``cookbook pretrain --dry-run``'s
    checks and estimate at the new length)."""
    j, _ = extension_job(config_file, flags, rope_type, interp_factor, here=False)
    job.dry_run(j, world_size, gpu)


def run(
    config_file: str | Path | None,
    flags: dict[str, dict],
    rope_type: str,
    interp_factor: float | None,
    no_train: bool = False,
) -> dict:
    sections = job.read_sections(config_file, flags)
    load, save = sections.get("checkpoint", {}).get("load"), sections.get("checkpoint", {}).get("save")
    if not load:
        raise CookbookError("cookbook extend needs --load: the checkpoint whose context to extend")
    if not save:
        raise CookbookError("cookbook extend needs --save: the folder for the extended model")
    _need_factor(interp_factor)
    if no_train:
        model_format(load)  # a missing or wrong --load is named first
        source = checkpoint.find_checkpoint(load) or job.convert_hf(Path(load), Path(save) / job.HF_SOURCE)
        ext = plan_extension(
            checkpoint.read_config(source)["model"],
            rope_type,
            interp_factor,
            sections.get("data", {}).get("seq_length"),
        )
        _announce(ext)
        path = write_scaled(source, Path(save), ext)
        console.print(f"[green]wrote[/green] {path} (weights unchanged, config scaled; no training)")
        return {}
    j, ext = extension_job(config_file, flags, rope_type, interp_factor)
    _announce(ext)
    return job.run(j)


def _need_factor(interp_factor: float | None) -> None:
    if interp_factor is None:
        raise CookbookError(
            "cookbook extend needs --interp-factor: how many times longer the new context is (2 for 4k -> 8k)"
        )


def _announce(ext: Extension) -> None:
    if job.main_process():  # under torchrun every rank gets here: one says it
        if ext.note:
            console.print(f"[yellow]{ext.note}[/yellow]")
        console.print(f"RoPE scaling {json.dumps(ext.rope_scaling)}, context {ext.current} -> {ext.seq_length}")
