"""``cookbook prune``: structured pruning of a checkpoint to any smaller Llama shape, then healing.

    1. check everything that can be checked without weights: the target shape against the source (and tensor
       parallel), the importance methods, calibration and eval data (their token ids against the vocabulary),
       the healing job's config, the --save folder
    2. load the source (a save of any parallel layout: ``cookbook.inference.load.load_model`` gives a plain model)
    3. perplexity on --eval-data before
    4. score: one forward pass over the calibration samples with hooks (activation importance, block influence),
       or weights only (magnitude), or a seeded draw (random); layers by block influence, by loss on removal, or
       given with --drop-layer-ids
    5. keep the best units (pruner.slicing.select) and slice every tensor they appear in (pruner.slicing)
    6. perplexity after; save a normal cookbook checkpoint and ``prune_report.json``
    7. with --heal-steps N: train the pruned model N iterations with the shared Trainer (``cookbook pretrain
       --load PRUNED --finetune``), distilling from the unpruned model (--kd-teacher, default the source; --no-kd
       to heal with cross-entropy alone); perplexity after healing

Outputs: without healing ``--save OUT`` is the pruned checkpoint. With healing, ``OUT/pruned`` is the one-shot
pruned checkpoint and ``OUT`` the healing run (saves, metrics.jsonl); the same command run again continues the
healing. ``OUT/prune_report.json`` holds parameter counts, what was removed and the perplexities either way.

Pruning runs in one process (one GPU or the CPU). To heal on many GPUs, prune without --heal-steps, then
``torchrun ... -m cookbook pretrain --load OUT --finetune --kd-teacher SOURCE ...``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.table import Table

from cookbook.data.indexed import dataset_prefix
from cookbook.engine import checkpoint, job
from cookbook.engine.checkpoint import model_sections
from cookbook.engine.config import build_config
from cookbook.errors import CookbookError
from cookbook.fileio import write_text_atomic
from cookbook.model.config import ModelConfig
from cookbook.progress import Tally, console
from pruner.importance import (
    Scores,
    calibrate,
    check_method,
    layer_removal_importance,
    layers_to_drop,
    magnitude_scores,
    random_scores,
)
from pruner.slicing import keep_all, prune_model, select
from pruner.spec import PruneSpec, target_config

REPORT = "prune_report.json"
PRUNED = "pruned"


@dataclass
class PruneConfig:
    spec: PruneSpec = field(default_factory=PruneSpec)
    importance: str = "activation"  # activation | magnitude | random
    layer_importance: str = "block-influence"  # block-influence | ppl (used when --drop-layers N chooses layers)
    calib_data: str | None = None  # an indexed dataset prefix
    calib_samples: int = 1024
    calib_seq_length: int | None = None  # default: --seq-length, else the model's context
    batch_size: int = 8  # samples per forward in calibration and evaluation
    eval_data: list[str] = field(default_factory=list)  # indexed prefixes or jsonl files
    eval_seq_length: int | None = None
    heal_steps: int = 0
    kd: bool = True  # heal with the unpruned model as --kd-teacher (unless another is given)

    def settings(self, source: Path, seed: int) -> dict:
        """What decides the pruned weights (a rerun must match them to reuse the pruned checkpoint)."""
        keys = ("importance", "layer_importance", "calib_data", "calib_samples", "calib_seq_length")
        return {
            "load": str(source.resolve()),
            "spec": self.spec.to_dict(),
            "seed": seed,
            **{k: getattr(self, k) for k in keys},
        }


# --------------------------------------------------------------------------- checks before any work


def _prunes_width(src: ModelConfig, target: ModelConfig) -> bool:
    return _shape(src) | {"num_layers": 0} != _shape(target) | {"num_layers": 0}


def _needs_calibration(opts: PruneConfig, src: ModelConfig, target: ModelConfig) -> bool:
    """Activation scores (when a width shrinks) and layer importance (when --drop-layers N) need forward passes."""
    return (opts.importance == "activation" and _prunes_width(src, target)) or (opts.spec.drop_layers or 0) > 0


def _check_options(opts: PruneConfig, sections: dict, src: ModelConfig, target: ModelConfig) -> None:
    check_method(opts.importance, opts.layer_importance)
    if _needs_calibration(opts, src, target) and not opts.calib_data:
        why = "--importance activation" if opts.importance == "activation" else f"--drop-layers {opts.spec.drop_layers}"
        raise CookbookError(
            f"{why} needs calibration data: pass --calib-data PREFIX (an indexed dataset made with the model's tokenizer)"
        )
    if not isinstance(opts.batch_size, int) or opts.batch_size < 1:
        raise CookbookError(f"--calib-batch-size must be a positive number of samples, not {opts.batch_size!r}")
    if not isinstance(opts.heal_steps, int) or opts.heal_steps < 0:
        raise CookbookError(f"--heal-steps must be a non-negative number of iterations, not {opts.heal_steps!r}")
    training = sections.get("training", {})
    if "train_iters" in training:
        raise CookbookError("cookbook prune heals for --heal-steps iterations; drop --train-iters")
    if not opts.kd and training.get("kd_teacher"):
        raise CookbookError("--no-kd heals without a teacher, yet --kd-teacher is given; drop one of them")


def _eval_streams(opts: PruneConfig, src_sections: dict, sections: dict, vocab_size: int) -> dict[str, torch.Tensor]:
    """Every --eval-data source as a token stream: an indexed dataset's tokens, or a jsonl file tokenized with the
    model's tokenizer, each document ending with EOD (as ``preprocess --append-eod`` writes it)."""
    from cookbook.inference.perplexity import file_stream, indexed_stream

    streams = {}
    for source in opts.eval_data:
        path = Path(source)
        if path.suffix in (".jsonl", ".gz") or path.is_file():
            if not path.is_file():
                raise CookbookError(f"--eval-data {source} does not exist")
            from cookbook.data.tokenizer import load_tokenizer

            data = {
                **src_sections.get("data", {}),
                **{k: v for k, v in sections.get("data", {}).items() if v is not None},
            }
            if not data.get("tokenizer_model"):
                raise CookbookError(
                    f"--eval-data {source} is text, and the checkpoint names no tokenizer; pass --tokenizer-model"
                )
            tokenizer = load_tokenizer(data["tokenizer_model"], data.get("tokenizer_type"))
            streams[source] = file_stream(path, tokenizer, append_eod=True)
        else:
            try:
                streams[source] = indexed_stream(source)
            except CookbookError as e:
                raise CookbookError(f"--eval-data: {e}") from None
        top = int(streams[source].max())
        if top >= vocab_size:
            raise CookbookError(
                f"--eval-data {source} holds token id {top} but the model's vocabulary has {vocab_size} ids"
            )
    return streams


def heal_job(
    config_file, flags: dict, opts: PruneConfig, teacher: str, save: Path, stand_in: ModelConfig | None = None
) -> job.Job:
    """The healing run: the pruned weights (``SAVE/pruned``; the run in SAVE when the same command runs again) trained
    ``--heal-steps`` iterations, distilling from ``teacher`` (the unpruned model) unless --no-kd, or --kd-teacher
    names another. ``stand_in``: the pruned model's config, to check the job before the pruned weights exist."""
    heal = {
        **flags,
        "model": {k: v for k, v in flags.get("model", {}).items() if k != "preset"},
        "checkpoint": {**flags.get("checkpoint", {}), "load": str(save / PRUNED), "save": str(save)},
    }
    j = job.resolve(config_file, heal, continue_in_save="the healing", stand_in=stand_in)
    t = j.config.training
    kd_teacher = t.kd_teacher or (teacher if opts.kd else None)
    return j.replace(
        dataclasses.replace(
            j.config, training=dataclasses.replace(t, train_iters=opts.heal_steps, kd_teacher=kd_teacher)
        )
    )


def _check_heal(config_file, flags: dict, opts: PruneConfig, source: str, save: Path, target: ModelConfig) -> None:
    """The healing job built as it will be (with the pruned shape), so a bad flag fails before the prune."""
    from cookbook.data.loader import parse_data_path
    from cookbook.engine.trainer import check_layout

    if not job.read_sections(config_file, flags).get("data", {}).get("data_path"):
        raise CookbookError("--heal-steps trains the pruned model: pass --data-path PREFIX (the healing data)")
    cfg = heal_job(config_file, flags, opts, source, save, stand_in=target).config
    parse_data_path(cfg.data.data_path)
    check_layout(cfg, cfg.parallel.resolve(1))


# --------------------------------------------------------------------------- the work


def _precision(model, dtype: str):
    """Forwards in bf16 (weights stay fp32) when --dtype bf16, as the Trainer runs them."""
    device = next(model.parameters()).device
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


def _perplexity(
    model, streams: dict[str, torch.Tensor], seq_length: int, batch_size: int, dtype: str
) -> dict[str, float]:
    from cookbook.inference.perplexity import evaluate

    if not streams:
        return {}
    device = next(model.parameters()).device
    with _precision(model, dtype):
        results = evaluate(model, streams, [seq_length], None, batch_size, device, show_progress=True)
    return {r.name: r.ppl for r in results}


def _scores(
    model, opts: PruneConfig, samples: torch.Tensor | None, seed: int, width: bool
) -> tuple[Scores | None, torch.Tensor | None, dict]:
    """Width scores (None when no width shrinks), layer importance (None when no layer is chosen by importance),
    and calibration facts."""
    spec, facts = opts.spec, {}
    by_importance = (spec.drop_layers or 0) > 0
    activation = width and opts.importance == "activation"
    cal = None
    if activation or by_importance:
        if samples is None:
            raise CookbookError("calibration samples are needed for activation importance and --drop-layers N")
        start = time.perf_counter()
        with Tally("calibration", samples.shape[0], "samples") as tally:
            cal = calibrate(
                model,
                samples,
                opts.batch_size,
                activation=activation,
                block_influence=by_importance and opts.layer_importance == "block-influence",
                on_batch=tally.advance,
            )
        facts = {
            "samples": samples.shape[0],
            "seq_length": samples.shape[1] - 1,
            "tokens": cal.tokens,
            "loss": cal.loss,
            "seconds": round(time.perf_counter() - start, 2),
        }
    if not width:
        scores = None
    elif activation:
        scores = cal.scores
    elif opts.importance == "magnitude":
        scores = magnitude_scores(model)
    else:
        scores = random_scores(model, seed)
    layer_scores = None
    if by_importance:
        if opts.layer_importance == "block-influence":
            layer_scores = cal.block_influence
        else:
            with Tally(
                "layer importance (each layer removed)", samples.shape[0] * len(model.layers), "samples"
            ) as tally:
                layer_scores = layer_removal_importance(
                    model, samples, opts.batch_size, base_loss=cal.loss, on_batch=tally.advance
                )
        facts["layer_importance"] = [round(float(v), 6) for v in layer_scores]
    return scores, layer_scores, facts


def prune(model, opts: PruneConfig, samples: torch.Tensor | None = None, seed: int = 1234):
    """(pruned model, what was removed, calibration facts) for an in-process ``model`` and ``opts.spec``, with
    calibration ``samples`` [n, seq + 1] where the methods need them: the library entry point."""
    src, spec = model.config, opts.spec
    target = target_config(src, spec)
    width = _prunes_width(src, target)
    scores, layer_scores, facts = _scores(model, opts, samples, seed, width)
    if spec.drop_layer_ids:
        dropped = sorted(spec.drop_layer_ids)
    elif layer_scores is not None:
        dropped = layers_to_drop(layer_scores, spec.drop_layers)
    else:
        dropped = []
    kept = [i for i in range(src.num_layers) if i not in dropped]
    if width:
        selection = select(src, target, scores, kept)
    else:  # layers only: every kept layer whole
        selection = keep_all(src)
        selection.layers = kept
    return prune_model(model, target, selection), selection.summary(src), facts


def _read_report(save: Path) -> dict | None:
    path = save / REPORT
    return json.loads(path.read_text()) if path.is_file() else None


def _write_report(save: Path, report: dict) -> Path:
    return write_text_atomic(save / REPORT, json.dumps(report, indent=1) + "\n")


def run(config_file, overrides: dict[str, dict], opts: PruneConfig) -> dict:
    """Prune (and heal); returns the report written to ``--save/prune_report.json``."""
    from cookbook.engine.checkpoint import model_format
    from cookbook.engine.distributed import pick_device
    from cookbook.engine.precision import announce, choose_dtype
    from cookbook.inference.load import load_model
    from pruner.calib import calibration_samples
    from pruner.save import param_count, write_checkpoint

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CookbookError(
            "cookbook prune runs in one process; to heal on many GPUs, prune without --heal-steps, then "
            "torchrun ... -m cookbook pretrain --load PRUNED --finetune --kd-teacher SOURCE"
        )
    sections = job.read_sections(config_file, overrides)
    ck = sections.get("checkpoint", {})
    if not ck.get("load"):
        raise CookbookError("cookbook prune needs --load: the checkpoint to prune")
    if not ck.get("save"):
        raise CookbookError("cookbook prune needs --save: the folder for the pruned model")
    form = model_format(ck["load"])  # a cookbook save or a Hugging Face folder; a missing one is named first
    source = checkpoint.find_checkpoint(ck["load"]) if form == "cookbook" else Path(ck["load"])
    save = Path(ck["save"])
    src_sections = model_sections(source)
    src = build_config({"model": src_sections["model"]}).model
    target = target_config(src, opts.spec, sections.get("parallel", {}).get("tp") or 1)
    _check_options(opts, sections, src, target)
    training = sections.get("training", {})
    seed, device = training.get("seed", 1234), training.get("device", "auto")
    asked = training.get("dtype", "auto")
    dtype, why = choose_dtype(asked, pick_device(device, 0))  # of the forwards; the weights stay fp32
    heal = opts.heal_steps > 0
    if heal:
        _check_heal(config_file, overrides, opts, str(source), save, target)
    pruned_dir = save / PRUNED if heal else save
    settings = opts.settings(source, seed)

    # the --save folder: new, or this command's own earlier run (heal again from where it stopped)
    report = _read_report(save)
    reuse = checkpoint.find_checkpoint(pruned_dir) is not None if heal else False
    if reuse and report is None:
        raise CookbookError(
            f"--save {save} holds a pruned model but no {REPORT} (a run stopped while saving); choose another --save"
        )
    if reuse and report.get("settings") != settings:
        raise CookbookError(f"--save {save} holds a pruned model made with other settings; choose another --save")
    if (save / "latest").is_file() and not reuse:
        raise CookbookError(f"--save {save} already holds a run; choose another --save")

    seq = sections.get("data", {}).get("seq_length") or src.max_seq_len
    samples = None
    if opts.calib_data and not reuse:  # given: checked (token ids) even where the methods chosen need no forward
        samples = calibration_samples(opts.calib_data, opts.calib_samples, opts.calib_seq_length or seq, src.vocab_size)
    streams = _eval_streams(opts, src_sections, sections, src.vocab_size)
    eval_seq = opts.eval_seq_length or seq
    # ------------------------------------------------------------ checks done: the work
    if not reuse:
        report = {"source": str(source), "settings": settings}
        start = time.perf_counter()
        model, _ = load_model(source, device, "fp32")
        announce(asked, dtype, why)  # once the weights have loaded: a damaged checkpoint is its one line
        report["params"] = {
            "before": src.num_params(),
            "after": target.num_params(),
            "before_non_embedding": src.num_params(embeddings=False),
            "after_non_embedding": target.num_params(embeddings=False),
        }
        report["shape"] = {"before": _shape(src), "after": _shape(target)}
        ppl = {
            name: {"before": value}
            for name, value in _perplexity(model, streams, eval_seq, opts.batch_size, dtype).items()
        }
        with _precision(model, dtype):
            pruned, removed, facts = prune(model, opts, samples, seed)
        del model
        if param_count(pruned) != target.num_params():
            raise CookbookError(
                f"internal error: the pruned model has {param_count(pruned)} parameters, its config {target.num_params()}"
            )
        report["removed"], report["calibration"] = removed, facts
        for name, value in _perplexity(pruned, streams, eval_seq, opts.batch_size, dtype).items():
            ppl[name]["pruned"] = value
        report["perplexity"] = {"seq_length": eval_seq, "data": ppl}  # before and after, per --eval-data source
        path = write_checkpoint(pruned_dir, pruned, src_sections, {"pruned_from": str(source)})
        del pruned
        report["pruned_checkpoint"] = str(path)
        report["seconds"] = round(time.perf_counter() - start, 2)
        _write_report(save, report)
        console.print(f"[green]saved[/green] the pruned model to {path}")
    else:
        console.print(f"reusing the pruned model in {pruned_dir} (same settings)")

    if heal:  # a Hugging Face source teaches as the cookbook save it converts to
        teacher = source if form == "cookbook" else job.convert_hf(source, save / job.HF_SOURCE)
        j = heal_job(config_file, overrides, opts, str(teacher), save)
        job.run(j, "--heal-steps")
        healed, _ = load_model(save, device, "fp32")
        for name, value in _perplexity(healed, streams, eval_seq, opts.batch_size, dtype).items():
            report["perplexity"]["data"].setdefault(name, {})["healed"] = value
        report["healed_checkpoint"] = str(checkpoint.find_checkpoint(save))
        report["heal"] = {"steps": opts.heal_steps, "kd_teacher": j.config.training.kd_teacher}
        _write_report(save, report)
    return report


def _shape(cfg: ModelConfig) -> dict:
    return {
        "num_layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_heads": cfg.num_heads,
        "num_kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
    }


# --------------------------------------------------------------------------- dry run and output


def dry_run(config_file, overrides: dict[str, dict], opts: PruneConfig) -> dict:
    """Validate a prune without weights: the source from --load if it is here, else from --preset (and model flags).
    Returns {"before": shape, "after": shape, "params": ...}."""
    from pruner.calib import calibration_samples

    sections = job.read_sections(config_file, overrides)
    load = sections.get("checkpoint", {}).get("load")
    source = load if load and Path(load).exists() else None
    if source is not None:
        src = build_config({"model": model_sections(source)["model"]}).model
    elif sections.get("model", {}).get("preset"):
        src = build_config({"model": sections["model"]}).model
        where = f"--load {load} is not here" if load else "no --load"
        console.print(f"[yellow]{where}: checking with preset {sections['model']['preset']}[/yellow]")
    else:
        raise CookbookError(
            f"--load {load} holds no checkpoint here; give --preset for its model to check the prune without it"
        )
    target = target_config(src, opts.spec, sections.get("parallel", {}).get("tp") or 1)
    _check_options(opts, sections, src, target)
    seq = sections.get("data", {}).get("seq_length") or src.max_seq_len
    if opts.calib_data:
        prefix = dataset_prefix(opts.calib_data)
        if Path(prefix + ".idx").is_file():
            calibration_samples(prefix, opts.calib_samples, opts.calib_seq_length or seq, src.vocab_size)
        else:
            console.print(f"[yellow]--calib-data {opts.calib_data} is not here (needed where the prune runs)[/yellow]")
    params = {"before": src.num_params(), "after": target.num_params()}
    console.print(
        f"[green]dry run: the prune is valid: {params['before'] / 1e9:.2f}B -> {params['after'] / 1e9:.2f}B "
        f"parameters ({100 * params['after'] / params['before']:.1f}%)[/green]"
    )
    return {"before": _shape(src), "after": _shape(target), "params": params}


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def render_shapes(result: dict) -> Table:
    table = Table(title="prune", title_justify="left")
    table.add_column("")
    table.add_column("source", justify="right")
    table.add_column("pruned", justify="right", style="bold")
    for key in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim"):
        table.add_row(key, f"{result['before'][key]:,}", f"{result['after'][key]:,}")
    p = result["params"]
    table.add_row(
        "parameters", _fmt_params(p["before"]), f"{_fmt_params(p['after'])} ({100 * p['after'] / p['before']:.1f}%)"
    )
    return table


def render(report: dict) -> list[Table]:
    """The report's shapes and parameters, what was removed, and the perplexities."""
    tables = [
        render_shapes(
            {"before": report["shape"]["before"], "after": report["shape"]["after"], "params": report["params"]}
        )
    ]
    removed = report["removed"]
    t = Table(title="removed", show_header=False, title_justify="left")
    dropped = removed["dropped_layers"]
    t.add_row(
        "layers",
        f"{len(dropped)}"
        + (
            f" (layer {', '.join(map(str, dropped))})"
            if len(dropped) == 1
            else f" (layers {', '.join(map(str, dropped))})"
            if dropped
            else ""
        ),
    )
    t.add_row("hidden channels", f"{removed['hidden_channels_removed']:,}")
    heads = sum(len(v) for v in removed["heads_removed"].values())
    groups = sum(len(v) for v in removed["query_groups_removed"].values())
    t.add_row("query heads (all kept layers)", f"{heads:,}")
    t.add_row("query groups (all kept layers)", f"{groups:,}")
    t.add_row("SwiGLU neurons (all kept layers)", f"{sum(removed['neurons_removed_per_layer'].values()):,}")
    tables.append(t)
    data = report.get("perplexity", {}).get("data") or {}
    if data:
        p = Table(title=f"perplexity @ {report['perplexity']['seq_length']} tokens", title_justify="left")
        p.add_column("data")
        for col in ("before", "pruned", "healed"):
            p.add_column(col, justify="right")
        for name, v in data.items():
            p.add_row(
                name,
                *(
                    f"{v[c]:.3f}" if c in v and math.isfinite(v[c]) else ("inf" if c in v else "")
                    for c in ("before", "pruned", "healed")
                ),
            )
        tables.append(p)
    return tables


__all__ = ["PruneConfig", "prune", "run", "dry_run", "render", "render_shapes", "REPORT", "PRUNED"]
