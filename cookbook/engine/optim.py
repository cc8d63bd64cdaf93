"""AdamW, its parameter groups, gradient clipping, and Megatron-LM's learning-rate schedule.

The schedule is Megatron-LM's ``OptimizerParamScheduler``, float for float. Megatron counts in
samples: with B the global batch size, iteration ``step`` (0-based count of completed iterations)
uses s = step * B, warmup W = lr_warmup_iters * B (or lr_warmup_fraction * D), decay D =
lr_decay_iters * B, and WSD anneal A = lr_wsd_decay_iters * B. Then, in this order::

    W > 0 and s <= W       lr = lr_warmup_init + (lr - lr_warmup_init) * s / W
    constant               lr = lr
    s > D                  lr = min_lr
    inverse-square-root    lr = max(min_lr, lr * sqrt(max(W, 1)) / sqrt(max(s, 1)))
    otherwise              lr = min_lr + coeff * (lr - min_lr), with r = (s - W) / (D - W) and
        linear   coeff = 1 - r
        cosine   coeff = (1 + cos(pi * r)) / 2
        WSD      coeff = 1 while s <= D - A, then with q = (s - (D - A)) / A:
                 linear 1 - q | cosine (1 + cos(pi * q)) / 2 | exponential 2 * 0.5**q - 1 |
                 minus_sqrt 1 - sqrt(q)

The schedule holds no state: the Trainer's step count is the whole of it, so resume is exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from cookbook.engine.config import OptimizerConfig
from cookbook.errors import CookbookError

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")


class LRSchedule:
    """``LRSchedule(cfg, train_iters)(step)`` is the learning rate iteration ``step`` trains with.

    ``global_batch_size`` only matters where Megatron's sample counting shows through: float
    rounding, and inverse-square-root without warmup (which decays as 1/sqrt(samples)).
    """

    def __init__(self, cfg: OptimizerConfig, train_iters: int, global_batch_size: int = 1):
        if cfg.lr_decay_style not in DECAY_STYLES:
            raise CookbookError(
                f"Unknown --lr-decay-style {cfg.lr_decay_style!r}; use one of {', '.join(DECAY_STYLES)}."
            )
        if cfg.lr_wsd_decay_style not in WSD_DECAY_STYLES:
            raise CookbookError(
                f"Unknown --lr-wsd-decay-style {cfg.lr_wsd_decay_style!r}; use one of {', '.join(WSD_DECAY_STYLES)}."
            )
        if not 0.0 <= cfg.min_lr <= cfg.lr:
            raise CookbookError(f"--min-lr ({cfg.min_lr}) must be between 0 and --lr ({cfg.lr}).")
        if not 0.0 <= cfg.lr_warmup_init <= cfg.lr:
            raise CookbookError(f"--lr-warmup-init ({cfg.lr_warmup_init}) must be between 0 and --lr ({cfg.lr}).")
        if global_batch_size < 1:
            raise CookbookError(f"The global batch size must be at least 1, not {global_batch_size}.")
        decay_iters = train_iters if cfg.lr_decay_iters is None else cfg.lr_decay_iters
        if decay_iters is None or decay_iters <= 0:
            raise CookbookError(f"--lr-decay-iters (or --train-iters) must be positive, not {decay_iters}.")
        if cfg.lr_warmup_iters < 0:
            raise CookbookError(f"--lr-warmup-iters must not be negative, not {cfg.lr_warmup_iters}.")
        if cfg.lr_warmup_fraction is not None:
            if cfg.lr_warmup_iters:
                raise CookbookError("Set either --lr-warmup-iters or --lr-warmup-fraction, not both.")
            if not 0.0 <= cfg.lr_warmup_fraction < 1.0:
                raise CookbookError(f"--lr-warmup-fraction must be in [0, 1), not {cfg.lr_warmup_fraction}.")

        # Exactly Megatron-LM's training.get_optimizer_param_scheduler: everything in samples.
        self.max_lr, self.min_lr, self.init_lr = float(cfg.lr), cfg.min_lr, cfg.lr_warmup_init
        self.style, self.wsd_style = cfg.lr_decay_style, cfg.lr_wsd_decay_style
        self.batch = global_batch_size
        self.decay_steps = decay_iters * global_batch_size
        if cfg.lr_warmup_fraction is not None:
            self.warmup_steps = cfg.lr_warmup_fraction * self.decay_steps
        else:
            self.warmup_steps = cfg.lr_warmup_iters * global_batch_size
        if self.warmup_steps >= self.decay_steps:
            raise CookbookError(
                f"The warmup ({self.warmup_steps / global_batch_size:g} iterations) must end before the decay "
                f"does ({decay_iters} iterations); shorten the warmup or raise --lr-decay-iters."
            )
        self.wsd_steps = None
        if self.style == "WSD":
            wsd = cfg.lr_wsd_decay_iters
            if wsd is None or wsd <= 0:
                raise CookbookError("--lr-decay-style WSD needs a positive --lr-wsd-decay-iters (the anneal length).")
            self.wsd_steps = wsd * global_batch_size
            if self.wsd_steps > self.decay_steps - self.warmup_steps:
                raise CookbookError(
                    f"--lr-wsd-decay-iters ({wsd}) must fit between the end of warmup and "
                    f"--lr-decay-iters ({decay_iters})."
                )

    def __call__(self, step: int) -> float:
        s = step * self.batch
        max_lr, min_lr, w, d = self.max_lr, self.min_lr, self.warmup_steps, self.decay_steps
        if w > 0 and s <= w:
            return self.init_lr + ((max_lr - self.init_lr) * float(s) / float(w))
        if self.style == "constant":
            return max_lr
        if s > d:
            return min_lr
        if self.style == "inverse-square-root":
            return max(min_lr, max_lr * max(w, 1) ** 0.5 / (max(s, 1) ** 0.5))
        if self.style == "WSD":
            anneal_start = d - self.wsd_steps
            if s <= anneal_start:
                coeff = 1.0
            else:
                coeff = _anneal(self.wsd_style, float(s - anneal_start) / float(self.wsd_steps))
        else:
            coeff = _anneal(self.style, float(s - w) / float(d - w))
        return min_lr + coeff * (max_lr - min_lr)


def _anneal(style: str, r: float) -> float:
    """The fraction of (lr - min_lr) left after a fraction ``r`` of the decay."""
    if style == "linear":
        return 1.0 - r
    if style == "cosine":
        return 0.5 * (math.cos(math.pi * r) + 1.0)
    if style == "exponential":
        return (2.0 * math.pow(0.5, r)) - 1.0
    return 1.0 - math.sqrt(r)  # minus_sqrt


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Megatron-LM's default groups: no decay for biases and 1-D tensors (norms), decay for the rest.

    A tensor shared by two modules (tied embeddings) appears once. DTensors group by logical shape.
    """
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    """torch AdamW over ``param_groups``: the fused kernel (CUDA and CPU), ``foreach`` on other devices."""
    groups = param_groups(model, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(p.device.type in ("cuda", "cpu") for p in params)
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        **({"fused": True} if fused else {"foreach": True}),
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grad_norm(model_or_params: torch.nn.Module | Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The total L2 norm of all gradients (before clipping), as an fp32 tensor; clips if max_norm > 0.

    With FSDP2 the gradients are sharded DTensors: their norm is reduced across ranks
    (``full_tensor``) before the clip coefficient is formed, as torchtitan does.
    """
    if isinstance(model_or_params, torch.nn.Module):
        params = list(model_or_params.parameters())
    else:
        params = list(model_or_params)
    from torch.distributed.tensor import DTensor  # here: importing it costs a second, and `pretrain --help` needs none

    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm.float()
