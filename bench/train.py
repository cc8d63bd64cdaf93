"""Benchmark: training throughput of cookbook's Trainer against a plain Hugging Face transformers loop.

Both sides train the same model (our preset, given to transformers' ``LlamaForCausalLM`` through
``cookbook.formats.hf.hf_config`` with our initial weights copied in), on the same micro batches (read
once from a temporary Megatron indexed dataset of random tokens by the Trainer's own loader), in the
same dtype, with the same optimizer settings (torch AdamW: the engine's fused kernel for ours, the
textbook ``foreach`` for HF; Megatron-LM's weight-decay groups, constant LR, clip at 1.0).

- ours: ``cookbook.engine.trainer.Trainer`` as ``cookbook pretrain`` builds it in one process (a world
  of one: the plain model, no FSDP2 wrapping), ``Trainer.train_step``.
- HF:   ``LlamaForCausalLM(attn_implementation="sdpa", use_cache=False)`` and the textbook loop:
  ``logits = model(input_ids=x[:, :-1]).logits``; fp32 cross-entropy; ``backward``;
  ``clip_grad_norm_``; ``AdamW.step``; ``zero_grad(set_to_none=True)``.

``--dtype bf16``: in one process ours runs under ``torch.autocast(bfloat16)`` too (FSDP2's mixed precision
when there are several processes); HF runs its fp32 model under ``torch.autocast(bfloat16)`` (bf16 matmuls, fp32 weights and gradients).
These are the usual bf16 recipes of each, not bit-identical math; the first-step loss check is then loose.

Timing: warmup steps on both sides, then rounds that alternate the sides (A B, B A, ...) so that noise on a
shared machine falls on both; each step is timed on its own and the median step time per side is
reported, with the fastest step (the least disturbed one) beside it (tokens/s = micro batch x accumulation x seq / median). Data loading is outside the timed
region on both sides (batches are read before timing). The first step's losses, on the same batch and
the same weights, must agree (fp32: within 1e-4) or the script exits non-zero.

The single-process engine runs the plain model (FSDP2 only wraps it when there are several
processes) with fused AdamW; docs/benchmarks.md records how FSDP2's copies at world size 1 were
measured (4% of a CPU step) before that choice.

    python bench/train.py                              # tiny preset, seq 256, micro batch 8, fp32, CPU
    python bench/train.py --device cuda --dtype bf16 --preset llama2-7b --num-layers 2 --threads 0
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cookbook.data.indexed import IndexedDatasetWriter  # noqa: E402
from cookbook.engine.config import build_config  # noqa: E402
from cookbook.engine.distributed import shutdown  # noqa: E402
from cookbook.engine.optim import param_groups  # noqa: E402
from cookbook.engine.trainer import Trainer  # noqa: E402
from cookbook.errors import CookbookError  # noqa: E402
from cookbook.formats.hf import hf_config, hf_name  # noqa: E402


def write_random_tokens(
    prefix: Path, tokens: int, vocab: int, seed: int = 0, eod: int | None = None, counting: bool = False
) -> str:
    """Documents of 100-1,000 uniformly random tokens, ``tokens`` in all (at least). ``eod``: each document ends
    with it (and holds it nowhere else), as ``preprocess --append-eod`` writes them. ``counting``: a learnable
    rule instead of noise (next = previous + 1, or + 2 one time in four), so that a loss falls."""
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < tokens:
        lengths.append(int(rng.integers(100, 1000)))
    dtype = np.uint16 if vocab <= 65535 else np.int32
    ids = vocab if eod is None else vocab - 1  # the tokens a document draws from: every id but the EOD
    if counting:
        steps = rng.choice([1, 1, 1, 2], size=sum(lengths))
        data = (rng.integers(0, ids) + np.cumsum(steps)) % ids
    else:
        data = rng.integers(0, ids, size=sum(lengths))
    if eod is not None:
        data = np.where(data >= eod, data + 1, data)  # skip the EOD id, then end every document with it
        data[np.cumsum(lengths) - 1] = eod
    with IndexedDatasetWriter(prefix, dtype) as w:
        w.add_documents(data.astype(dtype), np.asarray(lengths))
    return str(prefix)


def build_trainer(args, data: str, iters: int) -> Trainer:
    from cookbook.model.config import preset

    model = {"preset": args.preset, "max_seq_len": max(args.seq_length, preset(args.preset).max_seq_len)}
    if args.hidden_size:
        model["hidden_size"] = args.hidden_size
    if args.num_layers:
        model["num_layers"] = args.num_layers
    job = build_config(
        {
            "model": model,
            "data": {"data_path": [data], "seq_length": args.seq_length, "split": "1,0,0"},
            "optimizer": {"lr": args.lr, "lr_decay_style": "constant", "weight_decay": 0.1, "clip_grad": 1.0},
            "training": {
                "train_iters": iters,
                "micro_batch_size": args.micro_batch_size,
                "global_batch_size": args.global_batch_size or args.micro_batch_size,
                "dtype": args.dtype,
                "device": args.device,
                "eval_interval": 0,
                "eval_iters": 0,
                "seed": 1234,
            },
        }
    )
    return Trainer(job)


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded fp32 copies of a (possibly FSDP2-sharded) model's parameters."""
    out = {}
    for k, v in model.state_dict().items():
        v = v.full_tensor() if hasattr(v, "full_tensor") else v
        out[k] = v.detach().clone()
    return out


def build_hf(trainer: Trainer, state: dict[str, torch.Tensor]):
    import transformers

    cfg = trainer.job.model
    conf = hf_config(cfg)
    conf.pop("architectures"), conf.pop("model_type")
    cls, model_cls = (
        (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)
        if cfg.qkv_bias
        else (transformers.LlamaConfig, transformers.LlamaForCausalLM)
    )
    with torch.device(trainer.device):
        model = model_cls(cls(**conf, attn_implementation="sdpa", use_cache=False))
    missing, unexpected = model.load_state_dict({hf_name(k): v for k, v in state.items()}, strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing) or (missing and not cfg.tie_embeddings):
        raise SystemExit(f"weights do not map onto transformers' model: missing {missing}, unexpected {unexpected}")
    model.train()
    return model, make_adamw(model, trainer)


def make_adamw(model: torch.nn.Module, trainer: Trainer, fused: bool = False) -> torch.optim.AdamW:
    """torch AdamW with the Trainer's settings and Megatron-LM's decay groups (as build_optimizer)."""
    o = trainer.job.optimizer
    kind = {"fused": True} if fused or trainer.device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(
        param_groups(model, o.weight_decay), lr=o.lr, betas=(o.adam_beta1, o.adam_beta2), eps=o.adam_eps, **kind
    )


def hf_loss(model, x: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x[:, :-1]).logits
    return F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())


class HFLoop:
    """The plain transformers training step (gradient accumulation over the micro batches)."""

    def __init__(self, model, optimizer, clip: float, device: torch.device, bf16: bool):
        self.model, self.optimizer, self.clip, self.device = model, optimizer, clip, device
        self.autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step(self, micro_batches: list[torch.Tensor]) -> float:
        total = 0.0
        for x in micro_batches:
            x = x.to(self.device, non_blocking=True)
            with self.autocast():
                loss = hf_loss(self.model, x) / len(micro_batches)
            loss.backward()
            total += loss.detach()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(total)


class OtherLoad:
    """The share of the machine's CPU time that other processes used between ``start`` and ``stop``
    (Linux: /proc/stat's busy time less this process's own, its finished children's and ``pids``'), to tell a quiet
    run from a disturbed one."""

    def __init__(self, pids: tuple[int, ...] = ()):
        self.pids = pids  # processes of the benchmark itself (a server it started, say)

    def _read(self) -> tuple[float, float, float]:
        hz = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as f:
            v = [float(x) for x in f.readline().split()[1:9]]
        t = os.times()
        ours = t.user + t.system + t.children_user + t.children_system
        for pid in self.pids:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ours += (float(fields[11]) + float(fields[12])) / hz  # utime, stime
        return sum(v) - v[3] - v[4], sum(v), ours  # busy, total (clock ticks); ours (s)

    def start(self) -> None:
        try:
            self.begin = self._read()
        except OSError:
            self.begin = None

    def stop(self) -> float | None:
        if self.begin is None:
            return None
        end = self._read()
        hz = os.sysconf("SC_CLK_TCK")
        busy, total = (end[0] - self.begin[0]) / hz, (end[1] - self.begin[1]) / hz
        return max(0.0, busy - (end[2] - self.begin[2])) / total if total > 0 else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--hidden-size", type=int, default=None)
    ap.add_argument("--num-layers", type=int, default=None)
    ap.add_argument("--seq-length", type=int, default=256)
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--global-batch-size", type=int, default=None, help="default: the micro batch (no accumulation)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per side")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per side first")
    ap.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="alternations of the sides over the timed steps (default: one per step, ABBA order)",
    )
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0: leave torch's default)")
    ap.add_argument("--lr", type=float, default=3e-4)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = max(1, min(args.rounds or args.steps, args.steps))
    per_side = args.warmup + args.steps
    gb = args.global_batch_size or args.micro_batch_size
    accumulation = gb // args.micro_batch_size

    import transformers

    with tempfile.TemporaryDirectory(prefix="cookbook-bench-train-") as work:
        from cookbook.model.config import preset

        vocab = preset(args.preset).vocab_size
        data = write_random_tokens(
            Path(work) / "random_text_document", int((per_side + 2) * gb * (args.seq_length + 1) * 1.1), vocab
        )
        trainer = build_trainer(args, data, per_side + 1)
        if accumulation != trainer.accumulation:
            raise SystemExit("--global-batch-size must be a multiple of --micro-batch-size")
        dev = trainer.device
        cfg = trainer.job.model
        state = full_state(trainer.model)
        hf = HFLoop(*build_hf(trainer, state), trainer.job.optimizer.clip_grad, dev, args.dtype == "bf16")
        batches = [[trainer.loader.next().to(dev) for _ in range(accumulation)] for _ in range(per_side)]
        tokens_per_step = gb * args.seq_length

        print(
            f"model: {args.preset} (hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} heads, "
            f"{cfg.num_kv_heads} kv heads, FFN {cfg.intermediate_size}, vocab {cfg.vocab_size}; "
            f"{cfg.num_params() / 1e6:.2f}M parameters)"
        )
        print(
            f"batch: {gb} x {args.seq_length} tokens ({args.micro_batch_size} micro x {accumulation} accumulation); "
            f"{args.dtype}; {dev.type}; threads {torch.get_num_threads()}; cpus {os.cpu_count()}; "
            f"{platform.processor() or platform.machine()}; torch {torch.__version__}; transformers {transformers.__version__}"
        )

        sides = {"ours": lambda b: trainer.train_step(b)[0], "hf": hf.step}

        # step 0: the same batch, the same weights: the losses must agree
        first = {name: fn(batches[0]) for name, fn in sides.items()}
        tol = 1e-4 if args.dtype == "fp32" else 5e-2
        diffs = {name: abs(loss - first["hf"]) for name, loss in first.items()}
        print(
            f"first-step loss: ours {first['ours']:.6f}  hf {first['hf']:.6f}  |diff| {diffs['ours']:.2e} (tolerance {tol:g})"
            + "".join(f"; {name} {loss:.6f}" for name, loss in first.items() if name not in ("ours", "hf"))
        )
        bad = [name for name, d in diffs.items() if not d <= tol]
        if bad:
            shutdown()
            raise SystemExit(
                f"{', '.join(bad)} and hf do not compute the same loss (|diff| {max(diffs[b] for b in bad):.2e} > {tol:g})"
            )
        for i in range(1, args.warmup):
            for fn in sides.values():
                fn(batches[i])

        # timed rounds; the order of the sides reverses every round (A B, B A, ...)
        times: dict[str, list[float]] = {name: [] for name in sides}
        k = args.warmup
        other = OtherLoad()
        other.start()
        per_round = [args.steps // rounds + (r < args.steps % rounds) for r in range(rounds)]
        for r, n in enumerate(per_round):
            order = list(sides) if r % 2 == 0 else list(sides)[::-1]
            for name in order:
                for j in range(n):
                    times[name].append(timed(lambda: sides[name](batches[k + j]), dev)[0])
            k += n

        other_share = other.stop()
        med = {name: statistics.median(t) for name, t in times.items()}
        best = {name: min(t) for name, t in times.items()}
        width = max(len(name) for name in sides)
        print(f"\n{'side':{width}s} {'median s/step':>14s} {'min':>8s} {'max':>8s} {'tokens/s':>10s} {'vs hf':>7s}")
        for name, t in times.items():
            print(
                f"{name:{width}s} {med[name]:14.4f} {min(t):8.4f} {max(t):8.4f} {tokens_per_step / med[name]:10,.0f} "
                f"{med['hf'] / med[name]:6.2f}x"
            )
        print(
            f"ratio ours/hf: {med['hf'] / med['ours']:.2f}x  (tokens/s; median of {args.steps} steps per side, "
            f"{rounds} alternating rounds)"
        )
        print(
            f"ratio ours/hf, fastest step of each side: {best['hf'] / best['ours']:.2f}x  "
            f"(the least disturbed by other work on the machine)"
        )
        if other_share is not None:
            print(
                f"other processes used {100 * other_share:.0f}% of the machine's CPU time during the timed steps "
                f"(this run: {os.cpu_count()} CPUs, {torch.get_num_threads()} threads); above a few % the figures are "
                "disturbed, the side with more small ops the more"
            )

        shutdown()


if __name__ == "__main__":
    try:
        main()
    except CookbookError as e:
        sys.exit(f"error: {e}")
