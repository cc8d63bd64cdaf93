"""Every GPU figure cookbook claims, from one run on one H100/H200 (``bash bench/gpu.sh``, under 8 minutes).

Rungs, each measured in a process of its own (a rung that fails, runs out of memory or crashes is a row that
says so; the others go on), on a ~1B Llama (16 layers, hidden 2048, 16 heads / 8 KV heads, FFN 8192, vocabulary
32,000: 1.14B parameters) at sequence 4096, micro batch 2, bf16 (fp32 master weights), the Trainer's own step:

- ``sdpa``, ``sdpa compile``, ``flash compile``: tokens/s, TFLOP/s and MFU, eager and ``--compile``, plain causal
  (MFU against the GPU's dense bf16 peak, from the exact matmul count: cookbook/engine/metrics.py);
- ``docs sdpa`` / ``docs flex`` / ``docs flash`` (+ ``compile``): the same with documents packed in each sample
  (100-1,000 tokens, Megatron-LM's three document flags), each attention kernel;
- ``fp8 compile``: ``--fp8`` (torchao; FP8 tensor cores);
- ``hf``: the same step in HF transformers (``LlamaForCausalLM``, SDPA, autocast bf16, fused AdamW: bench/train.py's
  loop) on the same weights and batches: the baseline of every ``vs hf`` ratio;
- ``memory``: the ``sdpa`` rung's peak allocated memory against ``cookbook plan``'s estimate for that layout;
- ``loss`` / ``docs loss``: 20 steps of a small model on learnable data, bf16 on the GPU against fp32 on the CPU from
  the same weights and batches (``docs``: the GPU's attention kernel against SDPA on the CPU);
- ``generate``: bench/generate.py at hidden 2048 and 16 layers: cookbook's generator against HF ``generate``.

It prints one table (plain text, one line per rung) and writes the JSON (``--out``), rewritten after every rung.
The whole run keeps to ``--budget`` (420 s): rungs that would start later are skipped, with the ``--rungs`` to rerun.
Only torch and transformers are needed; flash-attn and torchao rungs are skipped, with the line that installs
them, where they are missing. ``--smoke`` runs every rung at tiny shapes on the CPU, in this process, in seconds
(tests/test_bench_gpu.py): the GPU-only rungs then report their refusal, and compile is skipped (minutes on CPU).

    PYTHONPATH=. python bench/gpu.py --out bench-gpu.json          # the GPU machine
    PYTHONPATH=. python bench/gpu.py --smoke                        # CPU, tiny
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLASH = ("flash_attn_interface", "flash_attn")
INSTALL = {
    "flash": "flash-attn is not installed: pip install 'cookbook[gpu]'",
    "torchao": "torchao is not installed: pip install 'cookbook[fp8]'",
}


@dataclass(frozen=True)
class Shape:
    """The model and batch of a run (``FULL`` on the GPU, ``SMOKE`` on the CPU)."""

    model: dict
    seq: int
    micro_batch: int
    warmup: int  # untimed steps (compile happens here)
    steps: int  # timed steps
    loss_model: dict  # the bf16-vs-fp32 check's model
    loss_seq: int
    loss_steps: int
    generate: list[str]  # bench/generate.py's shape flags


FULL = Shape(
    model=dict(
        vocab_size=32000,
        hidden_size=2048,
        num_layers=16,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=8192,
        max_seq_len=4096,
    ),
    seq=4096,
    micro_batch=2,
    warmup=3,
    steps=10,
    loss_model=dict(
        vocab_size=8000,
        hidden_size=512,
        num_layers=4,
        num_heads=8,
        num_kv_heads=4,
        head_dim=64,
        intermediate_size=1536,
        max_seq_len=512,
    ),
    loss_seq=512,
    loss_steps=20,
    generate=[
        "--hidden-size",
        "2048",
        "--num-layers",
        "16",
        "--vocab-size",
        "32000",
        "--batch-size",
        "16",
        "--prompt-len",
        "128",
        "--new-tokens",
        "128",
        "--repeats",
        "3",
        "--threads",
        "0",
    ],
)
SMOKE = Shape(
    model=dict(
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_seq_len=64,
    ),
    seq=64,
    micro_batch=2,
    warmup=1,
    steps=2,
    loss_model=dict(
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_seq_len=64,
    ),
    loss_seq=64,
    loss_steps=3,
    generate=[
        "--hidden-size",
        "64",
        "--num-layers",
        "2",
        "--vocab-size",
        "512",
        "--batch-size",
        "2",
        "--prompt-len",
        "8",
        "--new-tokens",
        "4",
        "--repeats",
        "1",
        "--threads",
        "1",
    ],
)


@dataclass(frozen=True)
class Rung:
    name: str
    kind: str  # train | hf | loss | generate
    backend: str = "sdpa"  # --attention-backend
    compile: bool = False
    documents: bool = False  # samples packed from documents, Megatron-LM's three flags on
    fp8: bool = False
    needs: str | None = None  # "flash" or "torchao": skipped, with the install line, where it is missing


RUNGS = [  # in the order they run: the baseline early, the rungs most often missing (flash-attn, torchao) late
    Rung("sdpa", "train"),
    Rung("hf", "hf"),
    Rung("sdpa compile", "train", compile=True),
    Rung("docs sdpa", "train", documents=True),
    Rung("docs flex", "train", backend="flex", documents=True),
    Rung("docs flex compile", "train", backend="flex", compile=True, documents=True),
    Rung("loss", "loss"),
    Rung("docs loss", "loss", backend="auto", documents=True),
    Rung("generate", "generate"),
    Rung("flash compile", "train", backend="flash", compile=True, needs="flash"),
    Rung("docs flash", "train", backend="flash", documents=True, needs="flash"),
    Rung("docs flash compile", "train", backend="flash", compile=True, documents=True, needs="flash"),
    Rung("fp8 compile", "train", backend="auto", compile=True, fp8=True, needs="torchao"),
]
BY_NAME = {r.name: r for r in RUNGS}
LOSS_TOLERANCE = 0.02  # bf16 against fp32 over the check's steps, relative


def installed(need: str | None) -> bool:
    if need is None:
        return True
    modules = FLASH if need == "flash" else (need,)
    return any(importlib.util.find_spec(m) is not None for m in modules)


# --------------------------------------------------------------------------- one rung (in its own process)


def job_config(
    shape_model: dict,
    data: str,
    seq: int,
    micro_batch: int,
    iters: int,
    device: str,
    dtype: str,
    rung: Rung,
    lr: float = 3e-4,
):
    from cookbook.engine.config import build_config

    return build_config(
        {
            "model": {"preset": "tiny", **shape_model},
            "data": {
                "data_path": [data],
                "seq_length": seq,
                "split": "1,0,0",
                "reset_position_ids": rung.documents,
                "reset_attention_mask": rung.documents,
                "eod_mask_loss": rung.documents,
                "eod_id": shape_model["vocab_size"] - 1,
            },
            "optimizer": {"lr": lr, "lr_decay_style": "constant", "weight_decay": 0.1, "clip_grad": 1.0},
            "training": {
                "train_iters": iters,
                "micro_batch_size": micro_batch,
                "global_batch_size": micro_batch,
                "dtype": dtype,
                "device": device,
                "eval_interval": 0,
                "eval_iters": 0,
                "seed": 1234,
                "compile": rung.compile,
                "fp8": rung.fp8,
                "attention_backend": rung.backend,
            },
        }
    )


def write_data(work: str, shape_model: dict, samples: int, seq: int, documents: bool, counting: bool = False) -> str:
    from bench.train import write_random_tokens

    vocab = shape_model["vocab_size"]
    return write_random_tokens(
        Path(work) / "bench_text_document",
        int(samples * (seq + 1) * 1.2) + 2000,
        vocab,
        eod=vocab - 1 if documents else None,
        counting=counting,
    )


def time_steps(step, batches, warmup: int, device) -> tuple[list[float], list[float]]:
    """``step(batch)`` over ``batches``: the first ``warmup`` untimed, then each timed; (times, losses)."""
    import torch

    from bench.train import timed

    losses = [step(b) for b in batches[:warmup]]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)  # the steady state's peak, not compile's
    times = []
    for b in batches[warmup:]:
        seconds, loss = timed(lambda: step(b), device)
        times.append(seconds)
        losses.append(loss)
    return times, losses


def throughput(cfg, seq: int, tokens_per_step: int, times: list[float], device) -> dict:
    from cookbook.engine.metrics import peak_memory_gib, peak_tflops

    median = statistics.median(times)
    tokens_per_s = tokens_per_step / median
    tflops = cfg.flops_per_token(seq) * tokens_per_s / 1e12
    peak = peak_tflops(device)
    return {
        "tokens_per_s": tokens_per_s,
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
        "step_s": median,
        "memory_gib": peak_memory_gib(device),
    }


def run_train(rung: Rung, shape: Shape, device: str) -> dict:
    from cookbook.engine.distributed import shutdown
    from cookbook.engine.trainer import Trainer

    iters = shape.warmup + shape.steps
    with tempfile.TemporaryDirectory(prefix="cookbook-bench-gpu-") as work:
        data = write_data(work, shape.model, iters * shape.micro_batch, shape.seq, rung.documents)
        trainer = Trainer(job_config(shape.model, data, shape.seq, shape.micro_batch, iters, device, "bf16", rung))
        try:
            batches = [[trainer.loader.next()] for _ in range(iters)]
            times, losses = time_steps(lambda b: trainer.train_step(b)[0], batches, shape.warmup, trainer.device)
            result = throughput(trainer.job.model, shape.seq, shape.micro_batch * shape.seq, times, trainer.device)
            result.update(attention=trainer.attention, loss=losses[-1], params=trainer.job.model.num_params())
            if rung.name == "sdpa":  # the layout cookbook plan estimates: one GPU, no recompute
                result["plan_gib"] = plan_estimate(trainer.job.model, shape, trainer.device)
            return result
        finally:
            shutdown()


def plan_estimate(cfg, shape: Shape, device) -> float:
    """``cookbook plan``'s memory per GPU for one GPU, micro batch = global batch, no recompute."""
    import torch

    from cookbook.engine.plan import GPUS, estimate

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    gpu = GPUS["H200"] if "H200" in name else GPUS["H100-80GB"]
    return estimate(
        cfg, shape.seq, shape.micro_batch, gpu, 1, 1, tp=1, pp=1, mode="none", micro_batch=shape.micro_batch
    ).total_gib


def run_hf(rung: Rung, shape: Shape, device: str) -> dict:
    """The same step in HF transformers: the weights the Trainer made, the batches its loader reads."""
    import torch

    from bench.train import HFLoop, build_hf, full_state
    from cookbook.engine.distributed import shutdown
    from cookbook.engine.trainer import Trainer

    iters = shape.warmup + shape.steps
    with tempfile.TemporaryDirectory(prefix="cookbook-bench-gpu-") as work:
        data = write_data(work, shape.model, iters * shape.micro_batch, shape.seq, False)
        trainer = Trainer(job_config(shape.model, data, shape.seq, shape.micro_batch, iters, device, "bf16", rung))
        try:
            batches = [[trainer.loader.next()] for _ in range(iters)]
            state = full_state(trainer.model)
            trainer.model = trainer.optimizer = None  # one model in memory at a time
            hf = HFLoop(*build_hf(trainer, state), trainer.job.optimizer.clip_grad, trainer.device, bf16=True)
            del state
            if trainer.device.type == "cuda":
                torch.cuda.empty_cache()
            times, losses = time_steps(hf.step, batches, shape.warmup, trainer.device)
            result = throughput(trainer.job.model, shape.seq, shape.micro_batch * shape.seq, times, trainer.device)
            result.update(loss=losses[-1])
            return result
        finally:
            shutdown()


def run_loss(rung: Rung, shape: Shape, device: str) -> dict:
    """``loss_steps`` steps of the small model: fp32 on the CPU, then bf16 on ``device`` from the same initial weights
    (a GPU draws other initial values from the same seed, so the CPU's are copied in) on the same batches."""
    from cookbook.engine.distributed import shutdown
    from cookbook.engine.trainer import Trainer

    steps = shape.loss_steps
    with tempfile.TemporaryDirectory(prefix="cookbook-bench-gpu-") as work:
        data = write_data(work, shape.loss_model, steps * 4, shape.loss_seq, rung.documents, counting=True)
        runs = []  # (losses, attention kernel) of the fp32 CPU run, then of the bf16 run on the device
        for where, dtype, backend in (("cpu", "fp32", "sdpa"), (device, "bf16", rung.backend)):
            job = job_config(
                shape.loss_model,
                data,
                shape.loss_seq,
                4,
                steps,
                where,
                dtype,
                Rung(rung.name, "loss", backend=backend, documents=rung.documents),
                lr=1e-3,
            )
            trainer = Trainer(job)
            try:
                if not runs:
                    initial = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
                else:
                    trainer.model.load_state_dict({k: v.to(trainer.device) for k, v in initial.items()})
                losses = [trainer.train_step([trainer.loader.next()])[0] for _ in range(steps)]
                runs.append((losses, trainer.attention))
            finally:
                shutdown()
    (ref, _), (got, attention) = runs
    diffs = [abs(a - b) for a, b in zip(ref, got)]
    relative = max(d / abs(a) for d, a in zip(diffs, ref))
    return {
        "fp32_losses": ref,
        "bf16_losses": got,
        "max_abs_diff": max(diffs),
        "max_rel_diff": relative,
        "attention": attention,
        "ok": relative <= LOSS_TOLERANCE,
    }


def run_generate(rung: Rung, shape: Shape, device: str) -> dict:
    """bench/generate.py on the device (bf16 on a GPU): its cookbook and HF rows and its agreement line."""
    dtype = "bf16" if device == "cuda" else "fp32"
    cmd = [sys.executable, str(ROOT / "bench" / "generate.py"), "--device", device, "--dtype", dtype, *shape.generate]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"bench/generate.py exited {proc.returncode}: {last_line(proc.stderr or proc.stdout)}")
    rows = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^(cookbook|hf)\s+\S+\s+\S+\s+\S+\s+([\d.]+)\s", proc.stdout, re.M)
    }
    if set(rows) != {"cookbook", "hf"}:
        raise RuntimeError(f"bench/generate.py printed no cookbook and hf rows:\n{proc.stdout}")
    same = re.search(r"^same greedy tokens: .*$", proc.stdout, re.M)
    return {
        "tokens_per_s": rows["cookbook"],
        "hf_tokens_per_s": rows["hf"],
        "vs_hf": rows["cookbook"] / rows["hf"],
        "agreement": same.group(0) if same else None,
        "command": " ".join(cmd[1:]),
    }


KINDS = {"train": run_train, "hf": run_hf, "loss": run_loss, "generate": run_generate}


def run_rung(rung: Rung, shape: Shape, device: str) -> dict:
    """One rung's result: status ok | skipped (the engine refused the case: CookbookError) | failed (anything else)."""
    from cookbook.errors import CookbookError

    start = time.perf_counter()
    try:
        result = {"status": "ok", **KINDS[rung.kind](rung, shape, device)}
        if result.get("ok") is False:
            result["status"] = "failed"
    except CookbookError as e:
        result = {"status": "skipped", "note": str(e)}
    except Exception as e:  # an out-of-memory, a compile or kernel failure: this rung's row, not the run's end
        result = {
            "status": "failed",
            "note": f"{type(e).__name__}: {last_line(str(e))}",
            "traceback": traceback.format_exc(),
        }
    result["seconds"] = time.perf_counter() - start
    return result


def last_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


# --------------------------------------------------------------------------- the run


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_isolated(rung: Rung, smoke: bool, timeout: float) -> dict:
    """The rung in a child process (``--child``): a crash or a hang is its row's failure, not the run's."""
    with tempfile.TemporaryDirectory(prefix="cookbook-bench-gpu-") as work:
        out = Path(work) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", rung.name, "--out", str(out)]
        cmd += ["--smoke"] if smoke else []
        start = time.perf_counter()
        # a session of its own: on a timeout the rung's whole process group goes (bench/generate.py's too)
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(), start_new_session=True
        )
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {
                "status": "failed",
                "note": f"timed out after {timeout:g} s",
                "seconds": time.perf_counter() - start,
            }
        if out.is_file():
            return json.loads(out.read_text())
        return {
            "status": "failed",
            "note": f"the process died (exit {proc.returncode}): {last_line(stderr)}",
            "seconds": time.perf_counter() - start,
            "stderr": stderr[-4000:],
        }


def machine(device: str) -> dict:
    import torch

    info = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "device": device,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        info["cuda"] = torch.version.cuda
    for module in (*FLASH, "torchao"):
        if importlib.util.find_spec(module) is not None:
            try:
                info[module] = getattr(importlib.import_module(module), "__version__", "installed")
            except Exception as e:  # a wheel built for another torch
                info[module] = f"does not import: {last_line(str(e))}"
    return info


def derive(results: dict) -> None:
    """Ratios against the HF step, and the memory row, from the rungs' results (in place)."""
    hf = results.get("hf", {})
    for name, r in results.items():
        if BY_NAME.get(name, Rung(name, "")).kind == "train" and r.get("status") == "ok" and hf.get("status") == "ok":
            r["vs_hf"] = r["tokens_per_s"] / hf["tokens_per_s"]
    sdpa = results.get("sdpa", {})
    if sdpa.get("status") == "ok" and sdpa.get("plan_gib"):
        results["memory"] = {
            "status": "ok",
            "memory_gib": sdpa["memory_gib"],
            "plan_gib": sdpa["plan_gib"],
            "note": f"sdpa rung's peak {sdpa['memory_gib']:.1f} GiB; cookbook plan estimates "
            f"{sdpa['plan_gib']:.1f} GiB ({sdpa['plan_gib'] / sdpa['memory_gib']:.2f}x)",
        }


def fmt(value, spec: str, scale: float = 1.0) -> str:
    return "" if value is None else format(value * scale, spec)


def table(results: dict) -> list[str]:
    head = f"{'rung':20s} {'status':8s} {'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s} {'step s':>7s} {'peak GiB':>8s} {'vs hf':>6s}  note"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        note = r.get("note", "")
        if r.get("status") == "ok" and "max_rel_diff" in r:
            note = (
                f"{r['attention']}: max |bf16 - fp32| {r['max_abs_diff']:.2e} ({100 * r['max_rel_diff']:.2f}%) "
                f"over {len(r['fp32_losses'])} steps, fp32 loss {r['fp32_losses'][0]:.3f} -> {r['fp32_losses'][-1]:.3f}"
            )
        elif "max_rel_diff" in r:
            note = f"bf16 off fp32 by {100 * r['max_rel_diff']:.2f}% (> {100 * LOSS_TOLERANCE:g}%)"
        elif r.get("status") == "ok" and "hf_tokens_per_s" in r:
            note = f"HF generate {r['hf_tokens_per_s']:,.0f} tokens/s; {r.get('agreement') or ''}"
        elif r.get("status") == "ok" and "attention" in r:
            note = f"attention {r['attention']}, loss {r['loss']:.3f}"
        mfu = r.get("mfu")
        lines.append(
            f"{name:20s} {r.get('status', ''):8s} {fmt(r.get('tokens_per_s'), ',.0f'):>10s} "
            f"{fmt(r.get('tflops'), '.1f'):>8s} {fmt(mfu, '.1f', 100) + ('%' if mfu is not None else ''):>6s} "
            f"{fmt(r.get('step_s'), '.3f'):>7s} {fmt(r.get('memory_gib'), '.1f'):>8s} "
            f"{fmt(r.get('vs_hf'), '.2f') + ('x' if r.get('vs_hf') is not None else ''):>6s}  {note}"
        )
    return lines


def write_json(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, in this process (seconds)")
    ap.add_argument("--out", default="bench-gpu.json", help="the JSON file (rewritten after every rung)")
    ap.add_argument("--rungs", default=",".join(r.name for r in RUNGS), help="comma-separated rung names")
    ap.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each rung in its own process (default: on, except with --smoke)",
    )
    ap.add_argument("--rung-timeout", type=float, default=300.0, help="seconds one isolated rung may take")
    ap.add_argument(
        "--budget",
        type=float,
        default=420.0,
        help="seconds for the whole run: later rungs are "
        "skipped once it is spent, and an isolated rung stops 30 s after it (0: no limit)",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # run one rung, write its result to --out
    args = ap.parse_args()
    shape, device = (SMOKE, "cpu") if args.smoke else (FULL, "cuda")
    out = Path(args.out)

    if args.child:
        write_json(out, run_rung(BY_NAME[args.child], shape, device))
        return 0

    names = [n.strip() for n in args.rungs.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        print(f"error: unknown rung(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}", file=sys.stderr)
        return 2
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        print(
            "error: no CUDA device here; bench/gpu.sh measures a GPU (--smoke runs its tiny CPU version)",
            file=sys.stderr,
        )
        return 2
    isolate = (not args.smoke) if args.isolate is None else args.isolate
    payload = {"machine": machine(device), "shape": asdict(shape), "smoke": args.smoke, "rungs": {}}
    results = payload["rungs"]
    print(
        f"bench/gpu.py: {len(names)} rungs on {payload['machine'].get('gpu', device)}, torch {torch.__version__}"
        f"{' (smoke: tiny shapes, CPU)' if args.smoke else ''}; {'one process per rung' if isolate else 'in this process'}",
        flush=True,
    )
    begin = time.perf_counter()
    for name in names:
        rung = BY_NAME[name]
        if not installed(rung.needs):
            results[name] = {"status": "skipped", "note": INSTALL[rung.needs]}
        elif args.smoke and rung.compile:
            results[name] = {"status": "skipped", "note": "--smoke does not compile (minutes on a CPU)"}
        elif args.budget and time.perf_counter() - begin > args.budget:
            results[name] = {
                "status": "skipped",
                "note": f"the run's budget of {args.budget:g} s is spent (--rungs to run it)",
            }
        elif isolate:
            left = args.budget - (time.perf_counter() - begin) + 30 if args.budget else float("inf")
            results[name] = run_isolated(rung, args.smoke, min(args.rung_timeout, left))
        else:
            results[name] = run_rung(rung, shape, device)
        r = results[name]
        print(
            f"[{time.perf_counter() - begin:4.0f} s] {name}: {r['status']}"
            + (f" in {r['seconds']:.0f} s" if "seconds" in r else "")
            + (f" ({r['note']})" if r.get("note") else ""),
            flush=True,
        )
        derive(results)
        write_json(out, payload)
    payload["seconds"] = time.perf_counter() - begin
    write_json(out, payload)
    print()
    for line in table(results):
        print(line)
    print(f"\n{len(names)} rungs in {payload['seconds']:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
