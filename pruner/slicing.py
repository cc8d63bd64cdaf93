"""Cutting a model down to what a ``Selection`` keeps, the same way everywhere a dimension appears.

    dimension         kept by                 sliced in
    hidden channel    Selection.hidden        tok_embeddings (columns), every attention_norm / mlp_norm / norm,
                                              wq, wk, wv, w_gate, w_up (columns), wo, w_down (rows), output (columns)
    query head        Selection.heads[l]      wq rows (and bias) of the head's head_dim rows, wo columns
    query group       Selection.groups[l]     wk, wv rows (and biases)
    SwiGLU neuron     Selection.neurons[l]    w_gate, w_up rows, w_down columns
    layer             Selection.layers        kept layers renumbered 0, 1, ... in their original order

Indices are kept in their original order, so a selection that keeps everything reproduces the model bit for bit.
Heads are listed group by group (a kept group's kept heads, then the next group's), which is what makes new head
``j`` read new group ``j // (num_heads / num_kv_heads)``, as the model's ``repeat_interleave`` expects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cookbook.model import Transformer
from cookbook.model.config import ModelConfig
from pruner.importance import Scores


@dataclass
class Selection:
    """What a prune keeps; per-layer entries are keyed by the layer's original index."""

    layers: list[int]
    hidden: torch.Tensor
    heads: dict[int, torch.Tensor]
    groups: dict[int, torch.Tensor]
    neurons: dict[int, torch.Tensor]

    def summary(self, src: ModelConfig) -> dict:
        """What was removed, for the report."""
        dropped = [i for i in range(src.num_layers) if i not in self.layers]
        all_heads, all_groups = set(range(src.num_heads)), set(range(src.num_kv_heads))
        return {
            "dropped_layers": dropped,
            "kept_layers": list(self.layers),
            "hidden_channels_removed": src.hidden_size - len(self.hidden),
            "heads_removed": {i: sorted(all_heads - set(self.heads[i].tolist())) for i in self.layers},
            "query_groups_removed": {i: sorted(all_groups - set(self.groups[i].tolist())) for i in self.layers},
            "neurons_removed_per_layer": {i: src.intermediate_size - len(self.neurons[i]) for i in self.layers},
        }


def keep_all(cfg: ModelConfig) -> Selection:
    """The selection that removes nothing."""
    every = range(cfg.num_layers)
    return Selection(
        list(every),
        torch.arange(cfg.hidden_size),
        {i: torch.arange(cfg.num_heads) for i in every},
        {i: torch.arange(cfg.num_kv_heads) for i in every},
        {i: torch.arange(cfg.intermediate_size) for i in every},
    )


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The indices of the ``k`` highest scores, in increasing index order (ties: the earlier index)."""
    values = scores.tolist()
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def select(src: ModelConfig, target: ModelConfig, scores: Scores, layers: list[int]) -> Selection:
    """Keep the highest-scoring units to reach ``target``'s shape in each of ``layers`` (original indices):
    per layer the best ``num_kv_heads`` query groups, then in each the best ``num_heads / num_kv_heads`` heads."""
    per_group_src = src.num_heads // src.num_kv_heads
    per_group = target.num_heads // target.num_kv_heads
    heads, groups, neurons = {}, {}, {}
    for i in layers:
        groups[i] = top(scores.groups[i], target.num_kv_heads)
        chosen = []
        for g in groups[i].tolist():
            members = torch.arange(g * per_group_src, (g + 1) * per_group_src)
            chosen.append(members[top(scores.heads[i][members], per_group)])
        heads[i] = torch.cat(chosen)
        neurons[i] = top(scores.neurons[i], target.intermediate_size)
    return Selection(list(layers), top(scores.hidden_for(layers), target.hidden_size), heads, groups, neurons)


def _rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.index_select(0, index.to(x.device))


def _cols(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.index_select(1, index.to(x.device))


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The weight rows of heads (each head owns ``head_dim`` consecutive rows)."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).flatten()


@torch.no_grad()
def slice_state_dict(state: dict[str, torch.Tensor], src: ModelConfig, sel: Selection) -> dict[str, torch.Tensor]:
    """The pruned model's state dict (new tensors; ``state`` is a plain model's, output.weight included when tied)."""
    h, d = sel.hidden, src.head_dim
    out = {
        "tok_embeddings.weight": _cols(state["tok_embeddings.weight"], h),
        "norm.weight": _rows(state["norm.weight"], h),
        "output.weight": _cols(state["output.weight"], h),
    }
    for new, old in enumerate(sel.layers):
        p, q = f"layers.{old}.", f"layers.{new}."
        q_rows, kv_rows, n = _head_rows(sel.heads[old], d), _head_rows(sel.groups[old], d), sel.neurons[old]
        out[q + "attention_norm.weight"] = _rows(state[p + "attention_norm.weight"], h)
        out[q + "mlp_norm.weight"] = _rows(state[p + "mlp_norm.weight"], h)
        out[q + "attention.wq.weight"] = _cols(_rows(state[p + "attention.wq.weight"], q_rows), h)
        out[q + "attention.wk.weight"] = _cols(_rows(state[p + "attention.wk.weight"], kv_rows), h)
        out[q + "attention.wv.weight"] = _cols(_rows(state[p + "attention.wv.weight"], kv_rows), h)
        out[q + "attention.wo.weight"] = _cols(_rows(state[p + "attention.wo.weight"], h), q_rows)
        for name, rows in (("wq", q_rows), ("wk", kv_rows), ("wv", kv_rows)):
            if p + f"attention.{name}.bias" in state:
                out[q + f"attention.{name}.bias"] = _rows(state[p + f"attention.{name}.bias"], rows)
        out[q + "mlp.w_gate.weight"] = _cols(_rows(state[p + "mlp.w_gate.weight"], n), h)
        out[q + "mlp.w_up.weight"] = _cols(_rows(state[p + "mlp.w_up.weight"], n), h)
        out[q + "mlp.w_down.weight"] = _cols(_rows(state[p + "mlp.w_down.weight"], h), n)
    return out


def prune_model(model: Transformer, target: ModelConfig, sel: Selection) -> Transformer:
    """A new ``Transformer(target)`` holding the kept weights (on the source's device and dtype)."""
    state = slice_state_dict(model.state_dict(), model.config, sel)
    with torch.device("meta"):
        pruned = Transformer(target)
    pruned.load_state_dict(state, assign=True)
    pruned.tie_weights()
    return pruned.train(model.training)


__all__ = ["Selection", "keep_all", "top", "select", "slice_state_dict", "prune_model"]
