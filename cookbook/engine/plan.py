"""The memory per GPU and the step time of one parallel layout (``estimate``): what ``cookbook plan`` compares
and ``--dry-run`` reports. The memory model is derived from what our engine
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

from dataclasses import dataclass

from cookbook.engine.loss import CHUNK_ELEMENTS
from cookbook.engine.metrics import PEAK_TFLOPS
from cookbook.errors import CookbookError
from cookbook.model.config import ModelConfig

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


def estimate(
    cfg: ModelConfig,
    seq: int,
    global_batch: int,
    gpu: GPU,
    num_gpus: int,
    gpus_per_node: int,
    tp: int,
    pp: int,
    mode: str,
    micro_batch: int,
) -> Layout:
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
    return Layout(
        tp,
        pp,
        dp,
        mode,
        micro_batch,
        m,
        params_b / GIB,
        grads_b / GIB,
        opt_b / GIB,
        transient_b / GIB,
        act_b / GIB,
        total,
        total <= HEADROOM * gpu.memory_gib,
        step,
        mfu,
        mfu * gpu.peak_tflops,
        comm > compute,
    )
