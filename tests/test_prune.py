"""Structured pruning (pruner/): slicing, importance, target shapes, the pruned checkpoint, HF export.

Oracles: a prune that removes nothing is the model bit for bit; a pruned model equals one built directly from the
kept weights (an independent loop over heads and rows); removing a head, a query group, a neuron or a layer equals
zeroing what it writes into the residual stream in the unpruned model (which is what GQA-correct slicing must
give); importance methods never keep units that were silenced; transformers' LlamaForCausalLM built from a pruned
state dict gives the same logits.
"""

from __future__ import annotations

import pytest
import torch

from cookbook.engine.checkpoint import read_config
from cookbook.errors import CookbookError
from cookbook.inference.load import load_model
from cookbook.model import Transformer
from cookbook.model.config import ModelConfig, preset
from pruner.importance import calibrate, layer_removal_importance, layers_to_drop, magnitude_scores, random_scores
from pruner.save import param_count, write_checkpoint
from pruner.slicing import Selection, keep_all, prune_model, select
from pruner.spec import PruneSpec, parse_layer_ids, target_config
from recipes.prune import PruneConfig, prune, run

BASE = dict(
    vocab_size=96, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=128, max_seq_len=64
)


def make_model(seed: int = 0, **changes) -> Transformer:
    """A random model whose norms and biases are not their initial 1 and 0 (so slicing them is seen)."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**{**BASE, **changes}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    return model.eval()


def tokens(seed: int = 1, batch: int = 2, seq: int = 24) -> torch.Tensor:
    return torch.randint(0, BASE["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def calib(n: int = 8, seq: int = 32) -> torch.Tensor:
    return tokens(seed=5, batch=n, seq=seq + 1)


VARIANTS = {"gqa": {}, "mha": {"num_kv_heads": 4}, "tied": {"tie_embeddings": True}, "qkv-bias": {"qkv_bias": True}}


# --------------------------------------------------------------------------- slicing


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_prune_that_removes_nothing_is_the_model_bit_for_bit(variant):
    model = make_model(**VARIANTS[variant])
    x = tokens()
    with torch.no_grad():
        assert torch.equal(prune_model(model, model.config, keep_all(model.config))(x), model(x))
        pruned, removed, _ = prune(model, PruneConfig())
        assert torch.equal(pruned(x), model(x))
    assert removed["dropped_layers"] == [] and removed["hidden_channels_removed"] == 0


def build_directly(model: Transformer, target: ModelConfig, sel: Selection) -> Transformer:
    """The pruned model made by hand: copy each kept head's rows, each kept group's rows, each kept neuron and
    channel, one at a time, into a fresh ``Transformer(target)``."""
    src, d = model.config, model.config.head_dim
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ref = Transformer(target)
    h = sel.hidden.tolist()

    def rows_of(units):
        return [r for u in units for r in range(u * d, (u + 1) * d)]

    with torch.no_grad():
        ref.tok_embeddings.weight.copy_(sd["tok_embeddings.weight"][:, h])
        ref.norm.weight.copy_(sd["norm.weight"][h])
        if not target.tie_embeddings:
            ref.output.weight.copy_(sd["output.weight"][:, h])
        for new, old in enumerate(sel.layers):
            layer, p = ref.layers[str(new)], f"layers.{old}."
            q, kv, n = rows_of(sel.heads[old].tolist()), rows_of(sel.groups[old].tolist()), sel.neurons[old].tolist()
            layer.attention_norm.weight.copy_(sd[p + "attention_norm.weight"][h])
            layer.mlp_norm.weight.copy_(sd[p + "mlp_norm.weight"][h])
            layer.attention.wq.weight.copy_(sd[p + "attention.wq.weight"][q][:, h])
            layer.attention.wk.weight.copy_(sd[p + "attention.wk.weight"][kv][:, h])
            layer.attention.wv.weight.copy_(sd[p + "attention.wv.weight"][kv][:, h])
            layer.attention.wo.weight.copy_(sd[p + "attention.wo.weight"][h][:, q])
            if src.qkv_bias:
                layer.attention.wq.bias.copy_(sd[p + "attention.wq.bias"][q])
                layer.attention.wk.bias.copy_(sd[p + "attention.wk.bias"][kv])
                layer.attention.wv.bias.copy_(sd[p + "attention.wv.bias"][kv])
            layer.mlp.w_gate.weight.copy_(sd[p + "mlp.w_gate.weight"][n][:, h])
            layer.mlp.w_up.weight.copy_(sd[p + "mlp.w_up.weight"][n][:, h])
            layer.mlp.w_down.weight.copy_(sd[p + "mlp.w_down.weight"][h][:, n])
    return ref.eval()


# (source changes, spec): MHA, GQA within groups, whole groups, fewer groups and fewer heads per group, all at once
SHAPES = {
    "mha": ({"num_kv_heads": 4}, PruneSpec(num_heads=2)),
    "gqa-heads-within-groups": ({}, PruneSpec(num_heads=2)),
    "gqa-whole-groups": ({}, PruneSpec(num_heads=2, num_kv_heads=1)),
    "gqa-8-heads-4-groups-to-4-in-2": (
        {"num_heads": 8, "num_kv_heads": 4, "head_dim": 8},
        PruneSpec(num_heads=4, num_kv_heads=2),
    ),
    "everything": (
        {},
        PruneSpec(hidden_size=40, intermediate_size=72, num_heads=2, num_kv_heads=1, drop_layer_ids=[1]),
    ),
    "everything-tied-bias": (
        {"tie_embeddings": True, "qkv_bias": True},
        PruneSpec(hidden_size=40, intermediate_size=72, num_heads=2, drop_layer_ids=[0, 3]),
    ),
}


@pytest.mark.parametrize("case", SHAPES)
def test_pruned_logits_equal_a_model_built_directly_from_the_kept_weights(case):
    changes, spec = SHAPES[case]
    model = make_model(**changes)
    target = target_config(model.config, spec)
    layers = [i for i in range(model.config.num_layers) if i not in spec.drop_layer_ids]
    sel = select(model.config, target, random_scores(model, seed=3), layers)
    per_group_src = model.config.num_heads // model.config.num_kv_heads
    for i in layers:  # new head j reads new group j // (heads / groups): its original head must be in that group
        groups_of_heads = (sel.heads[i] // per_group_src).tolist()
        assert groups_of_heads == sel.groups[i].repeat_interleave(target.num_heads // target.num_kv_heads).tolist()
    pruned = prune_model(model, target, sel)
    assert param_count(pruned) == target.num_params()
    x = tokens()
    with torch.no_grad():
        assert torch.equal(pruned(x), build_directly(model, target, sel)(x))


def zeroed(
    model: Transformer, heads: dict[int, list[int]] = {}, neurons: dict[int, list[int]] = {}, layers: list[int] = ()
) -> Transformer:
    """The unpruned model with what the given heads, neurons and layers write into the residual stream zeroed."""
    copy = Transformer(model.config).eval()
    copy.load_state_dict(model.state_dict())
    d = model.config.head_dim
    with torch.no_grad():
        for i, hs in heads.items():
            for j in hs:
                copy.layers[str(i)].attention.wo.weight[:, j * d : (j + 1) * d] = 0
        for i, ns in neurons.items():
            copy.layers[str(i)].mlp.w_down.weight[:, ns] = 0
        for i in layers:
            copy.layers[str(i)].attention.wo.weight.zero_()
            copy.layers[str(i)].mlp.w_down.weight.zero_()
    return copy


@pytest.mark.parametrize(
    "case", ["gqa-heads-within-groups", "gqa-whole-groups", "gqa-8-heads-4-groups-to-4-in-2", "mha"]
)
def test_removing_heads_groups_neurons_and_layers_equals_zeroing_their_output(case):
    changes, spec = SHAPES[case]
    model = make_model(**changes, qkv_bias=True)
    spec = PruneSpec(
        num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads, intermediate_size=100, drop_layer_ids=[2]
    )
    target = target_config(model.config, spec)
    sel = select(model.config, target, random_scores(model, seed=11), [0, 1, 3])
    removed_heads = {i: sorted(set(range(model.config.num_heads)) - set(sel.heads[i].tolist())) for i in sel.layers}
    removed_neurons = {i: sorted(set(range(128)) - set(sel.neurons[i].tolist())) for i in sel.layers}
    x = tokens()
    with torch.no_grad():
        want = zeroed(model, removed_heads, removed_neurons, [2])(x)
        got = prune_model(model, target, sel)(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- importance


def silenced_model(**changes) -> Transformer:
    """In every layer query group 1 (heads 2, 3) and neurons 0-9, and hidden channel 5 everywhere, write and read
    nothing."""
    model = make_model(**changes)
    d = model.config.head_dim
    with torch.no_grad():
        for layer in model.layers.values():
            att, mlp = layer.attention, layer.mlp
            att.wq.weight[2 * d : 4 * d] = 0
            att.wk.weight[d : 2 * d] = 0
            att.wv.weight[d : 2 * d] = 0
            att.wo.weight[:, 2 * d : 4 * d] = 0
            mlp.w_gate.weight[:10] = 0
            mlp.w_up.weight[:10] = 0
            mlp.w_down.weight[:, :10] = 0
        model.tok_embeddings.weight[:, 5] = 0
        model.output.weight[:, 5] = 0
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p[5] = 0
            elif name.endswith(("wq.weight", "wk.weight", "wv.weight", "w_gate.weight", "w_up.weight")):
                p[:, 5] = 0
            elif name.endswith(("wo.weight", "w_down.weight")):
                p[5] = 0
    return model


@pytest.mark.parametrize("importance", ["activation", "magnitude"])
def test_importance_never_keeps_silenced_units(importance):
    model = silenced_model()
    target = target_config(model.config, PruneSpec(hidden_size=63, intermediate_size=118, num_heads=2, num_kv_heads=1))
    scores = (
        calibrate(model, calib(), 4, block_influence=False).scores
        if importance == "activation"
        else magnitude_scores(model)
    )
    sel = select(model.config, target, scores, [0, 1, 2, 3])
    for i in range(4):
        assert sel.groups[i].tolist() == [0] and sel.heads[i].tolist() == [0, 1]
        assert not set(range(10)) & set(sel.neurons[i].tolist())
    assert 5 not in sel.hidden.tolist()
    # removing dead heads and neurons changes nothing (the dead channel does: RMSNorm's mean runs over fewer channels)
    spec = PruneSpec(intermediate_size=118, num_heads=2, num_kv_heads=1)
    pruned, _, _ = prune(model, PruneConfig(spec, importance=importance), calib())
    with torch.no_grad():
        torch.testing.assert_close(pruned(tokens()), model(tokens()), rtol=1e-5, atol=1e-5)


def test_activation_scores_are_the_mean_head_norm_and_neuron_activation():
    model = make_model()
    x = calib(4, 16)
    scores = calibrate(model, x, 2, block_influence=False).scores
    seen = {}
    layer = model.layers["2"]
    h1 = layer.attention.wo.register_forward_pre_hook(lambda m, a: seen.__setitem__("heads", a[0]))
    h2 = layer.mlp.w_down.register_forward_pre_hook(lambda m, a: seen.__setitem__("neurons", a[0]))
    with torch.no_grad():
        model(x[:, :-1])
    h1.remove(), h2.remove()
    heads = seen["heads"].view(4, 16, 4, 16).norm(dim=-1).mean((0, 1))
    torch.testing.assert_close(scores.heads[2], heads, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores.neurons[2], seen["neurons"].abs().mean((0, 1)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scores.groups[2], heads.view(2, 2).sum(1), rtol=1e-5, atol=1e-6)


def test_random_importance_is_reproducible_from_its_seed():
    model = make_model()
    target = target_config(model.config, PruneSpec(hidden_size=32, intermediate_size=64, num_heads=2))

    def chosen(seed):
        sel = select(model.config, target, random_scores(model, seed), [0, 1, 2, 3])
        return (
            sel.hidden.tolist(),
            [sel.heads[i].tolist() for i in range(4)],
            [sel.neurons[i].tolist() for i in range(4)],
        )

    assert chosen(1) == chosen(1) and chosen(1) != chosen(2)


def test_block_influence_drops_the_layer_that_changes_nothing():
    model = zeroed(make_model(num_layers=5), layers=[2])  # layer 2 adds nothing to the residual stream
    influence = calibrate(model, calib(), 4, activation=False).block_influence
    assert influence[2].abs() < 1e-6 and (influence[[0, 1, 3, 4]] > 1e-3).all()
    pruned, removed, facts = prune(model, PruneConfig(PruneSpec(drop_layers=1)), calib())
    assert removed["dropped_layers"] == [2] and len(facts["layer_importance"]) == 5
    with torch.no_grad():
        torch.testing.assert_close(pruned(tokens()), model(tokens()), rtol=1e-5, atol=1e-5)


def test_ppl_importance_is_the_calibration_loss_increase_when_a_layer_is_removed():
    from cookbook.engine.loss import cross_entropy

    model = zeroed(make_model(num_layers=5), layers=[2])
    x = calib()

    def loss(m):
        with torch.no_grad():
            return float(cross_entropy(m(x[:, :-1]), x[:, 1:]))

    importance = layer_removal_importance(model, x, 3)
    for i in range(5):
        without, _, _ = prune(model, PruneConfig(PruneSpec(drop_layer_ids=[i])))
        assert abs(float(importance[i]) - (loss(without) - loss(model))) < 1e-5
    assert abs(float(importance[2])) < 1e-6 and list(model.layers) == ["0", "1", "2", "3", "4"]  # the model is restored
    _, removed, _ = prune(model, PruneConfig(PruneSpec(drop_layers=2), layer_importance="ppl"), x)
    assert removed["dropped_layers"] == layers_to_drop(importance, 2)


# --------------------------------------------------------------------------- the target shape


@pytest.mark.parametrize(
    "changes, spec, message",
    [
        ({}, PruneSpec(hidden_size=128), "--hidden-size-remain 128 is larger than the model's 64"),
        ({}, PruneSpec(intermediate_size=129), "--intermediate-size-remain 129 is larger"),
        ({}, PruneSpec(num_heads=8), "--num-attention-heads-remain 8 is larger"),
        ({}, PruneSpec(num_kv_heads=4), "--num-query-groups-remain 4 is larger"),
        ({}, PruneSpec(num_heads=3), "give --num-query-groups-remain too"),
        ({}, PruneSpec(num_heads=3, num_kv_heads=2), "not divisible by --num-query-groups-remain 2"),
        ({}, PruneSpec(num_heads=4, num_kv_heads=1), "4 heads per group, but the model's groups hold 2"),
        ({}, PruneSpec(hidden_size=0), "must be a positive integer"),
        ({}, PruneSpec(drop_layers=4), "leaves none; drop at most 3"),
        ({}, PruneSpec(drop_layer_ids=[0, 1, 2, 3]), "leaves none"),
        ({}, PruneSpec(drop_layer_ids=[4]), "is not a layer of the model"),
        ({}, PruneSpec(drop_layer_ids=[1, 1]), "names a layer twice"),
        ({}, PruneSpec(drop_layers=1, drop_layer_ids=[1]), "not both"),
    ],
)
def test_impossible_targets_are_refused(changes, spec, message):
    with pytest.raises(CookbookError, match=message.replace("(", r"\(").replace(")", r"\)")):
        target_config(ModelConfig(**{**BASE, **changes}), spec)


def test_tensor_parallel_needs_divisible_neurons_heads_and_groups():
    src = ModelConfig(**{**BASE, "num_heads": 8, "num_kv_heads": 4, "head_dim": 8})
    assert (
        target_config(src, PruneSpec(intermediate_size=96, num_heads=4, num_kv_heads=2), tp=2).intermediate_size == 96
    )
    with pytest.raises(CookbookError, match="intermediate size 98 is not divisible by --tensor-model-parallel-size 4"):
        target_config(src, PruneSpec(intermediate_size=98), tp=4)
    with pytest.raises(CookbookError, match="query groups 2 is not divisible by --tensor-model-parallel-size 4"):
        target_config(src, PruneSpec(num_heads=4, num_kv_heads=2), tp=4)


def test_query_groups_default_mha_stays_mha_and_gqa_keeps_its_groups():
    assert (lambda c: (c.num_heads, c.num_kv_heads))(
        target_config(ModelConfig(**{**BASE, "num_kv_heads": 4}), PruneSpec(num_heads=2))
    ) == (2, 2)
    assert (lambda c: (c.num_heads, c.num_kv_heads))(target_config(ModelConfig(**BASE), PruneSpec(num_heads=2))) == (
        2,
        2,
    )
    big = ModelConfig(**{**BASE, "num_heads": 8, "num_kv_heads": 2, "head_dim": 8})
    assert (lambda c: (c.num_heads, c.num_kv_heads, c.head_dim))(target_config(big, PruneSpec(num_heads=6))) == (
        6,
        2,
        8,
    )
    assert parse_layer_ids("7, 13,18") == [7, 13, 18]
    with pytest.raises(CookbookError, match="layer numbers"):
        parse_layer_ids("7;13")


def test_the_cookbook_shapes():
    """13B -> 7B lands exactly on Llama-2-7B's shape and size; 7B -> 3.4B on 3.37B parameters."""
    seven = target_config(
        preset("llama2-13b"), PruneSpec(hidden_size=4096, intermediate_size=11008, num_heads=32, drop_layers=8)
    )
    assert seven == preset("llama2-7b").replace(head_dim=128) and seven.num_params() == preset("llama2-7b").num_params()
    small = target_config(
        preset("llama2-7b"),
        PruneSpec(hidden_size=3072, intermediate_size=8192, num_heads=24, drop_layer_ids=[7, 13, 18, 24]),
    )
    assert (small.num_layers, small.head_dim, round(small.num_params() / 1e9, 2)) == (28, 128, 3.37)


# --------------------------------------------------------------------------- the checkpoint and HF


@pytest.mark.parametrize("variant", ["gqa", "tied"])
def test_the_pruned_checkpoint_loads_back_with_the_same_logits(tmp_path, variant):
    model = make_model(**VARIANTS[variant])
    pruned, _, _ = prune(
        model, PruneConfig(PruneSpec(hidden_size=40, num_heads=2, drop_layer_ids=[3]), importance="magnitude")
    )
    path = write_checkpoint(tmp_path / "out", pruned, {"data": {"tokenizer_model": "tok.model"}}, {"pruned_from": "x"})
    loaded, sections = load_model(tmp_path / "out", "cpu")
    assert sections["model"]["head_dim"] == 16 and sections["data"]["tokenizer_model"] == "tok.model"
    assert read_config(path)["model"]["hidden_size"] == 40
    with torch.no_grad():
        assert torch.equal(loaded(tokens()), pruned(tokens()))
    with pytest.raises(CookbookError, match="already holds a run"):
        write_checkpoint(tmp_path / "out", pruned, {}, {})


def test_run_with_nothing_to_remove_saves_the_same_model(tmp_path):
    model = make_model()
    write_checkpoint(tmp_path / "base", model, {}, {})
    report = run(
        None,
        {"checkpoint": {"load": str(tmp_path / "base"), "save": str(tmp_path / "same")}, "training": {"device": "cpu"}},
        PruneConfig(),
    )
    assert report["params"]["before"] == report["params"]["after"] == model.config.num_params()
    loaded, _ = load_model(tmp_path / "same", "cpu")
    with torch.no_grad():
        assert torch.equal(loaded(tokens()), model(tokens()))


def test_a_pruned_checkpoint_converts_to_hf_and_megatron_with_the_same_logits(tmp_path):
    """cookbook convert takes the pruned checkpoint (head_dim no longer hidden / heads) to Hugging Face, where
    transformers gives our logits, and to Megatron-LM, where megatron-core's GPTModel loads it strictly and gives
    transformers' logits (tests/megatron_gpt.py, the conversion tests' oracle)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("megatron.core")
    import transformers

    from recipes.convert import ConvertConfig
    from recipes.convert import run as convert

    model = make_model(num_heads=8, num_kv_heads=4, head_dim=8)
    spec = PruneSpec(hidden_size=48, intermediate_size=80, num_heads=4, num_kv_heads=2, drop_layer_ids=[1])
    pruned, _, _ = prune(model, PruneConfig(spec, importance="magnitude"))
    assert pruned.config.num_heads * pruned.config.head_dim != pruned.config.hidden_size
    write_checkpoint(tmp_path / "pruned", pruned, {}, {})
    convert(ConvertConfig("cookbook", "hf", str(tmp_path / "pruned"), str(tmp_path / "hf")), show_progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens()).logits, pruned(tokens()), rtol=1e-5, atol=1e-5)
    convert(
        ConvertConfig(
            "cookbook", "megatron", str(tmp_path / "pruned"), str(tmp_path / "megatron"), transformer_impl="local"
        ),
        show_progress=False,
    )
    cases = tmp_path / "cases.json"
    cases.write_text(
        json.dumps([{"name": "pruned", "megatron": str(tmp_path / "megatron"), "hf": str(tmp_path / "hf")}])
    )
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("megatron_gpt.py")), str(cases)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    result = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    assert result["max_diff"] < 1e-5, result
