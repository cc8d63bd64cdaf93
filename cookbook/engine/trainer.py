"""The one training loop: pretrain, extend, distill and pruning's heal step all run it.

One iteration (``train_step``) consumes the global batch = micro batch x data-parallel size x
accumulation steps: each micro batch's mean token loss, divided by the accumulation steps, is
back-propagated; FSDP2 averages gradients over data-parallel ranks; the global gradient norm is
clipped; AdamW steps with the LR the schedule gives for this iteration. ``train`` is the loop
around it: data, logging, periodic eval, checkpoints, SIGTERM, a non-finite loss.

Everything resume needs is the model and optimizer state (DCP), the iteration count (the LR is a
function of it), the data position (consumed samples) and the RNG state, so a resumed run
continues bitwise where it stopped.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from rich.markup import escape

from cookbook.data.gpt_dataset import DocumentFlags, document_inputs
from cookbook.data.loader import BatchLoader, build_splits, document_flags, split_sizes
from cookbook.engine import checkpoint
from cookbook.engine.attention import resolve_backend
from cookbook.engine.config import DataConfig, JobConfig, ParallelDims, build_config
from cookbook.engine.context_parallel import check_cp, shard_positions, shard_sequence
from cookbook.engine.distributed import all_reduce_max, init_distributed
from cookbook.engine.float8 import check_fp8
from cookbook.engine.loss import IGNORE, cross_entropy, kd_loss
from cookbook.engine.metrics import MetricsLogger, peak_memory_gib, peak_tflops, trim_metrics
from cookbook.engine.optim import LRSchedule, build_optimizer, clip_grad_norm, set_lr
from cookbook.engine.parallelize import DTYPES, Speedups, build_model, check_tp
from cookbook.engine.pipeline import (
    broadcast_from_last_stage,
    build_pipeline_model,
    build_schedule,
    check_pipeline,
    clip_grad_norm_pp,
    pipeline_eval,
    pipeline_step,
)
from cookbook.engine.precision import choose_dtype
from cookbook.engine.recompute import check_recompute
from cookbook.errors import CookbookError, on_interrupt
from cookbook.model.config import ModelConfig, megatron_flops_per_iteration
from cookbook.progress import Tally, console


class NextTokens(NamedTuple):
    """One micro batch as the model and the loss take it (``next_token_inputs``)."""

    inputs: torch.Tensor
    targets: torch.Tensor  # IGNORE where the loss is masked
    positions: torch.Tensor | None  # None: 0, 1, ...
    documents: torch.Tensor | None  # the whole sequence's document ids [b, S], also under context parallel
    tokens: torch.Tensor | None  # what this rank divides its loss sum by; None: its scored tokens

    def model_kwargs(self) -> dict:
        """The model's keyword arguments (``documents`` only when given: a plain model takes none)."""
        return {"documents": self.documents} if self.documents is not None else {}


def next_token_inputs(
    batch: torch.Tensor, cp_rank: int = 0, cp: int = 1, documents: DocumentFlags | None = None
) -> NextTokens:
    """Predicting ``batch[:, 1:]`` from ``batch[:, :-1]``, with Megatron-LM's packed-document flags when given
    (``document_inputs``). Under context parallel this cp rank's share of the tokens, targets and positions
    (as ``shard_batch``); each rank then divides its loss sum by the batch's scored tokens / cp, so that the mean over
    the cp ranks is the batch's mean (the ranks score equally many tokens unless the loss is masked)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    positions = ids = keep = tokens = None
    if documents is not None:
        positions, ids, keep = document_inputs(inputs, documents)
    if keep is not None:
        targets = targets.masked_fill(~keep, IGNORE)
        if cp > 1:
            tokens = keep.sum().clamp(min=1) / cp
    if cp == 1:
        return NextTokens(inputs, targets, positions, ids, tokens)
    if positions is None:
        positions = shard_positions(inputs.shape[1], cp_rank, cp, inputs.device)
    else:
        positions = shard_sequence(positions, cp_rank, cp)
    return NextTokens(shard_sequence(inputs, cp_rank, cp), shard_sequence(targets, cp_rank, cp), positions, ids, tokens)


def next_token_loss(
    model, batch: torch.Tensor, cp_rank: int = 0, cp: int = 1, documents: DocumentFlags | None = None
) -> torch.Tensor:
    """Mean cross-entropy of predicting ``batch[:, 1:]`` from ``batch[:, :-1]`` (fp32, chunked)."""
    x = next_token_inputs(batch, cp_rank, cp, documents)
    return cross_entropy(model(x.inputs, x.positions, **x.model_kwargs()), x.targets, tokens=x.tokens)


def find_teacher(job: JobConfig) -> tuple[Path, ModelConfig] | None:
    """``--kd-teacher``'s checkpoint and model config, refused unless its vocabulary is the student's."""
    t = job.training
    if not t.kd_teacher:
        return None
    ckpt = checkpoint.find_checkpoint(t.kd_teacher)
    if ckpt is None:
        raise CookbookError(
            f"--kd-teacher {t.kd_teacher} holds no cookbook checkpoint (convert a HF model with cookbook convert --to cookbook)"
        )
    sections = checkpoint.read_config(ckpt)
    cfg = build_config({"model": sections["model"]}).model
    if cfg.vocab_size != job.model.vocab_size:
        raise CookbookError(
            f"--kd-teacher {t.kd_teacher} has a vocabulary of {cfg.vocab_size}, the student {job.model.vocab_size}: logit "
            "distillation needs one tokenizer (and padding) for both"
        )
    check_same_tokenizer(sections.get("data", {}), job.data, t.kd_teacher)
    return ckpt, cfg


def check_same_tokenizer(teacher_data: dict, student: DataConfig, teacher: str) -> None:
    """Refuse a teacher whose recorded tokenizer reads ids differently from the student's (when both record one)."""
    from cookbook.data.tokenizer import load_tokenizer, tokenizer_difference

    theirs, ours = teacher_data.get("tokenizer_model"), student.tokenizer_model
    if not theirs or not ours or Path(theirs).resolve() == Path(ours).resolve():
        return
    if not Path(theirs).exists():
        console.print(
            f"[yellow]--kd-teacher {teacher}'s tokenizer {theirs} is not here: only its vocabulary size was checked[/yellow]"
        )
        return
    difference = tokenizer_difference(
        load_tokenizer(theirs, teacher_data.get("tokenizer_type")), load_tokenizer(ours, student.tokenizer_type)
    )
    if difference:
        raise CookbookError(
            f"--kd-teacher {teacher} uses another tokenizer than the student ({difference}); logit distillation needs one "
            "tokenizer for both: distil with synthetic text instead (cookbook distill generate, then distill train without --kd-teacher)"
        )


def check_layout(job: JobConfig, dims: ParallelDims) -> tuple[int, int]:
    """Everything about a job's layout that can be checked without devices; returns (global batch,
    accumulation steps). ``cookbook pretrain --dry-run`` runs it for a world size given by hand."""
    t = job.training
    if job.data.seq_length > job.model.max_seq_len and job.model.rope_type != "dynamic":  # dynamic NTK grows past it
        raise CookbookError(
            f"--seq-length {job.data.seq_length} is longer than the model's context, --max-position-embeddings "
            f"{job.model.max_seq_len}: raise --max-position-embeddings for a new model, or extend a trained "
            "model's context with cookbook extend"
        )
    per_step = t.micro_batch_size * dims.dp
    global_batch = t.global_batch_size or per_step
    if global_batch % per_step:
        raise CookbookError(
            f"global batch {global_batch} is not a multiple of micro batch {t.micro_batch_size} x data-parallel size {dims.dp}"
        )
    accumulation = global_batch // per_step
    virtual = check_pipeline(job.model, dims.pp, dims.layers_per_virtual_stage, accumulation)
    # under pipeline parallel, --recompute-num-layers counts the layers of each stage, as in Megatron-LM
    check_recompute(
        t.recompute_granularity, t.recompute_method, t.recompute_num_layers, job.model.num_layers // (dims.pp * virtual)
    )
    check_tp(job.model, dims.tp)
    if t.fp8:
        check_fp8(dims.tp)
    check_cp(job.data.seq_length, dims.cp)
    if t.kd_teacher and dims.pp > 1:
        raise CookbookError(
            "--kd-teacher with pipeline parallel is not supported yet; distil with data, tensor and context parallel"
        )
    if dims.cp > 1 and dims.pp > 1:
        raise CookbookError(
            "context parallel with pipeline parallel is not supported yet; use one of them with data and tensor parallel"
        )
    if dims.sequence_parallel and job.data.seq_length // dims.cp % dims.tp:
        raise CookbookError(
            f"--seq-length {job.data.seq_length} must be divisible by the context-parallel x tensor-parallel "
            f"size {dims.cp * dims.tp} under --sequence-parallel"
        )
    return global_batch, accumulation


class Trainer:
    def __init__(self, job: JobConfig, load: Path | None = None):
        self.job = job
        t, data = job.training, job.data
        self.dist = init_distributed(t.device)
        self.device = self.dist.device
        # --dtype auto becomes what this device computes fast; the job (and its saves) record the choice
        t.dtype, self.dtype_reason = choose_dtype(t.dtype, self.device)
        self.dims = job.parallel.resolve(self.dist.world_size)
        self.mesh = self.dims.build_mesh(self.device.type)
        self.dp_rank = self.mesh.get_local_rank("dp_replicate") * self.dims.dp_shard + self.mesh.get_local_rank(
            "dp_shard"
        )
        self.cp_rank = self.mesh.get_local_rank("cp")

        self.global_batch, self.accumulation = check_layout(job, self.dims)
        # the data first: a bad --data-path fails before the model is built
        sizes = split_sizes(t.train_iters, self.global_batch, t.eval_interval, t.eval_iters)
        notes: list[str] = []
        self.splits = build_splits(data.data_path, data.split, data.seq_length, t.seed, sizes, notes)
        for note in notes if self.dist.is_main else []:
            console.print(f"[yellow]{escape(note)}[/yellow]")
        self.loader = self._loader(self.splits["train"])
        self.documents = document_flags(data, job.model.vocab_size)  # packed-document flags, None when off
        self.attention = self._attention_backend(job.model)
        self.step = 0

        teacher = find_teacher(job)  # before the model: a wrong teacher fails fast
        torch.manual_seed(t.seed)
        if t.fp8:
            check_fp8(self.dims.tp, self.device)
        speedups = Speedups(
            t.recompute_granularity, t.recompute_method, t.recompute_num_layers, t.compile, t.fp8, self.attention
        )
        self.pipeline = None  # the pipeline schedule when pp > 1: it runs forward and backward over the micro batches
        if self.dims.pp > 1:
            self.model = build_pipeline_model(job.model, self.mesh, self.dims, self.device, t.dtype, t.seed, speedups)
            self.pipeline = build_schedule(
                self.model.chunks,
                self.mesh["pp"],
                self.accumulation,
                cross_entropy,
                "Interleaved1F1B" if len(self.model.chunks) > 1 else "1F1B",
                self.device,
            )
        else:
            self.model = build_model(job.model, self.mesh, self.dims, self.device, t.dtype, t.seed, speedups)
        self.optimizer = build_optimizer(self.model, job.optimizer)
        self.teacher = None  # --kd-teacher: the same layout, its weights loaded, no gradients
        self.kd_parts: list[float] = []  # with a teacher: the last iteration's [CE, KL]
        if teacher is not None:
            self.teacher = build_model(
                teacher[1],
                self.mesh,
                self.dims,
                self.device,
                t.dtype,
                t.seed,
                Speedups(attention=self._attention_backend(teacher[1])),
            )
            checkpoint.load(teacher[0], self.teacher)
            self.teacher.eval().requires_grad_(False)
        # bf16 in a world of one (no FSDP): autocast; with FSDP its mixed-precision policy casts instead
        self.autocast = t.dtype == "bf16" and self.mesh.size() == 1
        self.lr_schedule = LRSchedule(job.optimizer, t.train_iters, self.global_batch)

        if load is not None:
            self._load(load, finetune=job.checkpoint.finetune)
        self.checkpointer = (
            checkpoint.Checkpointer(job.checkpoint.save, job.checkpoint.keep_last, self.dist.is_main)
            if job.checkpoint.save
            else None
        )
        self._stop_signal = False

    def _attention_backend(self, cfg: ModelConfig) -> str:
        """The kernel ``--attention-backend`` resolves to for this device, precision and model (``attention.py``)."""
        within = self.documents is not None and self.documents.reset_attention_mask
        return resolve_backend(
            self.job.training.attention_backend,
            self.device,
            DTYPES[self.job.training.dtype],
            cfg.head_dim,
            documents=within,
        )

    def _loader(self, samples, consumed: int = 0) -> BatchLoader:
        t = self.job.training
        return BatchLoader(samples, t.micro_batch_size, self.dp_rank, self.dims.dp, self.job.model.vocab_size, consumed)

    # ------------------------------------------------------------------ state

    def train_state(self) -> dict:
        return {
            "step": self.step,
            "consumed_samples": self.loader.consumed_samples,
            "global_batch_size": self.global_batch,
            "rng": checkpoint.rng_state(),
        }

    def _load(self, ckpt: Path, finetune: bool) -> None:
        if finetune:  # a new run from these weights: fresh optimizer, step 0, data from the start
            checkpoint.load(ckpt, self.model)
            if self.dist.is_main:
                console.print(f"finetuning from the weights of {ckpt}")
            return
        checkpoint.load(ckpt, self.model, self.optimizer)
        state = checkpoint.read_train_state(ckpt)
        self.step = int(state["step"])
        self.loader.load_state_dict(state)
        checkpoint.set_rng_state(state["rng"])
        if self.dist.is_main:
            if self.job.checkpoint.save:  # the steps after this save are trained again: their records go
                trim_metrics(self.job.checkpoint.save, self.step)
            console.print(
                f"resumed from {ckpt} at step {self.step} ({self.loader.consumed_samples:,} samples consumed)"
            )

    def save(self) -> Path | None:
        if self.checkpointer is None:
            return None
        return self.checkpointer.save(self.step, self.model, self.optimizer, self.job.to_dict(), self.train_state())

    # ------------------------------------------------------------------ one iteration

    def train_step(self, micro_batches: list[torch.Tensor]) -> tuple[float, float, float]:
        """One optimizer step over the global batch; returns (loss, grad norm, lr)."""
        self.model.train()
        lr = self.lr_schedule(self.step)
        set_lr(self.optimizer, lr)
        if self.pipeline is not None:  # the schedule averages the micro batches' gradients (scale_grads)
            total = self._pipeline_loss(pipeline_step, micro_batches)
        else:
            total = torch.zeros((), device=self.device)
            parts = torch.zeros(2, device=self.device)  # with a teacher: the mean CE and KL of the batch
            for batch in micro_batches:
                with self._precision():
                    loss, split = self._loss(batch.to(self.device, non_blocking=True), distil=True)
                    loss = loss / len(micro_batches)
                loss.backward()
                total += loss.detach()
                if split is not None:
                    parts += split / len(micro_batches)
            if self.teacher is not None:
                self._average_over_ranks(parts)
                self.kd_parts = parts.tolist()
        self._average_over_ranks(total)
        if self.pipeline is not None:
            grad_norm = clip_grad_norm_pp(self.model.parameters(), self.job.optimizer.clip_grad, self.mesh["pp"])
        else:
            grad_norm = clip_grad_norm(self.model.parameters(), self.job.optimizer.clip_grad)
        loss_value, norm_value = total.item(), float(grad_norm)
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            self.optimizer.zero_grad(set_to_none=True)
            raise CookbookError(
                f"training diverged at iteration {self.step + 1}: loss {loss_value}, grad norm {norm_value}; stopped before "
                "the update, the last checkpoint is intact: resume from it with a lower --lr or a smaller --clip-grad"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, norm_value, lr

    @torch.no_grad()
    def evaluate(self, split: str = "valid") -> float | None:
        """Mean loss over ``eval_iters`` global batches of a split (the same samples every time)."""
        samples = self.splits.get(split)
        if samples is None or self.job.training.eval_iters <= 0:
            return None
        self.model.eval()
        loader = self._loader(samples)
        total = torch.zeros((), device=self.device)
        iters = self.job.training.eval_iters
        for _ in range(iters):
            micro_batches = [loader.next() for _ in range(self.accumulation)]
            if self.pipeline is not None:
                total += self._pipeline_loss(pipeline_eval, micro_batches)
                continue
            for batch in micro_batches:
                with self._precision():
                    total += self._loss(batch.to(self.device))[0] / self.accumulation
        total /= iters
        self._average_over_ranks(total)
        return total.item()

    def _loss(self, batch: torch.Tensor, distil: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss, None): cross-entropy; in training with a teacher, ((1 - r) CE + r KL(teacher || student), [CE, KL]
        detached, for the log) (evaluation: CE alone)."""
        x = next_token_inputs(batch, self.cp_rank, self.dims.cp, self.documents)
        logits = self.model(x.inputs, x.positions, **x.model_kwargs())
        ce = cross_entropy(logits, x.targets, tokens=x.tokens)
        if not (distil and self.teacher is not None):
            return ce, None
        t = self.job.training
        with torch.no_grad():
            teacher_logits = self.teacher(x.inputs, x.positions, **x.model_kwargs())
        kl = kd_loss(logits, teacher_logits, t.kd_temperature, targets=x.targets, tokens=x.tokens)
        return (1 - t.kd_ratio) * ce + t.kd_ratio * kl, torch.stack([ce.detach(), kl.detach()])

    def _pipeline_loss(self, run, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """``run`` (pipeline_step or pipeline_eval) over the micro batches, one after the other along the batch
        dimension; the mean micro-batch loss, sent from the last stage to every pipeline rank."""
        x = next_token_inputs(torch.cat(micro_batches).to(self.device, non_blocking=True), documents=self.documents)
        loss = run(
            self.pipeline,
            x.inputs,
            x.targets,
            self.model.is_first,
            self.model.is_last,
            positions=x.positions,
            **x.model_kwargs(),
        )
        return broadcast_from_last_stage(loss, self.mesh["pp"], self.device)

    def _precision(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()

    def _average_over_ranks(self, value: torch.Tensor) -> None:
        """In place, over every rank: the tensor-parallel and pipeline ranks of a data-parallel group hold the
        same loss and the context-parallel ranks the same number of tokens, so this is the global batch's mean.
        SUM then divide (gloo lacks AVG on some versions)."""
        if self.dist.world_size > 1:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.dist.world_size

    # ------------------------------------------------------------------ the loop

    def _on_sigterm(self, signum, frame) -> None:
        self._stop_signal = True

    def interrupt_note(self) -> str:
        """What an interrupt keeps, and how to continue."""
        if not self.checkpointer:
            return f"after step {self.step}; nothing saved (no --save)"
        saves = self.checkpointer.saves()
        if not saves:
            return f"after step {self.step}, before the first save: nothing saved"
        save = self.job.checkpoint.save
        same = self.job.checkpoint.load and Path(self.job.checkpoint.load).resolve() == Path(save).resolve()
        how = "run the same command to continue" if same else f"continue with --load {save} --save {save}"
        return f"after step {self.step}; the last save is {saves[-1]}; {how}"

    def train(self) -> dict:
        """Train to ``train_iters``; returns the last logged record. Ctrl-C ends it with a line saying what was kept."""
        with on_interrupt(self.interrupt_note):
            return self._train()

    def _train(self) -> dict:
        t = self.job.training
        main = self.dist.is_main
        logger = MetricsLogger(self.job.checkpoint.save, enabled=main, tensorboard_dir=t.tensorboard_dir)
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        seq = self.job.data.seq_length
        flops_per_token = self.job.model.flops_per_token(seq)
        megatron_flops = megatron_flops_per_iteration(self.job.model, self.global_batch, seq)
        peak = peak_tflops(self.device)
        record: dict = {}
        losses: list[float] = []
        kd_parts: list[list[float]] = []  # with a teacher: [CE, KL] per iteration, logged next to the loss
        last_eval = -1
        first = self.step + 1  # logged whatever the interval: a first line within seconds of the start
        tick = time.perf_counter()
        counter = Tally("step", t.train_iters, done=self.step, every=None, enabled=main)  # a bar on a terminal
        try:
            while self.step < t.train_iters:
                micro = [self.loader.next() for _ in range(self.accumulation)]
                loss, grad_norm, lr = self.train_step(micro)
                self.step += 1
                losses.append(loss)
                if self.teacher is not None:
                    kd_parts.append(self.kd_parts)
                counter.update(self.step)

                if self.step % t.log_interval == 0 or self.step in (first, t.train_iters):
                    if self.device.type == "cuda":
                        torch.cuda.synchronize()
                    elapsed = time.perf_counter() - tick
                    iters = len(losses)
                    tokens_per_s = iters * self.global_batch * seq / elapsed
                    tflops = flops_per_token * tokens_per_s / self.dist.world_size / 1e12
                    record = {
                        "step": self.step,
                        "loss": sum(losses) / iters,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens_per_s": tokens_per_s,
                        "tflops": tflops,
                        "tflops_megatron": megatron_flops * iters / elapsed / self.dist.world_size / 1e12,
                        "mfu": tflops / peak if peak else None,
                        "memory_gib": peak_memory_gib(self.device),
                        "consumed_samples": self.loader.consumed_samples,
                        "seconds_per_step": elapsed / iters,
                        "attention": self.attention,
                    }
                    mfu = f"{100 * record['mfu']:.1f}%" if peak else "n/a"
                    loss_text = f"loss {record['loss']:.4f}"
                    if kd_parts:  # the loss is a mix: say of what
                        record["ce"], record["kl"] = (sum(p[k] for p in kd_parts) / len(kd_parts) for k in (0, 1))
                        loss_text += (
                            f" = {1 - t.kd_ratio:g} x CE {record['ce']:.4f} + {t.kd_ratio:g} x KL {record['kl']:.4f}"
                        )
                        kd_parts = []
                    logger.log(
                        record,
                        (
                            f"step {self.step:>6}/{t.train_iters}  {loss_text}  lr {lr:.3e}  grad norm {grad_norm:.3f}  "
                            f"{tokens_per_s:,.0f} tokens/s  {tflops:.3g} TFLOP/s/device  MFU {mfu}  mem {record['memory_gib']:.2f} GiB"
                        ),
                    )
                    losses = []

                if t.eval_interval and self.step % t.eval_interval == 0:
                    self._log_eval(logger)
                    last_eval = self.step

                stop = all_reduce_max(float(self._stop_signal), self.device) > 0
                if self.checkpointer and (
                    stop
                    or self.step == t.train_iters
                    or (self.job.checkpoint.save_interval and self.step % self.job.checkpoint.save_interval == 0)
                ):
                    path = self.save()
                    if main:
                        console.print(f"saved {path}")
                if stop:
                    if main:
                        console.print(
                            f"[yellow]SIGTERM: stopped after step {self.step}[/yellow]"
                            + (f"; resume with --load {self.job.checkpoint.save}" if self.checkpointer else "")
                        )
                    break
                if not losses:  # an interval just ended: eval and save time do not count as training
                    tick = time.perf_counter()
            if not self._stop_signal and last_eval != self.step and t.eval_interval:
                self._log_eval(logger)
        finally:
            counter.close()
            signal.signal(signal.SIGTERM, previous)
            logger.close()
        return record

    def _log_eval(self, logger: MetricsLogger) -> None:
        loss = self.evaluate("valid")
        if loss is None:
            return
        ppl = math.exp(min(loss, 50.0))
        what = "valid CE" if self.teacher is not None else "valid loss"  # with a teacher the training loss is a mix
        logger.log(
            {"step": self.step, "split": "valid", "loss": loss, "ppl": ppl},
            f"[cyan]step {self.step:>6}  {what} {loss:.4f}  ppl {ppl:.3f}[/cyan]",
        )
