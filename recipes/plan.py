"""``cookbook plan``: which parallel layout to train a model with, and what it costs per GPU.

For every candidate layout (tensor parallel ``tp``, pipeline parallel ``pp``, data parallel ``dp`` = the
rest, a recompute mode, a micro batch) it estimates the memory per GPU and the step time, drops the
layouts that do not fit, and recommends the fastest, or, among those within 1% of it (``TIE``: closer than the
estimate can tell apart), the simplest (less pp, then less tp, lighter recompute, smaller micro batch;
``PlanResult.why`` says which). The memory model is derived from what our engine
keeps (and checked against allocator measurements on CPU, tests/test_plan.py); the step time is an
**estimate** from assumed efficiencies, not a measurement.

Notation: h hidden, q = heads x head_dim, kv = kv_heads x head_dim, f FFN, n heads, V vocabulary, L layers,
P parameters, p = 2 bytes (bf16 compute), s sequence, b micro batch, tokens = b x s per micro batch;
tp_sp = tp under sequence parallel (always on when tp > 1 here, as in the cookbook's recipes).

Model state per GPU (FSDP2 mixed precision: fp32 master weights, fp32 gradients, fp32 Adam m and v)
    state = 16 B x P_stage / tp / dp            (4 params + 4 grads + 8 optimizer)
    P_stage = L/pp blocks (+ embedding on the first stage, + final norm and output layer on the last)
Transient (unsharded by FSDP while in use), / tp:
    2 B x (2 blocks + the root's embedding/output: the root unit is not resharded between forward and backward)
    + 6 B x 1 block (its bf16 gradient and the fp32 copy reduce-scattered) + 2 B x output layer (its bf16 gradient)

Activations per token per block, bytes, what autograd holds when the forward ends (bf16; RMSNorm upcasts
its input to fp32 and keeps that copy, its fp32 rstd and the bf16 normalised value; SDPA keeps q, the
GQA-expanded k and v, its output and an fp32 logsumexp per head; SwiGLU keeps gate, silu(gate), up and
the product). Under sequence parallel the norms run on a tp-th of the sequence, but their output is
all-gathered and the gathered copy is what the q/k/v and gate/up matmuls keep (full size, not / tp):
    norm   = (4h + 4 + 2h) / tp_sp + 2h                         (two per block)
    none      = 2 norm + (8q + 4n + 8f) / tp
    selective = (4q + 4kv + 4f + 4n) / tp + 4h + 2h / tp_sp     (matmul and SDPA outputs; the row-parallel
                                                                  outputs of wo and down are full-size partial sums)
    full      = 2h / tp_sp                                      (each block's input only)
Outside the blocks (last stage): the final norm (as above), the logits (gathered to the full vocabulary on
every tp rank): bf16 [tokens, V] kept by the chunked cross-entropy (fp32 log-softmax 4V when one chunk
holds them all), 8 B of targets, and cos/sin (2 x s x head_dim x 2 B per micro batch).

Planning adds to that: the logits' gradient (2V per token) and the loss's fp32 working space in backward
(3 x 128 MiB chunks, or 4V per token when one chunk holds every token), one block's ``none`` activations as the backward
working set (the block being recomputed, or the gradients flowing through one), and 1F1B in-flight micro
batches: the first stage holds min(pp, m) micro batches of its L/pp blocks, the last stage one.
Peak per GPU = max over first and last stage of state + transient + activations; a layout fits when its
peak is at most 90% of the GPU's memory.

Step time (estimate)
    compute per micro batch = F_hw x tokens / (tp x pp) / (peak x eff)
        F_hw = flops_per_token(s) x (1 + recompute extra): selective +3%, full + the blocks' forward again (~33%)
        eff = 0.5 x tp factor (1, 0.96, 0.92, 0.86 for tp 1, 2, 4, 8 within a node: TP/SP collectives)
    FSDP comm per micro batch = 8 B x P_stage / tp x (dp-1)/dp / bandwidth: the engine all-gathers bf16
        parameters in forward and backward and reduce-scatters fp32 gradients every micro batch; bandwidth
        is NVLink when the dp group stays within a node, else the inter-node bandwidth per GPU.
    micro time = max(compute, comm)  (FSDP overlaps them)
    step time = (m + pp - 1) x micro time,  m = global batch / (dp x b) micro batches  (1F1B bubble)
    MFU = flops_per_token(s) x global batch x s / (step time x gpus x peak)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from rich.table import Table

from cookbook.engine.loss import CHUNK_ELEMENTS
from cookbook.engine.metrics import PEAK_TFLOPS
from cookbook.errors import CookbookError
from cookbook.model.config import ModelConfig
from cookbook.model.config import preset as preset_config

GIB = 2**30
MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class GPU:
    memory_gib: float  # what the device reports (torch.cuda.get_device_properties(...).total_memory)
    peak_tflops: float  # dense bf16
    nvlink_gbps: float  # GB/s per GPU within a node, one direction
    network_gbps: float  # GB/s per GPU between nodes (InfiniBand / RoCE)


GPUS = {
    "A100-80GB": GPU(80.0, PEAK_TFLOPS["A100"], 300.0, 25.0),  # HDR 200 Gb/s per GPU
    "A100-40GB": GPU(40.0, PEAK_TFLOPS["A100"], 300.0, 25.0),
    "H100-80GB": GPU(79.6, PEAK_TFLOPS["H100"], 450.0, 50.0),  # NDR 400 Gb/s per GPU
    "H200": GPU(140.4, PEAK_TFLOPS["H200"], 450.0, 50.0),  # 141 GB
    "L40S": GPU(44.5, PEAK_TFLOPS["L40S"], 32.0, 12.5),  # PCIe, no NVLink
}

HEADROOM = 0.9  # a layout fits when its peak is at most this fraction of the GPU's memory
BASE_EFFICIENCY = 0.5  # achievable fraction of peak for one GPU's matmuls (an assumption)
TP_FACTOR = {1: 1.0, 2: 0.96, 4: 0.92, 8: 0.86}
SELECTIVE_EXTRA = 0.03
TIE = 1.01  # step times within 1% count as equal when choosing


# --------------------------------------------------------------------------- memory arithmetic


def block_params(cfg: ModelConfig) -> int:
    h, d = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    return h * (q + 2 * kv) + q * h + (q + 2 * kv if cfg.qkv_bias else 0) + 3 * h * cfg.intermediate_size + 2 * h


def stage_params(cfg: ModelConfig, pp: int, stage: int) -> int:
    """Parameters of pipeline stage ``stage`` of ``pp`` (the whole model when pp = 1)."""
    n = cfg.num_layers // pp * block_params(cfg)
    vh = cfg.vocab_size * cfg.hidden_size
    if stage == 0:
        n += vh
    if stage == pp - 1:
        n += cfg.hidden_size + (0 if cfg.tie_embeddings and pp == 1 else vh)
    return n


def norm_bytes(cfg: ModelConfig, tp: int = 1, sp: bool = True, p: int = 2) -> float:
    """Bytes per token one RMSNorm (and the all-gather after it under SP) leaves for backward."""
    h = cfg.hidden_size
    tp_sp = tp if sp else 1
    if p < 4:  # bf16: the fp32 copy of the input, fp32 rstd, the normalised value; the weighted output
        return (4 * h + 4 + p * h) / tp_sp + p * h
    return (4 + p * h) / tp_sp + p * h  # fp32: the input is kept but is the block's own tensor (see below)


def layer_activation_bytes(cfg: ModelConfig, mode: str, tp: int = 1, sp: bool = True, p: int = 2) -> float:
    """Bytes per token one block keeps for backward when the forward ends (module docstring)."""
    if mode not in MODES:
        raise CookbookError(f"unknown recompute mode {mode!r}; choose one of {', '.join(MODES)}")
    h, d, n, f = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.intermediate_size
    q, kv = n * d, cfg.num_kv_heads * d
    tp_sp = tp if sp else 1
    if mode == "full":
        return p * h / tp_sp
    if mode == "selective":
        return (p * (2 * q + 2 * kv + 2 * f) + 4 * n) / tp + 2 * p * h + p * h / tp_sp
    held = 2 * norm_bytes(cfg, tp, sp, p) + (4 * p * q + 4 * n + 4 * p * f) / tp
    if p >= 4:  # fp32: the norms keep their inputs, the residual h and the block's output
        held += 2 * p * h / tp_sp
    return held


def logits_bytes(cfg: ModelConfig, tokens: int, p: int = 2) -> float:
    """Bytes per token the loss keeps: bf16 logits under the chunked cross-entropy, else the fp32 log-softmax."""
    V = cfg.vocab_size
    return p * V if p < 4 and tokens * V > CHUNK_ELEMENTS else 4 * V


def forward_held_bytes(cfg: ModelConfig, micro_batch: int, seq: int, mode: str, p: int = 2) -> float:
    """Activation bytes held when the forward of one process (no parallelism) ends, loss included: the
    number tests/test_plan.py measures with the allocator's events."""
    tokens = micro_batch * seq
    per_token = cfg.num_layers * layer_activation_bytes(cfg, mode, 1, True, p)
    per_token += norm_bytes(cfg, 1, True, p) + logits_bytes(cfg, tokens, p) + 8  # final norm, loss, targets
    if p >= 4:
        per_token += p * cfg.hidden_size  # fp32: the embedding output, kept by the first norm
    return per_token * tokens + 2 * seq * cfg.head_dim * p  # + cos and sin


# --------------------------------------------------------------------------- layouts


@dataclass
class Layout:
    tp: int
    pp: int
    dp: int
    recompute: str
    micro_batch: int
    micro_batches: int  # per step, per pipeline (gradient accumulation steps when pp = 1)
    params_gib: float  # fp32 master weights, sharded
    grads_gib: float
    optimizer_gib: float
    transient_gib: float
    activations_gib: float
    total_gib: float
    fits: bool
    step_seconds: float
    mfu: float
    tflops_per_gpu: float
    comm_bound: bool

    @property
    def name(self) -> str:
        return f"tp{self.tp} pp{self.pp} dp{self.dp} {self.recompute} mb{self.micro_batch}"


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
        return (f"recommended: tp={r.tp} pp={r.pp} dp={r.dp}, recompute {r.recompute}, micro batch {r.micro_batch}: "
                f"{r.total_gib:.1f} GiB per GPU, ~{r.step_seconds:.2f} s per step, MFU ~{r.mfu:.0%} (an estimate); "
                f"{self.why()}  [{flags}]")

    def why(self) -> str:
        """The rule that chose the recommendation, in this case's words."""
        r, fastest = self.recommended, self.fitting[0]
        if r is fastest:
            return "the fastest layout that fits"
        simpler = next(f"{what} {mine} instead of {theirs}" for what, mine, theirs in (
            ("pipeline parallel", r.pp, fastest.pp), ("tensor parallel", r.tp, fastest.tp),
            ("recompute", r.recompute, fastest.recompute), ("micro batch", r.micro_batch, fastest.micro_batch),
            ("step", f"{r.step_seconds:.2f} s", f"{fastest.step_seconds:.2f} s")) if mine != theirs)
        return (f"within {TIE - 1:.0%} of the fastest that fits ({fastest.name}, {fastest.step_seconds:.2f} s) and "
                f"simpler: {simpler}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["recommendation"] = self.recommendation() if self.recommended else None
        return d


def _divisors(n: int, limit: int) -> list[int]:
    return [k for k in range(1, min(n, limit) + 1) if n % k == 0]


def estimate(cfg: ModelConfig, seq: int, global_batch: int, gpu: GPU, num_gpus: int, gpus_per_node: int,
             tp: int, pp: int, mode: str, micro_batch: int) -> Layout:
    """Memory per GPU and estimated step time of one layout (module docstring)."""
    dp = num_gpus // (tp * pp)
    m = global_batch // (dp * micro_batch)
    tokens = micro_batch * seq
    sp = tp > 1
    blk = block_params(cfg)
    vh = cfg.vocab_size * cfg.hidden_size
    act_layer = layer_activation_bytes(cfg, mode, tp, sp)
    work = layer_activation_bytes(cfg, "none", tp, sp) * tokens  # backward working set: one block
    rope = 2 * seq * cfg.head_dim * 2
    worst = None
    for stage in sorted({0, pp - 1}):
        first, last = stage == 0, stage == pp - 1
        n = stage_params(cfg, pp, stage)
        state = n / tp / dp
        root = (vh if first else 0) + (vh if last and not (cfg.tie_embeddings and pp == 1) else 0)
        transient = (2 * (2 * blk + root) + 6 * blk + (2 * vh if last else 0)) / tp
        in_flight = min(pp - stage, m)
        act = in_flight * (cfg.num_layers // pp * act_layer * tokens + rope) + work
        if last:
            act += (norm_bytes(cfg, tp, sp) + logits_bytes(cfg, tokens) + 2 * cfg.vocab_size + 8) * tokens
            if tokens * cfg.vocab_size > CHUNK_ELEMENTS:  # backward recomputes one chunk at a time in fp32
                act += 3 * 4 * CHUNK_ELEMENTS
            else:  # one chunk: the fp32 gradients of the log-probabilities and logits exist for a moment
                act += 4 * cfg.vocab_size * tokens
        parts = (4 * state, 4 * state, 8 * state, transient, act)
        if worst is None or sum(parts) > sum(worst):
            worst = parts
    params_b, grads_b, opt_b, transient_b, act_b = worst
    total = sum(worst) / GIB

    model_fpt = cfg.flops_per_token(seq)
    if mode == "full":  # the blocks' forward once more: a third of their training FLOPs
        extra = (model_fpt - 6.0 * vh) / 3 / model_fpt
    else:
        extra = SELECTIVE_EXTRA if mode == "selective" else 0.0
    peak = gpu.peak_tflops * 1e12
    eff = BASE_EFFICIENCY * TP_FACTOR.get(tp, 0.8)
    compute = model_fpt * (1 + extra) * tokens / (tp * pp) / (peak * eff)
    bandwidth = (gpu.nvlink_gbps if dp * tp <= gpus_per_node else gpu.network_gbps) * 1e9
    comm = 8 * max(stage_params(cfg, pp, s) for s in {0, pp - 1}) / tp * (dp - 1) / dp / bandwidth
    micro = max(compute, comm)
    step = (m + pp - 1) * micro
    model_flops = model_fpt * global_batch * seq
    mfu = model_flops / (step * num_gpus * peak)
    return Layout(tp, pp, dp, mode, micro_batch, m, params_b / GIB, grads_b / GIB, opt_b / GIB, transient_b / GIB,
                  act_b / GIB, total, total <= HEADROOM * gpu.memory_gib, step, mfu, mfu * gpu.peak_tflops, comm > compute)


def resolve_model(preset: str | None, overrides: dict | None) -> ModelConfig:
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if preset is None:
        if not overrides:
            raise CookbookError("name a --preset or give the model's shapes (--num-layers, --hidden-size, ...)")
        return ModelConfig(**overrides)
    return preset_config(preset, **overrides)


def run(preset: str | None = None, seq_length: int | None = None, global_batch: int = 1024, gpu: str = "A100-80GB",
        num_gpus: int = 8, gpus_per_node: int = 8, micro_batch_sizes: tuple[int, ...] = (1, 2, 4),
        max_tp: int | None = None, max_pp: int | None = None, model: ModelConfig | None = None,
        **overrides) -> PlanResult:
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
        raise CookbookError(f"{num_gpus} GPUs are not a whole number of nodes of {gpus_per_node}; use a multiple of {gpus_per_node}")
    if not micro_batch_sizes or min(micro_batch_sizes) < 1:
        raise CookbookError("--micro-batch-sizes must list positive sizes")
    if global_batch % min(micro_batch_sizes):
        raise CookbookError(f"global batch {global_batch} is not a multiple of any micro batch size in {list(micro_batch_sizes)}")

    node = min(num_gpus, gpus_per_node)
    tps = [t for t in (1, 2, 4, 8) if t <= node and t <= (max_tp or node) and num_gpus % t == 0
           and cfg.num_heads % t == 0 and cfg.num_kv_heads % t == 0 and seq % t == 0]
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
            f"per data-parallel rank; use a global batch that is a multiple of the GPU count")
    layouts.sort(key=lambda x: x.step_seconds)
    result = PlanResult(cfg.to_dict(), cfg.num_params(), seq, global_batch, gpu, num_gpus, gpus_per_node,
                        HEADROOM * spec.memory_gib, layouts)
    fitting = result.fitting
    if not fitting:
        least = min(layouts, key=lambda x: x.total_gib)
        raise CookbookError(
            f"no layout fits in {HEADROOM:.0%} of a {gpu}'s {spec.memory_gib:g} GiB: the smallest ({least.name}) needs "
            f"{least.total_gib:.1f} GiB per GPU; use more GPUs, a larger GPU or a shorter --seq-length")
    # the fastest that fits; within 1% of it the simpler layout: less pp, less tp, less recompute, smaller micro batch
    order = {m: i for i, m in enumerate(MODES)}
    close = [x for x in fitting if x.step_seconds <= TIE * fitting[0].step_seconds]
    result.recommended = min(close, key=lambda x: (x.pp, x.tp, order[x.recompute], x.micro_batch, x.step_seconds))
    return result


def render(result: PlanResult, limit: int | None = 25, show_all: bool = False, wide: bool = False) -> Table:
    """The layouts as a rich table, fastest first (only those that fit unless ``show_all``): the layout, the memory
    per GPU and the estimates, narrow enough for 80 columns; ``wide`` adds the memory's parts."""
    rows = result.layouts if show_all else result.fitting
    title = (f"{result.params / 1e9:.2f}B parameters, seq {result.seq_length}, global batch {result.global_batch}, "
             f"{result.num_gpus} x {result.gpu} ({result.gpus_per_node} per node); memory per GPU in GiB "
             f"(limit {result.memory_limit_gib:.1f}); step time and MFU are estimates")
    table = Table(title=title, title_justify="left")
    parts = ("params", "grads", "optim", "transient", "activ.") if wide else ()
    for name in ("tp", "pp", "dp", "recompute", "micro", "accum", *parts, "GiB", *(("fits",) if show_all else ()), "step s", "MFU"):
        table.add_column(name, justify="left" if name in ("recompute", "fits") else "right", no_wrap=True)
    for x in rows[:limit] if limit else rows:
        style = "bold green" if x is result.recommended else (None if x.fits else "dim")
        memory = [x.params_gib, x.grads_gib, x.optimizer_gib, x.transient_gib, x.activations_gib] if wide else []
        table.add_row(str(x.tp), str(x.pp), str(x.dp), x.recompute, str(x.micro_batch), str(x.micro_batches),
                      *(f"{m:.1f}" for m in memory), f"{x.total_gib:.1f}", *(("yes" if x.fits else "no",) if show_all else ()),
                      f"{x.step_seconds:.2f}" + ("*" if x.comm_bound else ""), f"{x.mfu:.0%}", style=style)
    shown = len(rows[:limit] if limit else rows)
    table.caption = ("* FSDP communication bound (its all-gather and reduce-scatter exceed the compute)"
                     + (f"; the fastest {shown} of {len(rows)}" if shown < len(rows) else "")
                     + ("" if wide else "; --wide: the memory's parts"))
    return table


__all__ = ["GPUS", "GPU", "Layout", "PlanResult", "run", "render", "estimate", "layer_activation_bytes",
           "forward_held_bytes", "stage_params", "block_params"]
