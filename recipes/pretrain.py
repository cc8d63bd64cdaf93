"""``cookbook pretrain``: resolve the job config (preset, TOML, flags, a checkpoint), then train.

``--load`` continues a run (model, optimizer, step, data position, RNG); the model's shape then
comes from the checkpoint. ``--finetune`` starts a new run from the checkpoint's weights. When
``--load`` and ``--save`` name the same folder and it holds no checkpoint yet, training starts from
scratch, so one command both starts and resumes a job (what a preemptible cluster needs).
"""

from __future__ import annotations

from pathlib import Path

from cookbook.data.tokenizer import load_tokenizer
from cookbook.engine import checkpoint
from cookbook.engine.config import JobConfig, build_config, dumps_toml, merge, read_toml
from cookbook.engine.distributed import shutdown
from cookbook.engine.trainer import Trainer
from cookbook.errors import CookbookError
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


def resolve(config_file: str | Path | None, overrides: dict[str, dict]) -> tuple[JobConfig, Path | None]:
    """The job config and the checkpoint to start from (None: from scratch)."""
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
    data = sections.setdefault("data", {})
    model = sections.setdefault("model", {})
    if ckpt is None and data.get("tokenizer_model") and "vocab_size" not in model:
        tokenizer = load_tokenizer(data["tokenizer_model"], data.get("tokenizer_type"))
        model["vocab_size"] = padded_vocab_size(tokenizer.vocab_size, data.get("make_vocab_size_divisible_by", 128))
    return build_config(sections), ckpt


def run(config_file: str | Path | None, overrides: dict[str, dict]) -> dict:
    job, ckpt = resolve(config_file, overrides)
    trainer = Trainer(job, load=ckpt)
    try:
        if trainer.dist.is_main:
            console.print(dumps_toml(job.to_dict()), highlight=False, markup=False)
            dp = trainer.dims.dp
            console.print(
                f"[bold]model[/bold] {describe(job.model)}  [bold]batch[/bold] {trainer.global_batch} = "
                f"{job.training.micro_batch_size} micro x {dp} data-parallel x {trainer.accumulation} accumulation  "
                f"[bold]sequence[/bold] {job.data.seq_length}  [bold]device[/bold] {trainer.device.type} x {trainer.dist.world_size}"
            )
        if trainer.step >= job.training.train_iters:
            if trainer.dist.is_main:
                console.print(f"already trained {trainer.step} of {job.training.train_iters} iterations; nothing to do")
            return {}
        return trainer.train()
    finally:
        shutdown()
