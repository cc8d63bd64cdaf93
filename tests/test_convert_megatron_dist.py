"""cookbook convert to and from Megatron-LM's distributed checkpoints (--ckpt-format torch_dist), megatron-core
as the oracle: its GPTModels, saved by dist_checkpointing.save as Megatron-LM saves a run (TP 1 and TP 2 over two
gloo processes), convert to transformers with the same logits; what we write, megatron-core loads with strict
checking into GPTModel.sharded_state_dict() at TP 1 and 2, with the same logits; round trips are exact."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from helpers_convert import (
    dist_common,
    dist_dir,
    dist_objects,
    dist_tensors,
    hf_model,
    make_hf,
    megatron_files,
    read_safetensors,
    side_files,
)

from recipes.convert import ConvertConfig, run

pytest.importorskip("transformers")
pytest.importorskip("megatron.core")

ORACLE = Path(__file__).with_name("megatron_gpt.py")
# megatron-core models: 2 layers, hidden 64, FFN 96, the vocabulary of the hf_tokenizer fixture (700, padded to 768)
SPEC = dict(layers=2, hidden=64, ffn=96, heads=4, groups=2, vocab=700)
SAVED = {  # name: (TP, PP, spec changes, singleton_local_shards)
    "gqa": (1, 1, {}, False),
    "tied-interpolation": (1, 1, {"groups": 4, "tied": True, "interpolation": 2.0}, False),
    "gqa-bias-tp2": (2, 1, {"qkv_bias": True}, False),
    "per-layer-tp2": (2, 1, {"tied": True, "head_dim": 32, "eps": 1e-6, "theta": 500000, "interpolation": 4.0}, True),
    "tied-pp2": (1, 2, {"tied": True, "layers": 4}, False),
}


def convert(source: str, target: str, load: Path, save: Path, **kw):
    return run(ConvertConfig(source, target, str(load), str(save), **kw), show_progress=False)


def oracle(mode: str, cases: list[dict], folder: Path) -> dict[str, dict]:
    """megatron_gpt.py over two gloo processes; its JSON lines by case name."""
    (folder / f"{mode}.json").write_text(json.dumps(cases))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(ORACLE),
        mode,
        str(folder / f"{mode}.json"),
    ]
    # megatron-core's save starts a multiprocessing Manager, whose Unix socket lives in TMPDIR: a socket path holds at
    # most 107 bytes, so under a long TMPDIR the oracle gets a short one of its own
    with tempfile.TemporaryDirectory(dir="/tmp" if os.path.isdir("/tmp") else None) as short:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": short}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {r["name"]: r for r in map(json.loads, (line for line in proc.stdout.splitlines() if line.startswith("{")))}


def tokens(vocab: int) -> list[list[int]]:
    return torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(0)).tolist()


@pytest.fixture(scope="module")
def saved(tmp_path_factory, hf_tokenizer) -> dict[str, dict]:
    """megatron-core GPTModels saved as torch_dist checkpoints, with their logits."""
    root = tmp_path_factory.mktemp("megatron_dist")
    cases = [
        dict(
            name=name,
            tp=tp,
            pp=pp,
            singleton=singleton,
            spec={**SPEC, "tokenizer": str(hf_tokenizer), **spec},
            seed=i,
            tokens=tokens(SPEC["vocab"]),
            megatron=str(root / name),
            logits=str(root / f"{name}.pt"),
        )
        for i, (name, (tp, pp, spec, singleton)) in enumerate(SAVED.items())
    ]
    oracle("save-dist", cases, root)
    return {c["name"]: c for c in cases}


@pytest.mark.parametrize("name", list(SAVED))
def test_megatron_core_torch_dist_to_transformers(saved, name, tmp_path):
    """A run megatron-core saved (stacked or per-layer keys, SwiGLU fc1 through its sharded factory, TP 1 or 2, PP 2,
    GQA, tied or untied, q/k/v biases, rotary interpolation) converts to a model transformers loads with the same
    logits within 1e-4 (fp32); its settings come from args alone, the vocabulary from the run's tokenizer (args
    record none) with the padded rows dropped, and the optimizer and RNG state are left behind, as a note says."""
    case = saved[name]
    result = convert("megatron", "hf", Path(case["megatron"]), tmp_path / "hf")
    model = hf_model(tmp_path / "hf")
    spec = case["spec"]
    assert model.config.vocab_size == spec["vocab"]
    assert model.config.tie_word_embeddings == spec.get("tied", False)
    assert model.config.head_dim == spec.get("head_dim", spec["hidden"] // spec["heads"])
    assert model.config.num_key_value_heads == spec["groups"]
    assert model.config.rms_norm_eps == spec.get("eps", 1e-5)
    scaling = {"rope_type": "linear", "factor": spec["interpolation"]} if spec.get("interpolation") else None
    assert json.loads((tmp_path / "hf" / "config.json").read_text()).get("rope_scaling") == scaling
    assert (model.config.model_type == "qwen2") == spec.get("qkv_bias", False)
    with torch.no_grad():
        theirs = model(torch.tensor(case["tokens"])).logits
    diff = (theirs - torch.load(case["logits"])).abs().max().item()
    assert diff < 1e-4, diff
    notes = " ".join(result.notes)
    assert "optimizer state (" in notes and "RNG state" in notes and "left behind" in notes
    assert "the vocabulary is 700" in notes and "68 padded rows are dropped" in notes
    assert result.source == f"Megatron-LM torch_dist iteration 20 (saved at TP {case['tp']}, PP {case['pp']})"
    assert (tmp_path / "hf" / "tokenizer.json").is_file()  # the run's tokenizer travels along


HF_KINDS = {
    "gqa": ("llama-gqa", {}),
    "qwen2-bias": ("qwen2-bias", {}),
    "llama3-rope": ("llama3-rope", {}),
    "linear-rope": ("linear-rope", {"tie_word_embeddings": True}),
}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory, hf_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist_hf")
    return {
        name: make_hf(root / name, kind, hf_tokenizer, seed=i, **extra)
        for i, (name, (kind, extra)) in enumerate(HF_KINDS.items())
    }


def test_hf_to_torch_dist_loads_strictly_in_megatron_core(hf_models, tmp_path):
    """Hugging Face -> torch_dist (chunks cut for TP 1 or 2, either layer spec's args): megatron-core's
    dist_checkpointing.load finds exactly the keys GPTModel.sharded_state_dict() asks for (none missing, none
    unexpected) at TP 1 and at TP 2, and the loaded GPTModel's logits equal transformers' within 1e-5."""
    cases, want = [], {}
    for name, src in hf_models.items():
        for tp, impl in ((1, "local"), (2, "transformer_engine")):
            out = tmp_path / f"{name}-tp{tp}"
            convert("hf", "megatron", src, out, tp=tp, ckpt_format="torch_dist", transformer_impl=impl)
            toks = tokens(100)
            with torch.no_grad():
                want[name] = hf_model(src)(torch.tensor(toks)).logits
            for load_tp in (1, 2):
                cases.append(
                    dict(
                        name=f"{name}-tp{tp}-load{load_tp}",
                        tp=load_tp,
                        megatron=str(out),
                        tokens=toks,
                        logits=str(tmp_path / f"{name}-tp{tp}-load{load_tp}.pt"),
                        hf=name,
                    )
                )
    results = oracle("load-dist", cases, tmp_path)
    assert sorted(results) == sorted(c["name"] for c in cases)
    for case in cases:
        r = results[case["name"]]
        assert r["missing"] == [] and r["unexpected"] == [], r
        assert r["iteration"] == 1 and r["tp"] == case["tp"]
        diff = (torch.load(case["logits"]) - want[case["hf"]]).abs().max().item()
        assert diff < 1e-5, (case["name"], diff)


def test_torch_dist_layout(hf_models, tmp_path):
    """What --ckpt-format torch_dist writes: Megatron-LM's iteration folder (metadata.json, common.pt, .metadata,
    __0_N.distcp, one file per layer), args with what a load checks, global tensors stacked over layers with each
    layer's chunks cut as TP ranks hold them (fc1: gate_r at chunk r, up_r at chunk TP + r), the vocabulary padded
    to 128 x TP with copies of the last row, one _extra_state object per layer and module, and no optimizer state."""
    src = hf_models["qwen2-bias"]
    result = convert("hf", "megatron", src, tmp_path / "mg", tp=2, pp=2, ckpt_format="torch_dist")
    it_dir = dist_dir(tmp_path / "mg")
    assert it_dir.name == "iter_0000001" and (tmp_path / "mg" / "hf" / "config.json").is_file()
    assert json.loads((it_dir / "metadata.json").read_text()) == {
        "sharded_backend": "torch_dist",
        "sharded_backend_version": 1,
        "common_backend": "torch",
        "common_backend_version": 1,
    }
    assert sorted(p.name for p in it_dir.glob("*.distcp")) == sorted(
        f"__0_{i}.distcp" for i in range(4 + 2)
    )  # embedding, 4 layers, norm
    common = dist_common(tmp_path / "mg")
    assert common["checkpoint_version"] == 3.0 and common["iteration"] == 1
    assert common["content_metadata"] == {"singleton_local_shards": False, "chained_optim_avoid_prefix": True}
    args = common["args"]
    assert (args.ckpt_format, args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (
        "torch_dist",
        2,
        2,
    )
    assert (args.vocab_size, args.padded_vocab_size, args.no_save_optim, args.no_save_rng) == (100, 256, True, True)
    assert (args.num_layers, args.hidden_size, args.num_attention_heads, args.add_position_embedding) == (
        4,
        64,
        4,
        True,
    )
    assert "--ckpt-format torch_dist" in result.notes[-1] and "--finetune" in result.notes[-1]
    assert "--no-load-optim --no-load-rng" in result.notes[-1]

    import torch.distributed.checkpoint as dcp

    md = dcp.FileSystemReader(str(it_dir)).read_metadata().state_dict_metadata
    fc1 = md["decoder.layers.mlp.linear_fc1.weight"]
    assert tuple(fc1.size) == (4, 192, 64)
    assert sorted(tuple(c.offsets) for c in fc1.chunks if c.offsets[0] == 0) == [
        (0, 0, 0),
        (0, 48, 0),
        (0, 96, 0),
        (0, 144, 0),
    ]
    assert {tuple(c.sizes) for c in md["decoder.layers.self_attention.linear_proj.weight"].chunks} == {(1, 64, 32)}
    assert not any(k.startswith(("optimizer", "rng_state")) for k in md)
    assert dist_objects(tmp_path / "mg") == {
        f"decoder.layers.{m}._extra_state/shard_{i}_4"
        for i in range(4)
        for m in ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1", "mlp.linear_fc2")
    }
    got, hf = dist_tensors(tmp_path / "mg"), read_safetensors(src)
    emb = got["embedding.word_embeddings.weight"]
    assert emb.shape == (256, 64) and "output_layer.weight" not in got  # tied
    assert torch.equal(emb[:100], hf["model.embed_tokens.weight"]) and (emb[100:] == emb[99]).all()
    gate, up = hf["model.layers.3.mlp.gate_proj.weight"], hf["model.layers.3.mlp.up_proj.weight"]
    assert torch.equal(got["decoder.layers.mlp.linear_fc1.weight"][3], torch.cat([gate, up]))
    assert torch.equal(
        got["decoder.layers.self_attention.linear_qkv.layer_norm_weight"][2],
        hf["model.layers.2.input_layernorm.weight"],
    )


def test_torch_dist_round_trips_are_exact(saved, hf_models, tmp_path):
    """torch_dist (megatron-core's, TP 2) -> torch (TP 2, PP 2) -> torch_dist gives back every tensor bit for bit
    (the padded vocabulary rows, which megatron-core fills at random, become copies of the last row) and the same
    _extra_state objects; torch_dist -> torch_dist reshards exactly; hf -> torch_dist -> hf gives back every tensor,
    config.json and the tokenizer files; torch_dist -> cookbook -> torch_dist is exact."""
    a = Path(saved["gqa-bias-tp2"]["megatron"])
    convert("megatron", "megatron", a, tmp_path / "b", tp=2, pp=2)
    assert megatron_files(tmp_path / "b")[1, 1]["args"].ckpt_format == "torch"
    convert("megatron", "megatron", tmp_path / "b", tmp_path / "c", tp=2, ckpt_format="torch_dist")
    want, got = dist_tensors(a), dist_tensors(tmp_path / "c")
    assert sorted(want) == sorted(got)
    for key, value in want.items():
        if key in ("embedding.word_embeddings.weight", "output_layer.weight"):
            assert (got[key][700:] == value[699]).all()
            value, got[key] = value[:700], got[key][:700]
        assert torch.equal(value, got[key]), key
    objects = {k for k in dist_objects(a) if "_extra_state" in k}
    assert objects == dist_objects(tmp_path / "c")

    convert("megatron", "megatron", tmp_path / "c", tmp_path / "d", tp=1, ckpt_format="torch_dist")
    convert("megatron", "cookbook", tmp_path / "d", tmp_path / "ck")
    convert("cookbook", "megatron", tmp_path / "ck", tmp_path / "e", tp=2, ckpt_format="torch_dist")
    c, e = dist_tensors(tmp_path / "c"), dist_tensors(tmp_path / "e")
    assert sorted(c) == sorted(e) and all(torch.equal(c[k], e[k]) for k in c)
    assert dist_tensors(tmp_path / "d")["embedding.word_embeddings.weight"].shape == (768, 64)

    for name, src in hf_models.items():
        convert("hf", "megatron", src, tmp_path / f"{name}-dist", tp=2, ckpt_format="torch_dist")
        convert("megatron", "hf", tmp_path / f"{name}-dist", tmp_path / f"{name}-hf")
        want, got = read_safetensors(src), read_safetensors(tmp_path / f"{name}-hf")
        assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want), name
        assert side_files(tmp_path / f"{name}-hf") == side_files(src), name


def test_an_iteration_folder_and_release_read_too(saved, tmp_path):
    """--load-dir may name one iter_NNNNNNN folder, or a run whose tracker says 'release'."""
    src = Path(saved["gqa"]["megatron"])
    convert("megatron", "hf", dist_dir(src), tmp_path / "from_iter")
    shutil.copytree(dist_dir(src), tmp_path / "run" / "release")
    (tmp_path / "run" / "latest_checkpointed_iteration.txt").write_text("release")
    convert("megatron", "hf", tmp_path / "run", tmp_path / "from_release")
    want, got = read_safetensors(tmp_path / "from_iter"), read_safetensors(tmp_path / "from_release")
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)


def test_local_spec_names_read_too(hf_models, tmp_path):
    """A torch_dist checkpoint with the local spec's own norm names (input_layernorm, pre_mlp_layernorm, as
    megatron-core stored them before it mapped them to TransformerEngine's) converts to the same model."""
    import torch.distributed.checkpoint as dcp

    src = hf_models["gqa"]
    convert("hf", "megatron", src, tmp_path / "te", tp=2, ckpt_format="torch_dist")
    renamed = {
        k.replace("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight").replace(
            "mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"
        ): v
        for k, v in dist_tensors(tmp_path / "te").items()
    }
    assert "decoder.layers.input_layernorm.weight" in renamed
    local = tmp_path / "local" / "iter_0000001"
    dcp.save(renamed, checkpoint_id=str(local), no_dist=True)
    for name in ("common.pt", "metadata.json"):
        shutil.copyfile(dist_dir(tmp_path / "te") / name, local / name)
    (tmp_path / "local" / "latest_checkpointed_iteration.txt").write_text("1")
    convert("megatron", "hf", tmp_path / "local", tmp_path / "hf")
    want, got = read_safetensors(src), read_safetensors(tmp_path / "hf")
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)


def test_the_index_is_unpickled_without_running_code(hf_models, tmp_path, monkeypatch):
    """megatron-core 0.15's index (an MCoreMetadata with mcore_data) reads as torch's Metadata, without importing
    megatron-core; an index whose pickle would run code is refused with one line, and the code never runs."""
    import dataclasses
    import pickle

    import megatron.core.dist_checkpointing.strategies.torch as mcore_torch
    from torch.distributed.checkpoint.metadata import Metadata

    from cookbook.errors import CookbookError

    src = hf_models["gqa"]
    convert("hf", "megatron", src, tmp_path / "mg", ckpt_format="torch_dist")
    index = dist_dir(tmp_path / "mg") / ".metadata"
    metadata = pickle.loads(index.read_bytes())

    @dataclasses.dataclass
    class MCoreMetadata(Metadata):  # what megatron-core 0.15 pickled
        mcore_data: dict | None = None

    MCoreMetadata.__module__, MCoreMetadata.__qualname__ = mcore_torch.__name__, "MCoreMetadata"
    monkeypatch.setattr(mcore_torch, "MCoreMetadata", MCoreMetadata)
    index.write_bytes(pickle.dumps(MCoreMetadata(**vars(metadata), mcore_data={})))
    assert b"MCoreMetadata" in index.read_bytes()
    convert("megatron", "hf", tmp_path / "mg", tmp_path / "hf")
    want, got = read_safetensors(src), read_safetensors(tmp_path / "hf")
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    metadata.planner_data = Evil()
    index.write_bytes(pickle.dumps(metadata))
    convert("megatron", "hf", tmp_path / "mg", tmp_path / "hf2")  # the placeholder is inert, the index still reads
    assert not marker.exists()
    index.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CookbookError, match="is not a torch.distributed.checkpoint metadata file"):
        convert("megatron", "hf", tmp_path / "mg", tmp_path / "hf3")
    assert not marker.exists() and not (tmp_path / "hf3").exists()


BLOCK_MEGATRON = """
import json, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "megatron" or name.startswith("megatron."):
            raise ImportError(f"{name} is blocked")
sys.meta_path.insert(0, Block())
from recipes.convert import ConvertConfig, run
for source, target, load, save, extra in json.loads(sys.argv[1]):
    run(ConvertConfig(source, target, load, save, **extra), show_progress=False)
assert not [m for m in sys.modules if m.split(".")[0] == "megatron"]
"""


def test_converting_needs_no_megatron_core(saved, hf_models, tmp_path):
    """With megatron-core impossible to import, a checkpoint megatron-core saved (its args hold megatron-core's
    enums) converts to Hugging Face, and Hugging Face converts to torch_dist and back."""
    steps = [
        ("megatron", "hf", saved["gqa-bias-tp2"]["megatron"], str(tmp_path / "hf"), {}),
        ("hf", "megatron", str(hf_models["gqa"]), str(tmp_path / "dist"), {"tp": 2, "ckpt_format": "torch_dist"}),
        ("megatron", "hf", str(tmp_path / "dist"), str(tmp_path / "back"), {}),
    ]
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK_MEGATRON, json.dumps(steps)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[1],
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    convert("megatron", "hf", Path(saved["gqa-bias-tp2"]["megatron"]), tmp_path / "hf_here")
    want, got = read_safetensors(tmp_path / "hf_here"), read_safetensors(tmp_path / "hf")
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)
    want, got = read_safetensors(hf_models["gqa"]), read_safetensors(tmp_path / "back")
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)
