"""The target shape of a prune, and every check on it that needs no weights.

A prune keeps ``hidden_size`` residual channels (the same ones in every layer, the embedding, every norm and
the output layer), ``intermediate_size`` SwiGLU neurons per layer, ``num_heads`` query heads in
``num_kv_heads`` key/value groups per layer, and drops whole layers (``drop_layers`` of them chosen by layer
importance, or the ones in ``drop_layer_ids``). ``head_dim`` never changes, so the pruned model's
``num_heads x head_dim`` may differ from its hidden size (as Minitron's do); the config says so explicitly.

Query groups (GQA): query head ``j`` reads key/value head ``j // (num_heads / num_kv_heads)``. A prune keeps
whole groups and, inside each kept group, the same number of query heads, so the result is again a valid
grouped-query attention with ``num_heads % num_kv_heads == 0``. When only ``num_heads`` is given, an MHA model
stays MHA (its groups are its heads) and a GQA model keeps all its groups (heads are pruned within them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from cookbook.errors import CookbookError
from cookbook.model.config import ModelConfig


@dataclass
class PruneSpec:
    """What to keep; None = keep that dimension whole."""

    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    drop_layers: int | None = None  # how many layers to drop, chosen by layer importance
    drop_layer_ids: list[int] = field(default_factory=list)  # or exactly which (0-based)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def layers_to_drop(self) -> int:
        return len(self.drop_layer_ids) if self.drop_layer_ids else (self.drop_layers or 0)


FLAGS = {  # the command-line names the errors speak of
    "hidden_size": "--hidden-size-remain",
    "intermediate_size": "--intermediate-size-remain",
    "num_heads": "--num-attention-heads-remain",
    "num_kv_heads": "--num-query-groups-remain",
}


def parse_layer_ids(value: str | None) -> list[int]:
    """``"3,7, 12"`` -> [3, 7, 12]."""
    if not value:
        return []
    try:
        return [int(v) for v in value.replace(",", " ").split()]
    except ValueError:
        raise CookbookError(
            f"--drop-layer-ids {value!r} must be layer numbers separated by commas, e.g. 3,7,12"
        ) from None


def resolve_groups(src: ModelConfig, heads: int, groups: int | None) -> int:
    """The query groups of the pruned model when ``--num-query-groups-remain`` is not given."""
    if groups is not None:
        return groups
    if src.num_kv_heads == src.num_heads:  # MHA stays MHA
        return heads
    if heads % src.num_kv_heads == 0:  # GQA: keep every group, prune heads inside them
        return src.num_kv_heads
    raise CookbookError(
        f"--num-attention-heads-remain {heads} does not split over the model's {src.num_kv_heads} query groups; "
        f"give --num-query-groups-remain too (a divisor of {heads} that is at most {src.num_kv_heads})"
    )


def target_config(src: ModelConfig, spec: PruneSpec, tp: int = 1) -> ModelConfig:
    """The pruned model's config, or a ``CookbookError`` naming the flag that cannot work (larger than the
    source, heads that do not fit the query groups, every layer dropped, shapes tensor parallel cannot split)."""
    for name, flag in FLAGS.items():
        value = getattr(spec, name)
        if value is None:
            continue
        if not isinstance(value, int) or value < 1:
            raise CookbookError(f"{flag} must be a positive integer, not {value!r}")
        have = getattr(src, name)
        if value > have:
            raise CookbookError(
                f"{flag} {value} is larger than the model's {have}; pruning only removes (the source {name} is {have})"
            )
    heads = spec.num_heads if spec.num_heads is not None else src.num_heads
    groups = resolve_groups(src, heads, spec.num_kv_heads)
    if heads % groups:
        raise CookbookError(
            f"--num-attention-heads-remain {heads} is not divisible by --num-query-groups-remain {groups}; "
            "each query group must keep the same number of heads"
        )
    per_group = src.num_heads // src.num_kv_heads
    if heads // groups > per_group:
        raise CookbookError(
            f"{heads} heads in {groups} query groups is {heads // groups} heads per group, but the model's groups hold {per_group}; "
            f"keep at least {-(-heads // per_group)} groups (--num-query-groups-remain) or fewer heads"
        )

    layers = src.num_layers
    if spec.drop_layer_ids and spec.drop_layers is not None:
        raise CookbookError(
            "give --drop-layers N (chosen by layer importance) or --drop-layer-ids 3,7 (chosen by you), not both"
        )
    if spec.drop_layers is not None and spec.drop_layers < 0:
        raise CookbookError(f"--drop-layers must be a non-negative number of layers, not {spec.drop_layers}")
    bad = [i for i in spec.drop_layer_ids if not 0 <= i < layers]
    if bad:
        raise CookbookError(f"--drop-layer-ids {bad[0]} is not a layer of the model (layers 0 to {layers - 1})")
    if len(set(spec.drop_layer_ids)) != len(spec.drop_layer_ids):
        raise CookbookError(f"--drop-layer-ids {','.join(map(str, spec.drop_layer_ids))} names a layer twice")
    if spec.layers_to_drop >= layers:
        raise CookbookError(
            f"dropping {spec.layers_to_drop} of the model's {layers} layers leaves none; drop at most {layers - 1}"
        )

    cfg = src.replace(
        hidden_size=spec.hidden_size or src.hidden_size,
        intermediate_size=spec.intermediate_size or src.intermediate_size,
        num_heads=heads,
        num_kv_heads=groups,
        head_dim=src.head_dim,
        num_layers=layers - spec.layers_to_drop,
    )
    check_tensor_parallel(cfg, tp)
    return cfg


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    """Tensor parallel of degree ``tp`` splits heads, query groups and SwiGLU neurons evenly over the ranks (and
    Megatron-LM checkpoints need it): the pruned shape must allow it."""
    if tp is None or tp <= 1:
        return
    for name, flag, value in (
        ("intermediate size", "--intermediate-size-remain", cfg.intermediate_size),
        ("attention heads", "--num-attention-heads-remain", cfg.num_heads),
        ("query groups", "--num-query-groups-remain", cfg.num_kv_heads),
    ):
        if value % tp:
            raise CookbookError(
                f"the pruned {name} {value} is not divisible by --tensor-model-parallel-size {tp}; "
                f"choose {flag} as a multiple of {tp}"
            )


__all__ = ["PruneSpec", "parse_layer_ids", "resolve_groups", "target_config", "check_tensor_parallel"]
