"""The training job's configuration: dataclasses filled from defaults, a preset, a TOML file, then flags.

A TOML file has one table per section, named as the dataclasses below::

    [model]
    preset = "tiny"          # a preset first, then single fields override it
    num_layers = 8

    [data]
    data_path = ["0.3", "data/a_text_document", "0.7", "data/b_text_document"]
    seq_length = 2048

    [optimizer]
    lr = 3e-4
    lr_decay_style = "cosine"

    [training]
    train_iters = 1000
    global_batch_size = 64

The same file, fully resolved, is saved as ``config.toml`` in every checkpoint.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from cookbook.checks import check_number, check_types
from cookbook.engine.attention import BACKENDS
from cookbook.engine.distributed import ParallelDims
from cookbook.engine.optim import OptimizerConfig
from cookbook.engine.precision import check_dtype
from cookbook.errors import CookbookError
from cookbook.model.config import ModelConfig, preset


@dataclass
class DataConfig:
    data_path: list[str] = field(default_factory=list)  # Megatron-LM's: [prefix] or [w1, prefix1, w2, prefix2, ...]
    split: str = "969,30,1"
    seq_length: int | None = None  # None = the model's max_seq_len
    tokenizer_model: str | None = None  # kept with the checkpoint for eval and generate
    tokenizer_type: str | None = None
    make_vocab_size_divisible_by: int = 128
    # samples packed from documents (Megatron-LM's flags, cookbook/data/gpt_dataset.py: document_inputs)
    reset_position_ids: bool = False  # positions restart after each end-of-document token
    reset_attention_mask: bool = False  # a token attends only within its document
    eod_mask_loss: bool = False  # no loss on predicting the token after an end-of-document token
    eod_id: int | None = None  # the end-of-document id for those flags (None: the tokenizer's)

    def __post_init__(self) -> None:
        check_types(self, "[data]")
        _positive(self, "seq_length", "make_vocab_size_divisible_by", allow_none=True)


@dataclass
class TrainingConfig:
    train_iters: int = 1000
    micro_batch_size: int = 1
    global_batch_size: int | None = None  # None = micro batch x data-parallel size (no accumulation)
    seed: int = 1234
    dtype: str = "auto"  # auto (cookbook/engine/precision.py), bf16 (fp32 master weights and gradient reduction) or fp32
    device: str = "auto"  # auto | cpu | cuda
    eval_interval: int = 1000  # 0 = never
    eval_iters: int = 10
    log_interval: int = 10  # the first iteration is logged too, within seconds of the start
    print_config: bool = False  # print the full resolved config at the start (a five-line summary otherwise)
    tensorboard_dir: str | None = None
    # memory and speed (Megatron-LM's names): recompute none | selective | full (uniform | block)
    recompute_granularity: str = "none"
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    compile: bool = False  # torch.compile each transformer block
    fp8: bool = False  # torchao float8 linear layers in the blocks (H100/H200)
    attention_backend: str = "auto"  # auto | sdpa | flex | flash (cookbook/engine/attention.py)
    # logit knowledge distillation: loss = (1 - kd_ratio) CE + kd_ratio KL(teacher || student) at kd_temperature
    kd_teacher: str | None = None  # a cookbook checkpoint with the student's vocabulary
    kd_ratio: float = 0.5
    kd_temperature: float = 1.0

    def __post_init__(self) -> None:
        check_types(self, "[training]")
        check_dtype(self.dtype)
        _positive(self, "train_iters", "micro_batch_size", "log_interval")
        _positive(self, "global_batch_size", allow_none=True)
        _positive(self, "eval_interval", "eval_iters", allow_zero=True)
        check_number("--kd-ratio", self.kd_ratio, low=0, high=1)
        check_number("--kd-temperature", self.kd_temperature, low=0, low_open=True)
        if self.attention_backend not in BACKENDS:
            raise CookbookError(f"unknown --attention-backend {self.attention_backend!r}; choose one of {', '.join(BACKENDS)}")


@dataclass
class CheckpointConfig:
    save: str | None = None
    load: str | None = None
    finetune: bool = False  # start a new run from --load's weights: fresh optimizer, step 0
    save_interval: int = 1000  # 0 = only at the end
    keep_last: int = 3  # 0 = keep every save

    def __post_init__(self) -> None:
        check_types(self, "[checkpoint]")
        _positive(self, "save_interval", "keep_last", allow_zero=True)


def _positive(cfg, *names: str, allow_zero: bool = False, allow_none: bool = False) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value is None and allow_none:
            continue
        if not isinstance(value, int) or value < (0 if allow_zero else 1):
            flag = "--" + name.replace("_", "-")
            raise CookbookError(f"{flag} must be {'a non-negative' if allow_zero else 'a positive'} integer, not {value!r}")


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "training": TrainingConfig,
    "checkpoint": CheckpointConfig,
    "parallel": ParallelDims,
}


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=lambda: preset("tiny"))
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelDims = field(default_factory=ParallelDims)

    def __post_init__(self) -> None:
        if self.data.seq_length is None:
            self.data.seq_length = self.model.max_seq_len
        _positive(self.data, "seq_length")

    def to_dict(self) -> dict:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}


def _check_fields(section: str, values: dict) -> None:
    names = {f.name for f in dataclasses.fields(SECTIONS[section])}
    unknown = sorted(set(values) - names - ({"preset"} if section == "model" else set()))
    if unknown:
        raise CookbookError(f"unknown [{section}] field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")


def build_config(sections: dict[str, dict]) -> JobConfig:
    """A JobConfig from ``{section: {field: value}}`` (a parsed TOML file, flags merged in)."""
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise CookbookError(f"unknown config section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    parts = {}
    for name, cls in SECTIONS.items():
        values = dict(sections.get(name) or {})
        _check_fields(name, values)
        try:
            if name == "model":
                parts[name] = preset(values.pop("preset", "tiny"), **values)
            else:
                parts[name] = cls(**values)
        except TypeError as e:
            raise CookbookError(f"bad [{name}] config: {e}") from e
    return JobConfig(**parts)


def merge(base: dict[str, dict], overrides: dict[str, dict]) -> dict[str, dict]:
    """Overrides win field by field; ``None`` means "not given"."""
    merged = {k: dict(v) for k, v in base.items()}
    for section, values in overrides.items():
        merged.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    return merged


def read_toml(path: str | Path) -> dict[str, dict]:
    path = Path(path)
    if not path.is_file():
        raise CookbookError(f"config file {path} does not exist")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise CookbookError(f"config file {path} is not valid TOML: {e}") from e


# --------------------------------------------------------------------------- writing TOML


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items() if x is not None) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dumps_toml(sections: dict[str, dict]) -> str:
    """Tables of scalars, lists and inline tables (None values are left out: TOML has no null)."""
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
        lines.append("")
    return "\n".join(lines)
