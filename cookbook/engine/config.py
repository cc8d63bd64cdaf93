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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import tomllib

from cookbook.checks import check_number, check_types
from cookbook.errors import CookbookError
from cookbook.flags import flag
from cookbook.model.config import ModelConfig, preset

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

# These dataclasses import no torch, so that a training command's --help (its flags are their fields) starts fast.
BACKENDS = ("auto", "sdpa", "flex", "flash")  # the attention kernels (cookbook/engine/attention.py)
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")  # the DeviceMesh's dims, outermost first
DTYPE_NAMES = ("bf16", "fp32")  # what --dtype computes in, besides auto (cookbook/engine/precision.py)


def check_dtype(dtype: str, flag: str = "--dtype") -> None:
    if dtype not in ("auto", *DTYPE_NAMES):
        hint = (
            " (fp16 needs loss scaling in training, which bf16 makes unnecessary; a GPU without bf16 runs fp32)"
            if dtype == "fp16"
            else ""
        )
        raise CookbookError(f"unknown {flag} {dtype!r}; use auto, bf16 or fp32{hint}")


@dataclass
class OptimizerConfig:
    lr: float = field(default=3e-4, metadata=flag("--lr", help="Peak learning rate.", panel="Optimizer"))
    min_lr: float = field(
        default=0.0, metadata=flag("--min-lr", help="Learning rate at the end of decay.", panel="Optimizer")
    )
    lr_warmup_iters: int = field(
        default=0, metadata=flag("--lr-warmup-iters", help="Linear warmup iterations.", panel="Optimizer")
    )
    lr_warmup_fraction: float | None = field(
        default=None,
        metadata=flag("--lr-warmup-fraction", help="Warmup as a fraction of the decay iterations.", panel="Optimizer"),
    )
    lr_warmup_init: float = field(
        default=0.0, metadata=flag("--lr-warmup-init", help="Learning rate at the start of warmup.", panel="Optimizer")
    )
    lr_decay_style: str = field(
        default="cosine",
        metadata=flag(
            "--lr-decay-style", help="constant, linear, cosine, inverse-square-root or WSD.", panel="Optimizer"
        ),
    )
    lr_decay_iters: int | None = field(
        default=None,
        metadata=flag("--lr-decay-iters", help="Iterations to decay over (default: --train-iters).", panel="Optimizer"),
    )
    lr_wsd_decay_style: str = field(
        default="exponential",
        metadata=flag(
            "--lr-wsd-decay-style",
            help="WSD's final decay: linear, cosine, exponential, minus_sqrt.",
            panel="Optimizer",
        ),
    )
    lr_wsd_decay_iters: int | None = field(
        default=None, metadata=flag("--lr-wsd-decay-iters", help="WSD's final decay iterations.", panel="Optimizer")
    )
    weight_decay: float = field(
        default=0.01,
        metadata=flag("--weight-decay", help="AdamW weight decay (not on norms and biases).", panel="Optimizer"),
    )
    adam_beta1: float = field(default=0.9, metadata=flag("--adam-beta1", help="AdamW beta1.", panel="Optimizer"))
    adam_beta2: float = field(default=0.999, metadata=flag("--adam-beta2", help="AdamW beta2.", panel="Optimizer"))
    adam_eps: float = field(default=1e-8, metadata=flag("--adam-eps", help="AdamW epsilon.", panel="Optimizer"))
    clip_grad: float = field(
        default=1.0,
        metadata=flag("--clip-grad", help="Clip the global gradient norm to this (0: off).", panel="Optimizer"),
    )

    def __post_init__(self) -> None:
        check_types(self, "[optimizer]")
        for name in ("lr", "min_lr", "lr_warmup_init", "weight_decay", "clip_grad"):
            check_number("--" + name.replace("_", "-"), getattr(self, name), low=0)
        check_number("--lr-warmup-fraction", self.lr_warmup_fraction, low=0, high=1)
        check_number("--adam-beta1", self.adam_beta1, low=0, high=1, high_open=True)
        check_number("--adam-beta2", self.adam_beta2, low=0, high=1, high_open=True)
        check_number("--adam-eps", self.adam_eps, low=0, low_open=True)


@dataclass
class ParallelDims:
    """Degrees of each kind of parallelism; their product is the world size.

    ``dp_shard = -1`` takes whatever the other degrees leave. Data parallel is FSDP2 over
    ``dp_shard`` (ZeRO-3: parameters, gradients and optimizer state sharded), replicated over
    ``dp_replicate`` (HSDP). Tensor parallel (Megatron-LM's, ``tp`` ranks splitting every matmul)
    shares the mesh with it; ``sequence_parallel`` adds Megatron-LM's sequence parallel to it (norms
    and residuals sharded along the sequence between the tensor-parallel regions), and, as in
    Megatron-LM, means nothing at ``tp = 1``. Pipeline parallel cuts the blocks into ``pp`` stages
    (``pp x virtual_stages`` with interleaved 1F1B: ``layers_per_virtual_stage`` is Megatron-LM's
    ``--num-layers-per-virtual-pipeline-stage``). Context parallel splits each sequence over ``cp``
    ranks; FSDP shards over ``dp_shard`` and ``cp`` together.

    Ranks are laid out ``pp`` outermost, ``tp`` innermost: the ``tp`` ranks of one group are
    consecutive (one node's fast links), and all of them see the same data.
    """

    dp_replicate: int = field(
        default=1,
        metadata=flag(
            "--data-parallel-replicate-size",
            help="HSDP: replicas of the sharded model (default 1).",
            panel="Parallelism",
        ),
    )
    dp_shard: int = -1
    cp: int = field(
        default=1, metadata=flag("--context-parallel-size", help="Context-parallel degree.", panel="Parallelism")
    )
    tp: int = field(
        default=1, metadata=flag("--tensor-model-parallel-size", help="Tensor-parallel degree.", panel="Parallelism")
    )
    pp: int = field(
        default=1,
        metadata=flag(
            "--pipeline-model-parallel-size", help="Pipeline-parallel degree (1F1B schedule).", panel="Parallelism"
        ),
    )
    sequence_parallel: bool = field(
        default=False,
        metadata=flag(
            "--sequence-parallel/--no-sequence-parallel",
            help="Shard norms and residuals by sequence across the tensor-parallel ranks.",
            panel="Parallelism",
        ),
    )
    layers_per_virtual_stage: int | None = field(  # interleaved 1F1B when set (pp > 1)
        default=None,
        metadata=flag(
            "--num-layers-per-virtual-pipeline-stage",
            help="Interleaved 1F1B: layers per virtual stage (each rank holds several).",
            panel="Parallelism",
        ),
    )

    def __post_init__(self) -> None:
        check_types(self, "[parallel]")

    def resolve(self, world_size: int) -> ParallelDims:
        fixed = self.dp_replicate * self.cp * self.tp * self.pp
        for name in ("dp_replicate", "cp", "tp", "pp"):
            if getattr(self, name) < 1:
                raise CookbookError(f"parallel degree {name}={getattr(self, name)} must be at least 1")
        dp_shard = self.dp_shard
        if dp_shard == -1:
            if world_size % fixed:
                raise CookbookError(
                    f"world size {world_size} is not divisible by pp x dp_replicate x cp x tp = {fixed}"
                )
            dp_shard = world_size // fixed
        if dp_shard < 1 or fixed * dp_shard != world_size:
            raise CookbookError(
                f"parallel degrees pp={self.pp} dp_replicate={self.dp_replicate} dp_shard={dp_shard} cp={self.cp} "
                f"tp={self.tp} multiply to {fixed * max(dp_shard, 0)}, not the world size {world_size}"
            )
        if self.layers_per_virtual_stage is not None and self.layers_per_virtual_stage < 1:
            raise CookbookError(
                f"--num-layers-per-virtual-pipeline-stage {self.layers_per_virtual_stage} must be at least 1"
            )
        return ParallelDims(
            self.dp_replicate,
            dp_shard,
            self.cp,
            self.tp,
            self.pp,
            self.sequence_parallel and self.tp > 1,
            self.layers_per_virtual_stage if self.pp > 1 else None,
        )

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def build_mesh(self, device_type: str) -> DeviceMesh:
        from torch.distributed.device_mesh import init_device_mesh

        shape = tuple(getattr(self, name) for name in MESH_DIMS)
        return init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)


@dataclass
class DataConfig:
    data_path: list[str] = field(  # Megatron-LM's: [prefix] or [w1, prefix1, w2, prefix2, ...]
        default_factory=list,
        metadata=flag("--data-path", help="PREFIX, or weight-prefix pairs: --data-path 0.3 A 0.7 B.", panel="Data"),
    )
    split: str = field(
        default="969,30,1",
        metadata=flag("--split", help="Train/valid/test split of each dataset, e.g. 969,30,1.", panel="Data"),
    )
    seq_length: int | None = field(  # None = the model's max_seq_len
        default=None, metadata=flag("--seq-length", help="Tokens per sample.", panel="Data")
    )
    tokenizer_model: str | None = field(
        default=None,
        metadata=flag(
            "--tokenizer-model",
            "--tokenizer",
            help="The tokenizer the data was made with (kept with checkpoints).",
            panel="Data",
        ),
    )
    tokenizer_type: str | None = field(
        default=None,
        metadata=flag("--tokenizer-type", help="Megatron-LM tokenizer type (default: from the file).", panel="Data"),
    )
    make_vocab_size_divisible_by: int = field(
        default=128,
        metadata=flag(
            "--make-vocab-size-divisible-by", help="Pad the tokenizer's vocabulary to a multiple of this.", panel="Data"
        ),
    )
    # samples packed from documents (Megatron-LM's flags, cookbook/data/gpt_dataset.py: document_inputs)
    reset_position_ids: bool = field(
        default=False,
        metadata=flag(
            "--reset-position-ids/--no-reset-position-ids",
            help="Packed documents: positions restart after each end-of-document token.",
            panel="Data",
        ),
    )
    reset_attention_mask: bool = field(
        default=False,
        metadata=flag(
            "--reset-attention-mask/--no-reset-attention-mask",
            help="Packed documents: a token attends only within its own document.",
            panel="Data",
        ),
    )
    eod_mask_loss: bool = field(
        default=False,
        metadata=flag(
            "--eod-mask-loss/--no-eod-mask-loss",
            help="Packed documents: no loss on predicting the token after an end-of-document token.",
            panel="Data",
        ),
    )
    eod_id: int | None = field(
        default=None,
        metadata=flag(
            "--eod-id",
            help="The end-of-document token id for the three flags above (default: the tokenizer's).",
            panel="Data",
        ),
    )

    def __post_init__(self) -> None:
        check_types(self, "[data]")
        _positive(self, "seq_length", "make_vocab_size_divisible_by", allow_none=True)


@dataclass
class TrainingConfig:
    train_iters: int = field(
        default=1000, metadata=flag("--train-iters", help="Iterations (optimizer steps) to train to.", panel="Training")
    )
    micro_batch_size: int = field(
        default=1,
        metadata=flag("--micro-batch-size", help="Samples per forward/backward on each rank.", panel="Training"),
    )
    global_batch_size: int | None = field(  # None = micro batch x data-parallel size (no accumulation)
        default=None,
        metadata=flag(
            "--global-batch-size",
            help="Samples per iteration (micro x data-parallel x accumulation).",
            panel="Training",
        ),
    )
    seed: int = field(
        default=1234, metadata=flag("--seed", help="Seed of the initialisation and the data shuffle.", panel="Training")
    )
    dtype: str = field(  # auto: cookbook/engine/precision.py; bf16: fp32 master weights and gradient reduction
        default="auto",
        metadata=flag(
            "--dtype",
            help="auto (bf16 where the device computes it natively, else fp32), bf16 or fp32; bf16 keeps fp32 master "
            "weights (default auto).",
            panel="Training",
        ),
    )
    device: str = field(default="auto", metadata=flag("--device", help="auto, cpu or cuda.", panel="Training"))
    eval_interval: int = field(
        default=1000,
        metadata=flag(
            "--eval-interval", help="Evaluate on the valid split every N iterations (0: never).", panel="Training"
        ),
    )
    eval_iters: int = field(
        default=10, metadata=flag("--eval-iters", help="Global batches per evaluation.", panel="Training")
    )
    log_interval: int = field(  # the first iteration is logged too, within seconds of the start
        default=10, metadata=flag("--log-interval", help="Log every N iterations (and the first).", panel="Training")
    )
    print_config: bool = field(
        default=False,
        metadata=flag(
            "--print-config", help="Print the full resolved config at the start, not only a summary.", panel="Training"
        ),
    )
    tensorboard_dir: str | None = field(
        default=None, metadata=flag("--tensorboard-dir", help="Also write TensorBoard events here.", panel="Training")
    )
    # memory and speed (Megatron-LM's names): recompute none | selective | full (uniform | block)
    recompute_granularity: str = field(
        default="none",
        metadata=flag(
            "--recompute-granularity", help="Activation recompute: none, selective or full.", panel="Training"
        ),
    )
    recompute_method: str | None = field(
        default=None, metadata=flag("--recompute-method", help="With full: uniform or block.", panel="Training")
    )
    recompute_num_layers: int | None = field(
        default=None,
        metadata=flag(
            "--recompute-num-layers",
            help="With full: layers per recompute unit (uniform) or recomputed layers (block).",
            panel="Training",
        ),
    )
    compile: bool = field(
        default=False,
        metadata=flag("--compile/--no-compile", help="torch.compile each transformer block.", panel="Training"),
    )
    fp8: bool = field(
        default=False,
        metadata=flag(
            "--fp8/--no-fp8",
            help="FP8 matmuls in the blocks via torchao (H100/H200; pip install 'cookbook[fp8]').",
            panel="Training",
        ),
    )
    attention_backend: str = field(
        default="auto",
        metadata=flag(
            "--attention-backend",
            help="auto, sdpa, flex or flash (flash-attn varlen: pip install 'cookbook[gpu]').",
            panel="Training",
        ),
    )
    # logit knowledge distillation: loss = (1 - kd_ratio) CE + kd_ratio KL(teacher || student) at kd_temperature
    kd_teacher: str | None = field(
        default=None,
        metadata=flag(
            "--kd-teacher",
            help="Distil from this cookbook checkpoint (same vocabulary): add its logits' KL to the loss.",
            panel="Training",
        ),
    )
    kd_ratio: float = field(
        default=0.5,
        metadata=flag(
            "--kd-ratio",
            help="With --kd-teacher: loss = (1 - r) CE + r KL(teacher || student) (default 0.5).",
            panel="Training",
        ),
    )
    kd_temperature: float = field(
        default=1.0,
        metadata=flag(
            "--kd-temperature",
            help="With --kd-teacher: softmax temperature of both distributions (default 1).",
            panel="Training",
        ),
    )

    def __post_init__(self) -> None:
        check_types(self, "[training]")
        check_dtype(self.dtype)
        _positive(self, "train_iters", "micro_batch_size", "log_interval")
        _positive(self, "global_batch_size", allow_none=True)
        _positive(self, "eval_interval", "eval_iters", allow_zero=True)
        check_number("--kd-ratio", self.kd_ratio, low=0, high=1)
        check_number("--kd-temperature", self.kd_temperature, low=0, low_open=True)
        if self.attention_backend not in BACKENDS:
            raise CookbookError(
                f"unknown --attention-backend {self.attention_backend!r}; choose one of {', '.join(BACKENDS)}"
            )


@dataclass
class CheckpointConfig:
    save: str | None = field(
        default=None, metadata=flag("--save", help="Folder for checkpoints and metrics.jsonl.", panel="Checkpoints")
    )
    load: str | None = field(
        default=None,
        metadata=flag(
            "--load", help="Continue from this checkpoint (a save folder or one step_* directory).", panel="Checkpoints"
        ),
    )
    finetune: bool = field(
        default=False,
        metadata=flag(
            "--finetune/--no-finetune",
            help="With --load: only the weights; fresh optimizer, step 0.",
            panel="Checkpoints",
        ),
    )
    save_interval: int = field(
        default=1000,
        metadata=flag("--save-interval", help="Save every N iterations (0: only at the end).", panel="Checkpoints"),
    )
    keep_last: int = field(
        default=3, metadata=flag("--keep-last", help="Keep the newest N saves (0: all).", panel="Checkpoints")
    )

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
            raise CookbookError(
                f"{flag} must be {'a non-negative' if allow_zero else 'a positive'} integer, not {value!r}"
            )


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
