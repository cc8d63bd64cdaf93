"""cookbook convert to and from Megatron-LM: megatron-core's GPTModel as the oracle, TP/PP shards that
reassemble exactly, exact round trips, and the legacy (pre-mcore) and TransformerEngine key names."""

from __future__ import annotations

import argparse
import enum
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_convert import VOCAB, load_megatron, make_hf, megatron_files, read_safetensors, reassemble, side_files

from cookbook.formats.pickles import TorchFileWriter
from recipes.convert import ConvertConfig, run

pytest.importorskip("transformers")
pytest.importorskip("megatron.core")

FFN = 96  # helpers_convert.SHAPES


def convert(source: str, target: str, load: Path, save: Path, **kw):
    return run(ConvertConfig(source, target, str(load), str(save), **kw), show_progress=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory, hf_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("megatron_hf")
    gqa = {"num_attention_heads": 8, "num_key_value_heads": 4}  # 4 groups of 2 heads: TP 4 divides them
    kinds = {
        "gqa": ("llama-gqa", gqa),
        "mha-tied": ("llama-mha-tied", {}),
        "mha": ("llama-gqa", {"num_key_value_heads": 4}),
        "gqa-tied": ("llama-gqa", {**gqa, "tie_word_embeddings": True}),
        "qwen2-bias": ("qwen2-bias", {}),
        "llama3-rope": ("llama3-rope", {}),
        "linear-rope": ("linear-rope", {}),
    }
    return {
        name: make_hf(root / name, kind, hf_tokenizer, seed=i, **extra)
        for i, (name, (kind, extra)) in enumerate(kinds.items())
    }


@pytest.fixture(scope="module")
def tp1(models, tmp_path_factory) -> dict[str, Path]:
    """Every model converted to Megatron-LM at TP=1, PP=1 with the local layer spec."""
    root = tmp_path_factory.mktemp("megatron_tp1")
    for name, src in models.items():
        convert("hf", "megatron", src, root / name, transformer_impl="local")
    return {name: root / name for name in models}


def test_megatron_core_gpt_model_is_the_oracle(models, tp1, tmp_path):
    """megatron-core's GPTModel, built on CPU from the checkpoint's args, loads each TP=1 checkpoint with
    strict=True and its logits equal transformers' within 1e-5; at PP=2 each stage file loads strictly into
    the stage GPTModel builds (embedding first, final norm and output layer last, a tied copy on the last)."""
    cases = [{"name": name, "megatron": str(path), "hf": str(models[name])} for name, path in tp1.items()]
    for name in ("gqa", "mha-tied"):
        convert("hf", "megatron", models[name], tmp_path / f"{name}-pp2", pp=2, transformer_impl="local")
        cases.append({"name": f"{name}-pp2", "megatron": str(tmp_path / f"{name}-pp2"), "stages": True})
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("megatron_gpt.py")), "torch", str(tmp_path / "cases.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    results = {
        r["name"]: r for r in map(json.loads, (line for line in proc.stdout.splitlines() if line.startswith("{")))
    }
    assert sorted(results) == sorted(c["name"] for c in cases)
    for name in tp1:
        assert results[name]["max_diff"] < 1e-5, results[name]
        assert results[name]["padded_vocab"] == 128  # 100 padded to make_vocab_size_divisible_by 128
    assert results["gqa-pp2"]["stages"] == results["mha-tied-pp2"]["stages"] == 2


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("pp", [1, 2])
@pytest.mark.parametrize("name", ["gqa", "mha-tied", "mha", "gqa-tied"])
def test_tp_pp_shards_reassemble_to_tp1(models, tp1, name, tp, pp, tmp_path):
    """Megatron-LM's layout for every TP in {1, 2, 4} and PP in {1, 2}: latest_checkpointed_iteration.txt,
    iter_0000001/mp_rank_TT[_PPP]/model_optim_rng.pt with model, checkpoint_version, iteration and args;
    the vocabulary padded to 128 x TP; and the shards reassemble exactly into the TP=1 tensors."""
    out = tmp_path / "mg"
    convert("hf", "megatron", models[name], out, tp=tp, pp=pp, transformer_impl="local")
    assert (out / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    dirs = sorted(p.name for p in (out / "iter_0000001").iterdir())
    assert dirs == sorted(f"mp_rank_{t:02d}" + (f"_{s:03d}" if pp > 1 else "") for t in range(tp) for s in range(pp))
    files = megatron_files(out)
    for (t, s), f in files.items():
        assert {"model", "checkpoint_version", "iteration", "args"} <= f.keys()
        assert f["iteration"] == 1 and f["checkpoint_version"] == 3.0
        args = f["args"]
        assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size) == (tp, pp)
        assert args.padded_vocab_size == 128 * tp and args.vocab_size == VOCAB
        if s == 0:
            assert f["model"]["embedding.word_embeddings.weight"].shape[0] == 128
        layers = {int(k.split(".")[2]) for k in f["model"] if k.startswith("decoder.layers.")}
        assert layers == set(range(4 // pp))
    want = load_megatron(tp1[name] / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt")["model"]
    got = reassemble(files, FFN)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if key in ("embedding.word_embeddings.weight", "output_layer.weight"):  # padded rows: copies of the last
            assert got[key].shape[0] == 128 * tp and (got[key][VOCAB:] == value[VOCAB - 1]).all(), key
            got[key], value = got[key][:VOCAB], value[:VOCAB]
        assert (value is None and got[key] is None) or torch.equal(value, got[key]), key


def test_megatron_round_trips_are_exact(models, tmp_path):
    """HF -> Megatron (TP 2, PP 2) -> HF gives back every tensor, config.json and the tokenizer files;
    Megatron -> Megatron reshards (TP 2 PP 2 -> TP 1 PP 1 -> TP 4 PP 2) and Megatron -> cookbook -> Megatron
    give back the same files' tensors."""
    src = models["qwen2-bias"]
    convert("hf", "megatron", src, tmp_path / "a", tp=2, pp=2)
    convert("megatron", "hf", tmp_path / "a", tmp_path / "hf")
    want, got = read_safetensors(src), read_safetensors(tmp_path / "hf")
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert side_files(tmp_path / "hf") == side_files(src)
    convert("megatron", "megatron", tmp_path / "a", tmp_path / "b")
    convert("megatron", "megatron", tmp_path / "b", tmp_path / "c", tp=2, pp=4)
    convert("megatron", "cookbook", tmp_path / "c", tmp_path / "ck")
    convert("cookbook", "megatron", tmp_path / "ck", tmp_path / "d", tp=2, pp=2)
    a, d = megatron_files(tmp_path / "a"), megatron_files(tmp_path / "d")
    assert sorted(a) == sorted(d)
    for key in a:
        assert sorted(a[key]["model"]) == sorted(d[key]["model"])
        for name, value in a[key]["model"].items():
            assert (value is None and d[key]["model"][name] is None) or torch.equal(value, d[key]["model"][name]), (
                key,
                name,
            )
    b, a1 = reassemble(megatron_files(tmp_path / "b"), FFN), reassemble(a, FFN)  # TP 1 and TP 2: padded differently
    assert sorted(a1) == sorted(b)
    for k, v in b.items():
        rows = VOCAB if k in ("embedding.word_embeddings.weight", "output_layer.weight") else None
        assert v is None or torch.equal(v[:rows], a1[k][:rows]), k


def test_transformer_engine_names(models, tp1, tmp_path):
    """--transformer-impl transformer_engine (the default) writes the norms fused into linear_qkv and
    linear_fc1 (layer_norm_weight) and an _extra_state (None) for TransformerEngine's modules, core
    attention included; the tensors are the local spec's, and the checkpoint reads back exactly."""
    convert("hf", "megatron", models["gqa"], tmp_path / "te")
    te = megatron_files(tmp_path / "te")[0, 0]["model"]
    local = megatron_files(tp1["gqa"])[0, 0]["model"]
    renamed = {}
    for key, value in local.items():
        key = key.replace("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight")
        renamed[key.replace("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight")] = value
    for i in range(4):
        renamed[f"decoder.layers.{i}.self_attention.core_attention._extra_state"] = None
    assert sorted(te) == sorted(renamed)
    assert all((v is None and te[k] is None) or torch.equal(v, te[k]) for k, v in renamed.items())
    assert megatron_files(tmp_path / "te")[0, 0]["args"].transformer_impl == "transformer_engine"
    convert("megatron", "hf", tmp_path / "te", tmp_path / "hf")
    want, got = read_safetensors(models["gqa"]), read_safetensors(tmp_path / "hf")
    assert all(torch.equal(want[k], got[k]) for k in want)


LEGACY = {  # mcore (local spec) name -> Megatron-LM's pre-mcore name (REFERENCE.md), inside model["language_model"]
    "embedding.word_embeddings.weight": ("embedding", "word_embeddings.weight"),
    "decoder.final_layernorm.weight": ("encoder", "final_norm.weight"),
    "output_layer.weight": ("output_layer", "weight"),
}
LEGACY_LAYER = {
    "input_layernorm.weight": "input_norm.weight",
    "self_attention.linear_qkv.weight": "self_attention.query_key_value.weight",
    "self_attention.linear_qkv.bias": "self_attention.query_key_value.bias",
    "self_attention.linear_proj.weight": "self_attention.dense.weight",
    "pre_mlp_layernorm.weight": "post_attention_norm.weight",
    "mlp.linear_fc1.weight": "mlp.dense_h_to_4h.weight",
    "mlp.linear_fc2.weight": "mlp.dense_4h_to_h.weight",
}


def legacy_copy(src: Path, dst: Path) -> None:
    """Rewrite a converted checkpoint as the Megatron Cookbook's Megatron-LM saved it: nested
    model["language_model"]["embedding"|"encoder"|"output_layer"] dicts, pre-mcore names, no _extra_state."""
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.name != "model_optim_rng.pt":
            target.write_bytes(path.read_bytes())
        else:
            f = load_megatron(path)
            lm = {}
            for key, value in f["model"].items():
                if key.endswith("_extra_state"):
                    continue
                if key in LEGACY:
                    part, name = LEGACY[key]
                    lm.setdefault(part, {})[name] = value
                else:
                    _, _, i, rest = key.split(".", 3)
                    lm.setdefault("encoder", {})[f"layers.{i}.{LEGACY_LAYER[rest]}"] = value
            f["model"] = {"language_model": lm}
            del f["args"].transformer_impl, f["args"].use_mcore_models
            torch.save(f, target)


@pytest.mark.parametrize("name", ["gqa", "qwen2-bias"])
def test_legacy_megatron_names(models, name, tmp_path):
    """Checkpoints with Megatron-LM's pre-mcore names (language_model.encoder.layers.N.self_attention.
    query_key_value.weight, ...) at TP 2, PP 2 convert to the same Hugging Face model."""
    convert("hf", "megatron", models[name], tmp_path / "mcore", tp=2, pp=2, transformer_impl="local")
    legacy_copy(tmp_path / "mcore", tmp_path / "legacy")
    assert (
        "language_model"
        in load_megatron(tmp_path / "legacy" / "iter_0000001" / "mp_rank_01_001" / "model_optim_rng.pt")["model"]
    )
    convert("megatron", "hf", tmp_path / "legacy", tmp_path / "hf")
    want, got = read_safetensors(models[name]), read_safetensors(tmp_path / "hf")
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)


def test_unknown_classes_load_inert_and_code_never_runs(models, tmp_path):
    """Real Megatron-LM args hold enums, TransformerEngine keeps BytesIO extra state and the RNG state holds numpy
    arrays: they load as inert placeholders under weights_only=True. A pickle that would run code is refused
    with one line, and the code never runs."""
    import io
    import os

    from cookbook.errors import CookbookError

    convert("hf", "megatron", models["gqa"], tmp_path / "mg", transformer_impl="local")
    path = tmp_path / "mg" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    f = load_megatron(path)
    f["args"].attention_backend = Backend.auto
    f["model"]["decoder.layers.0.mlp.linear_fc1._extra_state"] = io.BytesIO(b"fp8 meta")
    f["rng_state"] = [{"random_rng_state": ("MT19937", list(range(3))), "np_rng_state": torch.ones(2).numpy()}]
    torch.save(f, path)
    convert("megatron", "hf", tmp_path / "mg", tmp_path / "hf")
    want, got = read_safetensors(models["gqa"]), read_safetensors(tmp_path / "hf")
    assert all(torch.equal(want[k], got[k]) for k in want)

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    f["args"].tokenizer_type = Evil()
    torch.save(f, path)
    with pytest.raises(CookbookError, match="posix.system"):
        convert("megatron", "hf", tmp_path / "mg", tmp_path / "hf2")
    assert not marker.exists() and not (tmp_path / "hf2").exists()


class Backend(enum.Enum):  # stands for megatron.core.transformer.enums.AttnBackend in real args
    auto = 5


@pytest.mark.parametrize("path", ["fake tensors", "mmap"])
def test_older_torch_reading_paths(models, tmp_path, monkeypatch, path):
    """Where torch.load(map_location="meta") does not record offsets (an older torch), the structure comes from
    FakeTensorMode; where no offsets are known at all, from a memory map. Both read the same tensors."""
    from cookbook.formats import pickles

    convert("hf", "megatron", models["qwen2-bias"], tmp_path / "mg", tp=2, pp=2)
    monkeypatch.setattr(pickles, "_meta_load_keeps_offsets", lambda: False)
    if path == "mmap":
        monkeypatch.setattr(pickles, "_lazy", lambda tensor: False)
    convert("megatron", "hf", tmp_path / "mg", tmp_path / "hf")
    want, got = read_safetensors(models["qwen2-bias"]), read_safetensors(tmp_path / "hf")
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)


def test_streaming_writer_matches_torch_save(tmp_path):
    """The one-tensor-at-a-time pickle writer gives a file torch.load reads (mmap and weights_only too) to the
    same objects as torch.save."""
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.bfloat16), "c": torch.randn(4, 6).t()}
    w = TorchFileWriter(tmp_path / "x.pt")
    refs = {k: w.add(v) for k, v in tensors.items()}
    w.close({"model": {**refs, "none": None}, "args": argparse.Namespace(n=1), "iteration": 3})
    for mmap in (False, True):
        with torch.serialization.safe_globals([argparse.Namespace]):
            got = torch.load(tmp_path / "x.pt", weights_only=True, mmap=mmap)
        assert got["iteration"] == 3 and got["args"].n == 1 and got["model"]["none"] is None
        assert all(torch.equal(got["model"][k], v) and got["model"][k].dtype == v.dtype for k, v in tensors.items())
