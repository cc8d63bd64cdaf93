"""``cookbook plan``: which parallel layout to train a model with, and what it costs per GPU.

For every candidate layout (tensor parallel ``tp``, pipeline parallel ``pp``, data parallel ``dp`` = the
rest, a recompute mode, a micro batch) it estimates the memory per GPU and the step time
(``cookbook.engine.plan.estimate``, whose docstring gives the model), drops the layouts that do not fit, and
recommends the fastest, or, among those within 1% of it (``TIE``: closer than the estimate can tell apart), the
simplest (less pp, then less tp, lighter recompute, smaller micro batch; ``PlanResult.why`` says which).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from rich.table import Table

from cookbook.engine.plan import GPUS, HEADROOM, MODES, Layout, estimate
from cookbook.errors import CookbookError
from cookbook.model.config import ModelConfig
from cookbook.model.config import preset as preset_config

TIE = 1.01  # step times within 1% count as equal when choosing


@dataclass
class PlanResult:
    model: dict
    params: int
    seq_length: int
    global_batch: int
    gpu: str
    num_gpus: int
    gpus_per_node: int
    memory_limit_gib: float
    layouts: list[Layout] = field(default_factory=list)  # every candidate, fastest first
    recommended: Layout | None = None

    @property
    def fitting(self) -> list[Layout]:
        return [x for x in self.layouts if x.fits]

    def recommendation(self) -> str:
        r = self.recommended
        flags = f"--tensor-model-parallel-size {r.tp}"
        if r.tp > 1:
            flags += " --sequence-parallel"
        if r.pp > 1:
            flags += f" --pipeline-model-parallel-size {r.pp}"
        if r.recompute != "none":
            flags += f" --recompute-granularity {r.recompute}"
        flags += f" --micro-batch-size {r.micro_batch} --global-batch-size {self.global_batch}"
        return (
            f"recommended: tp={r.tp} pp={r.pp} dp={r.dp}, recompute {r.recompute}, micro batch {r.micro_batch}: "
            f"{r.total_gib:.1f} GiB per GPU, ~{r.step_seconds:.2f} s per step, MFU ~{r.mfu:.0%} (an estimate); "
            f"{self.why()}  [{flags}]"
        )

    def why(self) -> str:
        """The rule that chose the recommendation, in this case's words."""
        r, fastest = self.recommended, self.fitting[0]
        if r is fastest:
            return "the fastest layout that fits"
        simpler = next(
            f"{what} {mine} instead of {theirs}"
            for what, mine, theirs in (
                ("pipeline parallel", r.pp, fastest.pp),
                ("tensor parallel", r.tp, fastest.tp),
                ("recompute", r.recompute, fastest.recompute),
                ("micro batch", r.micro_batch, fastest.micro_batch),
                ("step", f"{r.step_seconds:.2f} s", f"{fastest.step_seconds:.2f} s"),
            )
            if mine != theirs
        )
        return (
            f"within {TIE - 1:.0%} of the fastest that fits ({fastest.name}, {fastest.step_seconds:.2f} s) and "
            f"simpler: {simpler}"
        )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["recommendation"] = self.recommendation() if self.recommended else None
        return d


def _divisors(n: int, limit: int) -> list[int]:
    return [k for k in range(1, min(n, limit) + 1) if n % k == 0]


def resolve_model(preset: str | None, overrides: dict | None) -> ModelConfig:
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if preset is None:
        if not overrides:
            raise CookbookError("name a --preset or give the model's shapes (--num-layers, --hidden-size, ...)")
        return ModelConfig(**overrides)
    return preset_config(preset, **overrides)


def run(
    preset: str | None = None,
    seq_length: int | None = None,
    global_batch: int = 1024,
    gpu: str = "A100-80GB",
    num_gpus: int = 8,
    gpus_per_node: int = 8,
    micro_batch_sizes: tuple[int, ...] = (1, 2, 4),
    max_tp: int | None = None,
    max_pp: int | None = None,
    model: ModelConfig | None = None,
    **overrides,
) -> PlanResult:
    """Estimate every layout of ``num_gpus`` GPUs for the model and recommend the fastest that fits.

    The model is ``model``, else ``preset`` with ``overrides`` (ModelConfig field names), else a
    ModelConfig made of ``overrides``. ``seq_length`` defaults to the model's ``max_seq_len``."""
    cfg = model if model is not None else resolve_model(preset, overrides)
    seq = seq_length or cfg.max_seq_len
    if gpu not in GPUS:
        raise CookbookError(f"unknown GPU {gpu!r}; choose one of {', '.join(GPUS)}")
    spec = GPUS[gpu]
    if num_gpus < 1 or gpus_per_node < 1 or seq < 1 or global_batch < 1:
        raise CookbookError("--num-gpus, --gpus-per-node, --seq-length and --global-batch-size must be positive")
    if num_gpus > gpus_per_node and num_gpus % gpus_per_node:
        raise CookbookError(
            f"{num_gpus} GPUs are not a whole number of nodes of {gpus_per_node}; use a multiple of {gpus_per_node}"
        )
    if not micro_batch_sizes or min(micro_batch_sizes) < 1:
        raise CookbookError("--micro-batch-sizes must list positive sizes")
    if global_batch % min(micro_batch_sizes):
        raise CookbookError(
            f"global batch {global_batch} is not a multiple of any micro batch size in {list(micro_batch_sizes)}"
        )

    node = min(num_gpus, gpus_per_node)
    tps = [
        t
        for t in (1, 2, 4, 8)
        if t <= node
        and t <= (max_tp or node)
        and num_gpus % t == 0
        and cfg.num_heads % t == 0
        and cfg.num_kv_heads % t == 0
        and seq % t == 0
    ]
    layouts = []
    for tp in tps:
        for pp in _divisors(cfg.num_layers, max_pp or cfg.num_layers):
            if num_gpus % (tp * pp):
                continue
            dp = num_gpus // (tp * pp)
            for mb in sorted(set(micro_batch_sizes)):
                if global_batch % (dp * mb) or global_batch // (dp * mb) < pp:
                    continue
                for mode in MODES:
                    layouts.append(estimate(cfg, seq, global_batch, spec, num_gpus, gpus_per_node, tp, pp, mode, mb))
    if not layouts:
        raise CookbookError(
            f"no layout of {num_gpus} GPUs divides global batch {global_batch} into micro batches {list(micro_batch_sizes)} "
            f"per data-parallel rank; use a global batch that is a multiple of the GPU count"
        )
    layouts.sort(key=lambda x: x.step_seconds)
    result = PlanResult(
        cfg.to_dict(),
        cfg.num_params(),
        seq,
        global_batch,
        gpu,
        num_gpus,
        gpus_per_node,
        HEADROOM * spec.memory_gib,
        layouts,
    )
    fitting = result.fitting
    if not fitting:
        least = min(layouts, key=lambda x: x.total_gib)
        raise CookbookError(
            f"no layout fits in {HEADROOM:.0%} of a {gpu}'s {spec.memory_gib:g} GiB: the smallest ({least.name}) needs "
            f"{least.total_gib:.1f} GiB per GPU; use more GPUs, a larger GPU or a shorter --seq-length"
        )
    # the fastest that fits; within 1% of it the simpler layout: less pp, less tp, less recompute, smaller micro batch
    order = {m: i for i, m in enumerate(MODES)}
    close = [x for x in fitting if x.step_seconds <= TIE * fitting[0].step_seconds]
    result.recommended = min(close, key=lambda x: (x.pp, x.tp, order[x.recompute], x.micro_batch, x.step_seconds))
    return result


def render(result: PlanResult, limit: int | None = 25, show_all: bool = False, wide: bool = False) -> Table:
    """The layouts as a rich table, fastest first (only those that fit unless ``show_all``): the layout, the memory
    per GPU and the estimates, narrow enough for 80 columns; ``wide`` adds the memory's parts."""
    rows = result.layouts if show_all else result.fitting
    title = (
        f"{result.params / 1e9:.2f}B parameters, seq {result.seq_length}, global batch {result.global_batch}, "
        f"{result.num_gpus} x {result.gpu} ({result.gpus_per_node} per node); memory per GPU in GiB "
        f"(limit {result.memory_limit_gib:.1f}); step time and MFU are estimates"
    )
    table = Table(title=title, title_justify="left")
    parts = ("params", "grads", "optim", "transient", "activ.") if wide else ()
    for name in (
        "tp",
        "pp",
        "dp",
        "recompute",
        "micro",
        "accum",
        *parts,
        "GiB",
        *(("fits",) if show_all else ()),
        "step s",
        "MFU",
    ):
        table.add_column(name, justify="left" if name in ("recompute", "fits") else "right", no_wrap=True)
    for x in rows[:limit] if limit else rows:
        style = "bold green" if x is result.recommended else (None if x.fits else "dim")
        memory = [x.params_gib, x.grads_gib, x.optimizer_gib, x.transient_gib, x.activations_gib] if wide else []
        table.add_row(
            str(x.tp),
            str(x.pp),
            str(x.dp),
            x.recompute,
            str(x.micro_batch),
            str(x.micro_batches),
            *(f"{m:.1f}" for m in memory),
            f"{x.total_gib:.1f}",
            *(("yes" if x.fits else "no",) if show_all else ()),
            f"{x.step_seconds:.2f}" + ("*" if x.comm_bound else ""),
            f"{x.mfu:.0%}",
            style=style,
        )
    shown = len(rows[:limit] if limit else rows)
    table.caption = (
        "* FSDP communication bound (its all-gather and reduce-scatter exceed the compute)"
        + (f"; the fastest {shown} of {len(rows)}" if shown < len(rows) else "")
        + ("" if wide else "; --wide: the memory's parts")
    )
    return table
