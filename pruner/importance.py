"""Importance scores: which heads, query groups, SwiGLU neurons, hidden channels and layers matter.

Width (``Scores``, higher = keep):

    activation   Minitron (Muralidharan et al. 2024): forward passes over calibration samples, no gradients,
                 read through hooks. A head scores the mean L2 norm of its attention output (the input of
                 ``wo``, per token); a neuron the mean |silu(gate) * up| (the input of ``w_down``); a hidden
                 channel the mean |RMSNorm output| over every norm that reads the residual stream (each layer's
                 two, and the final one). A query group scores the sum of its heads.
    magnitude    L2 norm of the weights that read or write the unit: a head's ``wq`` rows and ``wo`` columns
                 (a group adds its ``wk``/``wv`` rows), a neuron's ``w_gate``/``w_up`` rows and ``w_down``
                 column, a channel's column of every matrix reading the residual stream (scaled by the norm
                 weight in front of it), its row of ``wo``/``w_down``, the embedding and the output layer.
    random       uniform scores from ``seed``: the Megatron Cookbook's choice, the baseline to beat.

Depth (one number per layer, higher = keep):

    block-influence   ShortGPT (Men et al. 2024): 1 - the mean cosine similarity of a layer's input and output
                      per token; a layer that barely changes the residual stream scores near 0.
    ppl               the calibration loss with the layer removed minus the loss of the whole model (Minitron's
                      depth criterion, one layer at a time): removing an unimportant layer costs little.

Hidden-channel scores are kept per layer so that layers about to be dropped do not vote.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cookbook.engine.loss import cross_entropy
from cookbook.errors import CookbookError

IMPORTANCE = ("activation", "magnitude", "random")
LAYER_IMPORTANCE = ("block-influence", "ppl")


@dataclass
class Scores:
    """Per layer (original index): ``heads`` [num_heads], ``groups`` [num_kv_heads], ``neurons`` [intermediate];
    ``hidden`` [hidden_size] contributions keyed by layer index, and -1 for what every model keeps (embedding,
    final norm, output layer)."""

    heads: dict[int, torch.Tensor] = field(default_factory=dict)
    groups: dict[int, torch.Tensor] = field(default_factory=dict)
    neurons: dict[int, torch.Tensor] = field(default_factory=dict)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)

    def hidden_for(self, layers: list[int]) -> torch.Tensor:
        """A hidden channel's score from the layers that stay (and the embedding, final norm and output)."""
        parts = [self.hidden[i] for i in [*layers, -1] if i in self.hidden]
        return torch.stack(parts).sum(0)


# --------------------------------------------------------------------------- calibration forwards


def _batches(samples: torch.Tensor, batch_size: int, device):
    for i in range(0, samples.shape[0], batch_size):
        chunk = samples[i : i + batch_size].to(device)
        yield chunk[:, :-1], chunk[:, 1:]


@dataclass
class Calibration:
    """What one pass over the calibration samples measured."""

    scores: Scores | None  # activation scores, when asked for
    block_influence: torch.Tensor | None  # [num_layers], when asked for
    loss: float  # mean next-token cross-entropy of the whole model
    tokens: int


@torch.no_grad()
def calibrate(
    model: nn.Module,
    samples: torch.Tensor,
    batch_size: int,
    *,
    activation: bool = True,
    block_influence: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> Calibration:
    """One forward pass over ``samples`` [n, seq + 1] with hooks: activation scores and/or block influence.
    ``on_batch(samples)`` after each batch (progress)."""
    cfg = model.config
    device = next(model.parameters()).device
    names = list(model.layers)
    was_training = model.training
    sums: dict[tuple[str, int], torch.Tensor] = {}
    handles = []

    def add(key, value: torch.Tensor) -> None:
        value = value.double()
        sums[key] = sums[key] + value if key in sums else value

    def hook_norm(index: int):
        def hook(module, args, output):
            add(("hidden", index), output.abs().sum((0, 1)))

        return hook

    def hook_heads(index: int):
        def hook(module, args):
            x = args[0]
            add(("heads", index), x.view(*x.shape[:2], cfg.num_heads, cfg.head_dim).float().norm(dim=-1).sum((0, 1)))

        return hook

    def hook_neurons(index: int):
        def hook(module, args):
            add(("neurons", index), args[0].abs().sum((0, 1)))

        return hook

    def hook_block(index: int):
        def hook(module, args, output):
            cos = F.cosine_similarity(args[0].float(), output.float(), dim=-1)  # [b, s]
            add(("influence", index), (1 - cos).sum())

        return hook

    try:
        for i, name in enumerate(names):
            layer = model.layers[name]
            if activation:
                handles += [
                    layer.attention_norm.register_forward_hook(hook_norm(i)),
                    layer.mlp_norm.register_forward_hook(hook_norm(i)),
                    layer.attention.wo.register_forward_pre_hook(hook_heads(i)),
                    layer.mlp.w_down.register_forward_pre_hook(hook_neurons(i)),
                ]
            if block_influence:
                handles.append(layer.register_forward_hook(hook_block(i)))
        if activation:
            handles.append(model.norm.register_forward_hook(hook_norm(-1)))
        total, tokens = 0.0, 0
        model.eval()
        for inputs, targets in _batches(samples, batch_size, device):
            total += float(cross_entropy(model(inputs), targets)) * inputs.numel()
            tokens += inputs.numel()
            if on_batch is not None:
                on_batch(inputs.shape[0])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()

    scores = None
    if activation:
        scores = Scores()
        for i in range(len(names)):
            scores.heads[i] = (sums[("heads", i)] / tokens).float().cpu()
            scores.groups[i] = group_scores(scores.heads[i], cfg.num_kv_heads)
            scores.neurons[i] = (sums[("neurons", i)] / tokens).float().cpu()
        for i in [*range(len(names)), -1]:
            scores.hidden[i] = (sums[("hidden", i)] / tokens).float().cpu()
    influence = None
    if block_influence:
        influence = torch.stack([sums[("influence", i)] / tokens for i in range(len(names))]).float().cpu()
    return Calibration(scores, influence, total / tokens, tokens)


def group_scores(heads: torch.Tensor, groups: int) -> torch.Tensor:
    """A query group's score: the sum of its heads' (query head j is in group j // (heads / groups))."""
    return heads.view(groups, -1).sum(1)


@torch.no_grad()
def calibration_loss(
    model: nn.Module, samples: torch.Tensor, batch_size: int, on_batch: Callable[[int], None] | None = None
) -> float:
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    for inputs, targets in _batches(samples, batch_size, device):
        n = inputs.numel()
        total += float(cross_entropy(model(inputs), targets)) * n
        tokens += n
        if on_batch is not None:
            on_batch(inputs.shape[0])
    return total / tokens


@torch.no_grad()
def layer_removal_importance(
    model: nn.Module,
    samples: torch.Tensor,
    batch_size: int,
    base_loss: float | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """[num_layers]: the calibration loss with each layer removed alone, minus the whole model's (a pass over the
    samples per layer, and one more without ``base_loss``)."""
    was_training = model.training
    model.eval()
    layers = model.layers
    if base_loss is None:
        base_loss = calibration_loss(model, samples, batch_size, on_batch)
    out = []
    try:
        for name in list(layers):
            model.layers = nn.ModuleDict({k: v for k, v in layers.items() if k != name})
            out.append(calibration_loss(model, samples, batch_size, on_batch) - base_loss)
    finally:
        model.layers = layers
        model.train(was_training)
    return torch.tensor(out)


# --------------------------------------------------------------------------- weights only


@torch.no_grad()
def magnitude_scores(model: nn.Module) -> Scores:
    """Scores from the weights alone (the L2 norms described in this module's docstring; squared sums, which
    rank the same)."""
    cfg = model.config
    a, g, d, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    scores = Scores()
    for i, layer in enumerate(model.layers.values()):
        att, mlp = layer.attention, layer.mlp
        n1, n2 = layer.attention_norm.weight.float(), layer.mlp_norm.weight.float()
        wq, wk, wv = att.wq.weight.float(), att.wk.weight.float(), att.wv.weight.float()
        wo = att.wo.weight.float()
        gate, up, down = mlp.w_gate.weight.float(), mlp.w_up.weight.float(), mlp.w_down.weight.float()
        heads = wq.view(a, d, h).pow(2).sum((1, 2)) + wo.view(h, a, d).pow(2).sum((0, 2))
        scores.heads[i] = heads.cpu()
        scores.groups[i] = (
            group_scores(heads, g) + wk.view(g, d, h).pow(2).sum((1, 2)) + wv.view(g, d, h).pow(2).sum((1, 2))
        ).cpu()
        scores.neurons[i] = (gate.pow(2).sum(1) + up.pow(2).sum(1) + down.pow(2).sum(0)).cpu()
        reads = torch.cat([wq, wk, wv]) * n1
        scores.hidden[i] = (
            reads.pow(2).sum(0) + wo.pow(2).sum(1) + (torch.cat([gate, up]) * n2).pow(2).sum(0) + down.pow(2).sum(1)
        ).cpu()
    final = model.tok_embeddings.weight.float().pow(2).sum(0) + (
        model.output.weight.float() * model.norm.weight.float()
    ).pow(2).sum(0)
    scores.hidden[-1] = final.cpu()
    return scores


def random_scores(model: nn.Module, seed: int) -> Scores:
    """Uniform random scores (the Megatron Cookbook's random choice), reproducible from ``seed``."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    scores = Scores()
    for i in range(len(model.layers)):
        scores.heads[i] = torch.rand(cfg.num_heads, generator=gen)
        scores.groups[i] = torch.rand(cfg.num_kv_heads, generator=gen)
        scores.neurons[i] = torch.rand(cfg.intermediate_size, generator=gen)
    scores.hidden[-1] = torch.rand(cfg.hidden_size, generator=gen)
    return scores


def layers_to_drop(importance: torch.Tensor, n: int) -> list[int]:
    """The ``n`` least important layers (ties: the later layer goes first), in order."""
    values = importance.tolist()
    order = sorted(range(len(values)), key=lambda i: (values[i], -i))
    return sorted(order[:n])


def check_method(importance: str, layer_importance: str) -> None:
    if importance not in IMPORTANCE:
        raise CookbookError(f"unknown --importance {importance!r}; choose one of {', '.join(IMPORTANCE)}")
    if layer_importance not in LAYER_IMPORTANCE:
        raise CookbookError(
            f"unknown --layer-importance {layer_importance!r}; choose one of {', '.join(LAYER_IMPORTANCE)}"
        )


__all__ = [
    "IMPORTANCE",
    "LAYER_IMPORTANCE",
    "Scores",
    "Calibration",
    "calibrate",
    "calibration_loss",
    "group_scores",
    "layer_removal_importance",
    "magnitude_scores",
    "random_scores",
    "layers_to_drop",
    "check_method",
]
