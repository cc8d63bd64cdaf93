"""The optimizer pieces: the LR schedule is megatron-core's ``OptimizerParamScheduler`` float for
float, AdamW's param groups are Megatron-LM's (no decay for biases and norms, tied weights once),
bad schedules fail with one sentence, and gradient clipping reports and applies the true norm,
also for FSDP2's sharded DTensor gradients in a real two-process run."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from cookbook.engine.config import OptimizerConfig
from cookbook.engine.optim import LRSchedule, build_optimizer, clip_grad_norm, set_lr
from cookbook.errors import CookbookError

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def megatron_lrs(cfg: OptimizerConfig, train_iters: int, gbs: int, n: int) -> list[float]:
    """The LR of iterations 0..n-1 in Megatron-LM: the scheduler built as training.py's
    get_optimizer_param_scheduler builds it (steps in samples), stepped by the global batch."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    decay_iters = train_iters if cfg.lr_decay_iters is None else cfg.lr_decay_iters
    lr_decay_steps = decay_iters * gbs
    if cfg.lr_warmup_fraction is not None:
        lr_warmup_steps = cfg.lr_warmup_fraction * lr_decay_steps
    else:
        lr_warmup_steps = cfg.lr_warmup_iters * gbs
    wsd = None if cfg.lr_wsd_decay_iters is None else cfg.lr_wsd_decay_iters * gbs
    sched = OptimizerParamScheduler(
        opt,
        init_lr=cfg.lr_warmup_init,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=lr_warmup_steps,
        lr_decay_steps=lr_decay_steps,
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=train_iters * gbs,
        wd_incr_style="constant",
        wsd_decay_steps=wsd,
        lr_wsd_decay_style=cfg.lr_wsd_decay_style,
    )
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])  # what this iteration trains with
        sched.step(increment=gbs)  # after the iteration, as train_step does
    return lrs


C = OptimizerConfig(lr=3e-4, min_lr=3e-5)
SCHEDULES = {
    "constant+warmup": replace(C, lr_decay_style="constant", lr_warmup_iters=7),
    "constant": replace(C, lr_decay_style="constant"),
    "linear+warmup": replace(C, lr_decay_style="linear", lr_warmup_iters=5),
    "linear+fraction-non-integer": replace(C, lr_decay_style="linear", lr_warmup_fraction=0.07, lr_decay_iters=43),
    "cosine": replace(C, lr_decay_style="cosine"),
    "cosine+warmup+init": replace(C, lr_decay_style="cosine", lr_warmup_iters=10, lr_warmup_init=1e-5),
    "cosine+fraction": replace(C, lr_decay_style="cosine", lr_warmup_fraction=0.1),
    "cosine+short-decay": replace(C, lr_decay_style="cosine", lr_warmup_iters=4, lr_decay_iters=30),
    "cosine+min_lr=0": replace(C, lr_decay_style="cosine", min_lr=0.0, lr_warmup_iters=3),
    "isqrt+warmup": replace(C, lr_decay_style="inverse-square-root", lr_warmup_iters=6),
    "isqrt+no-warmup": replace(C, lr_decay_style="inverse-square-root", min_lr=0.0),
    "isqrt+short-decay": replace(C, lr_decay_style="inverse-square-root", lr_warmup_iters=3, lr_decay_iters=25),
    **{
        f"WSD-{sub}": replace(C, lr_decay_style="WSD", lr_wsd_decay_style=sub, lr_warmup_iters=5, lr_wsd_decay_iters=20)
        for sub in ("linear", "cosine", "exponential", "minus_sqrt")
    },
    "WSD+fraction+short-decay": replace(
        C,
        lr_decay_style="WSD",
        lr_wsd_decay_style="cosine",
        lr_warmup_fraction=0.05,
        lr_decay_iters=40,
        lr_wsd_decay_iters=11,
        lr_warmup_init=2e-6,
    ),
}
TRAIN_ITERS = 60


@pytest.mark.parametrize("gbs", [1, 8, 3])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_equals_megatron_at_every_iteration(name, gbs):
    cfg = SCHEDULES[name]
    n = TRAIN_ITERS + 5  # a few past the end too
    ours = LRSchedule(cfg, TRAIN_ITERS, global_batch_size=gbs)
    assert [ours(i) for i in range(n)] == megatron_lrs(cfg, TRAIN_ITERS, gbs, n)


def test_schedule_landmarks():
    """Independent of the oracle: warmup starts at lr_warmup_init, peaks at lr, ends at min_lr."""
    cfg = replace(C, lr_warmup_iters=10, lr_warmup_init=1e-6, lr_decay_iters=50)
    s = LRSchedule(cfg, train_iters=80)
    assert s(0) == 1e-6
    assert s(10) == cfg.lr
    assert s(30) == pytest.approx((cfg.lr + cfg.min_lr) / 2, rel=1e-12)  # cosine midpoint
    assert s(50) == pytest.approx(cfg.min_lr, rel=1e-12) and s(51) == s(79) == cfg.min_lr
    assert all(s(i) < s(i + 1) for i in range(10)) and all(s(i) >= s(i + 1) for i in range(10, 80))


def test_wsd_holds_then_anneals_to_min_lr():
    cfg = replace(C, lr_decay_style="WSD", lr_wsd_decay_style="linear", lr_wsd_decay_iters=10)
    s = LRSchedule(cfg, train_iters=40)
    assert all(s(i) == cfg.lr for i in range(31))
    assert s(35) == pytest.approx((cfg.lr + cfg.min_lr) / 2, rel=1e-12)
    assert s(40) == pytest.approx(cfg.min_lr, rel=1e-12)


BAD = {
    "unknown style": (dict(lr_decay_style="cosine-annealing"), 100),
    "unknown WSD style": (dict(lr_decay_style="WSD", lr_wsd_decay_style="step", lr_wsd_decay_iters=10), 100),
    "iters and fraction": (dict(lr_warmup_iters=10, lr_warmup_fraction=0.1), 100),
    "fraction >= 1": (dict(lr_warmup_fraction=1.0), 100),
    "warmup == decay": (dict(lr_warmup_iters=100), 100),
    "warmup > decay iters": (dict(lr_warmup_iters=20, lr_decay_iters=10), 100),
    "negative warmup": (dict(lr_warmup_iters=-1), 100),
    "WSD without anneal length": (dict(lr_decay_style="WSD"), 100),
    "WSD anneal overlaps warmup": (dict(lr_decay_style="WSD", lr_warmup_iters=10, lr_wsd_decay_iters=95), 100),
    "min_lr > lr": (dict(lr=1e-4, min_lr=1e-3), 100),
    "negative min_lr": (dict(min_lr=-1e-5), 100),
    "warmup init > lr": (dict(lr=1e-4, lr_warmup_init=1e-3, lr_warmup_iters=5), 100),
    "no decay length": (dict(), 0),
    "zero decay iters": (dict(lr_decay_iters=0), 100),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_schedule_raises_one_sentence(name):
    fields, train_iters = BAD[name]
    with pytest.raises(CookbookError) as e:
        LRSchedule(OptimizerConfig(**fields), train_iters)
    msg = str(e.value)
    assert "\n" not in msg and "--" in msg  # one line that names the flag


class Tiny(torch.nn.Module):
    """Embedding tied to the output layer, a norm, a biased linear, and one frozen tensor."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(32, 8)
        self.norm = torch.nn.RMSNorm(8)
        self.proj = torch.nn.Linear(8, 8, bias=True)
        self.output = torch.nn.Linear(8, 32, bias=False)
        self.output.weight = self.embed.weight
        self.frozen = torch.nn.Parameter(torch.ones(8, 8), requires_grad=False)


def test_param_groups_are_megatrons():
    model = Tiny()
    cfg = OptimizerConfig(weight_decay=0.1, lr=1e-3, adam_beta2=0.95, adam_eps=1e-5)
    opt = build_optimizer(model, cfg)
    by_wd = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert by_wd == {
        0.1: {id(model.embed.weight), id(model.proj.weight)},
        0.0: {id(model.norm.weight), id(model.proj.bias)},
    }
    every = [id(p) for g in opt.param_groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(every) == len(set(every)) == len(trainable) and set(every) == trainable
    for g in opt.param_groups:
        assert g["lr"] == 1e-3 and g["betas"] == (0.9, 0.95) and g["eps"] == 1e-5 and g["fused"]


def test_set_lr_sets_every_group():
    opt = build_optimizer(Tiny(), OptimizerConfig())
    set_lr(opt, 1.25e-4)
    assert [g["lr"] for g in opt.param_groups] == [1.25e-4, 1.25e-4]


def _params_with_grads(seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.zeros(s)) for s in [(4, 3), (5,), (2, 2, 2)]]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    ps.append(torch.nn.Parameter(torch.zeros(3)))  # no grad: ignored
    return ps


def _hand_norm(ps):
    return math.sqrt(sum(float(x) ** 2 for p in ps if p.grad is not None for x in p.grad.double().flatten()))


@pytest.mark.parametrize("max_norm", [0.0, 1e6])
def test_clip_grad_norm_reports_norm_and_leaves_small_grads(max_norm):
    ps = _params_with_grads()
    before = [p.grad.clone() for p in ps[:3]]
    norm = clip_grad_norm(ps, max_norm)
    assert norm.dtype == torch.float32 and norm.ndim == 0
    assert float(norm) == pytest.approx(_hand_norm(ps), rel=1e-6)
    assert all(torch.equal(b, p.grad) for b, p in zip(before, ps))


def test_clip_grad_norm_scales_large_grads_to_max():
    ps = _params_with_grads(seed=1)
    before = [p.grad.clone() for p in ps[:3]]
    total = _hand_norm(ps)
    norm = clip_grad_norm(ps, max_norm=0.5)
    assert float(norm) == pytest.approx(total, rel=1e-6)  # the norm before clipping
    for b, p in zip(before, ps):
        torch.testing.assert_close(p.grad, b * (0.5 / (total + 1e-6)))
    assert _hand_norm(ps) == pytest.approx(0.5, rel=1e-5)


def test_clip_grad_norm_accepts_a_module():
    model = Tiny()
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 0.5)
    n = sum(p.numel() for p in set(model.parameters()) if p.requires_grad)
    assert float(clip_grad_norm(model, 0.0)) == pytest.approx(0.5 * math.sqrt(n), rel=1e-6)


# FSDP2: two real processes over gloo; the sharded run must match one unsharded model.


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 10), torch.nn.RMSNorm(10), torch.nn.Linear(10, 4, bias=False))


def _fsdp_worker(rank, world, init_file):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cfg = OptimizerConfig(lr=1e-2, weight_decay=0.1)
        x = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))  # the same batch on each rank

        ref = _mlp()
        ref(x).square().sum().backward()
        ref_norm = clip_grad_norm(ref, 0.05)
        ref_opt = build_optimizer(ref, cfg)
        ref_opt.step()

        model = _mlp()
        for layer in (model[0], model[2]):
            fully_shard(layer)
        fully_shard(model)
        assert all(isinstance(p, DTensor) for p in model.parameters())
        opt = build_optimizer(model, cfg)
        assert [len(g["params"]) for g in opt.param_groups] == [2, 2]  # 2 matrices; bias + norm
        model(x).square().sum().backward()
        norm = clip_grad_norm(model, 0.05)
        assert not isinstance(norm, DTensor) and norm.dtype == torch.float32
        torch.testing.assert_close(norm, ref_norm, rtol=1e-6, atol=0)
        assert float(norm) > 0.05  # so clipping took place
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-7)
        opt.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p.full_tensor(), q, rtol=1e-5, atol=1e-7)
    finally:
        dist.destroy_process_group()


def test_clip_and_adamw_on_fsdp2_match_unsharded(tmp_path):
    mp.spawn(_fsdp_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)
