"""cookbook convert between Hugging Face and cookbook checkpoints: exact round trips, transformers as the oracle.

Models are saved by transformers' own save_pretrained (Llama with GQA, MHA with tied embeddings,
Llama 3 RoPE scaling, linear RoPE scaling, Qwen2 with q/k/v biases and tied embeddings, Mistral),
with a tokenizer beside them; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers_convert import KINDS, VOCAB, hf_model, make_hf, read_safetensors, side_files

from cookbook.data.tokenizer import load_tokenizer
from cookbook.engine.checkpoint import Checkpointer
from cookbook.formats.hf import rope_from_config
from cookbook.inference.load import load_model
from cookbook.model import ModelConfig, Transformer
from recipes.convert import ConvertConfig, run

transformers = pytest.importorskip("transformers")


def convert(source: str, target: str, load: Path, save: Path, **kw):
    return run(ConvertConfig(source, target, str(load), str(save), **kw), show_progress=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory, hf_tokenizer, sp_model) -> dict[str, Path]:
    """One Hugging Face folder per kind; the Llama 2 style ones carry a SentencePiece tokenizer.model."""
    root = tmp_path_factory.mktemp("hf_models")
    return {
        kind: make_hf(root / kind, kind, sp_model if kind == "llama-mha-tied" else hf_tokenizer, seed=i)
        for i, kind in enumerate(KINDS)
    }


@pytest.mark.parametrize("kind", list(KINDS))
def test_hf_cookbook_hf_is_exact(models, kind, tmp_path):
    """HF -> cookbook -> HF: every tensor bitwise equal, config.json and tokenizer files byte for byte (a
    SentencePiece-only source gains the tokenizer.json AutoTokenizer loads), and transformers loads the result
    with no code edits and gives the same logits."""
    src = models[kind]
    convert("hf", "cookbook", src, tmp_path / "ck")
    convert("cookbook", "hf", tmp_path / "ck", tmp_path / "hf")
    want, got = read_safetensors(src), read_safetensors(tmp_path / "hf")
    assert sorted(want) == sorted(got)
    for name in want:
        assert want[name].dtype == got[name].dtype and torch.equal(want[name], got[name]), name
    files, carried = side_files(tmp_path / "hf"), side_files(src)
    assert {name: files[name] for name in carried} == carried  # config.json, tokenizer, generation_config.json
    added = (
        set() if "tokenizer.json" in carried else {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    )
    assert set(files) - set(carried) == added
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(hf_model(tmp_path / "hf")(tokens).logits, hf_model(src)(tokens).logits)


@pytest.mark.parametrize("kind", list(KINDS))
def test_hf_to_cookbook_gives_transformers_logits(models, kind, tmp_path):
    """The converted checkpoint, loaded as eval/generate load it, equals transformers within 1e-5 (fp32),
    beyond max_position_embeddings too where the RoPE scaling matters."""
    convert("hf", "cookbook", models[kind], tmp_path / "ck")
    ours, sections = load_model(tmp_path / "ck", device="cpu")
    theirs = hf_model(models[kind])
    assert ours.config.tie_embeddings == theirs.config.tie_word_embeddings
    assert (ours.config.rope_scaling or {}).get("rope_type") == (KINDS[kind][1].get("rope_scaling") or {}).get(
        "rope_type"
    )
    tokens = torch.randint(0, VOCAB, (2, 80), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(tokens) - theirs(tokens).logits).abs().max().item()
    assert diff < 1e-5, diff
    # the tokenizer travels inside the checkpoint and the config names it
    tok = Path(sections["data"]["tokenizer_model"])
    assert tok.is_absolute() and tok.exists() and str(tok).startswith(str((tmp_path / "ck").absolute()))


def test_sharded_output_and_dtype(models, tmp_path):
    """--max-shard-size splits the safetensors with an index transformers reads; --dtype bf16 casts every
    tensor and config.json says so; a sharded folder converts back exactly."""
    src = models["llama-gqa"]
    convert("hf", "hf", src, tmp_path / "sharded", max_shard_size="60KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    want = read_safetensors(src)
    got = read_safetensors(tmp_path / "sharded")
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in want.values())
    convert("hf", "cookbook", tmp_path / "sharded", tmp_path / "ck", dtype="bf16")
    convert("cookbook", "hf", tmp_path / "ck", tmp_path / "bf16")
    got = read_safetensors(tmp_path / "bf16")
    assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k].bfloat16()) for k in want)
    conf = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert conf.get("dtype", conf.get("torch_dtype")) == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert model.dtype == torch.bfloat16


def test_transformers_4_config_and_pytorch_bin(models, tmp_path):
    """A transformers 4 style config.json (rope_theta + rope_scaling with "type") and pytorch_model.bin weights
    read the same as the safetensors folder; config.json comes back byte for byte."""
    src = tmp_path / "v4"
    src.mkdir()
    state = read_safetensors(models["linear-rope"])
    torch.save(state, src / "pytorch_model.bin")
    conf = json.loads((models["linear-rope"] / "config.json").read_text())
    rope = conf.pop("rope_parameters")
    conf["rope_theta"] = rope.pop("rope_theta")
    conf["rope_scaling"] = {"type": rope["rope_type"], "factor": rope["factor"]}
    (src / "config.json").write_text(json.dumps(conf, indent=2))
    convert("hf", "cookbook", src, tmp_path / "ck")
    convert("cookbook", "hf", tmp_path / "ck", tmp_path / "back")
    assert (tmp_path / "back" / "config.json").read_bytes() == (src / "config.json").read_bytes()
    got = read_safetensors(tmp_path / "back")
    assert all(torch.equal(state[k], got[k]) for k in state)
    tokens = torch.randint(0, VOCAB, (1, 100), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(hf_model(tmp_path / "back")(tokens).logits, hf_model(models["linear-rope"])(tokens).logits)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_trained_checkpoint_converts_to_hf(tmp_path, sp_model):
    """A save the Trainer's Checkpointer wrote (optimizer state, tied output stored under both names, a
    SentencePiece tokenizer named in config.toml) becomes a transformers model with the same logits, a
    fresh config.json, and the tokenizer as tokenizer.model plus the tokenizer.json AutoTokenizer loads (Llama2Tokenizer's
    ids: config.toml names no type); the rope scaling of an extended model is in config.json."""
    cfg = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=96,
        max_seq_len=32,
        tie_embeddings=True,
        rope_scaling={"rope_type": "linear", "factor": 4.0},
    )
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, VOCAB, (1, 8))).sum().backward()
    opt.step()
    sections = {
        "model": {k: v for k, v in cfg.to_dict().items() if v is not None},
        "data": {"tokenizer_model": str(sp_model)},
    }
    Checkpointer(tmp_path / "run", keep_last=0, is_main=True).save(7, model, opt, sections, {"step": 7})
    convert("cookbook", "hf", tmp_path / "run", tmp_path / "hf")
    conf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert conf["rope_scaling"] == {"rope_type": "linear", "factor": 4.0} and conf["tie_word_embeddings"] is True
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == sp_model.read_bytes()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = load_tokenizer(sp_model, "Llama2Tokenizer")
    assert tokenizer.is_fast and all(tokenizer(t).input_ids == ours.tokenize(t) for t in ("  two <s> words", "", "x\n"))
    assert "lm_head.weight" not in read_safetensors(tmp_path / "hf")
    tokens = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(3))  # 64 > max_seq_len 32
    with torch.no_grad():
        diff = (model(tokens) - hf_model(tmp_path / "hf")(tokens).logits).abs().max().item()
    assert diff < 1e-5, diff


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_an_extended_run_keeps_the_hf_config(models, tmp_path):
    """A run started from a converted checkpoint (its tokenizer is the converted hf/ folder) and extended to a
    longer context converts back with the source's config.json, rope_scaling and max_position_embeddings
    brought up to date, every other field (token ids, architecture) kept, and the tokenizer files."""
    src = models["llama-gqa"]
    convert("hf", "cookbook", src, tmp_path / "ck")
    model, sections = load_model(tmp_path / "ck", device="cpu")
    cfg = model.config.replace(rope_scaling={"rope_type": "linear", "factor": 2.0}, max_seq_len=128)
    opt = torch.optim.AdamW(model.parameters())
    sections = {"model": {k: v for k, v in cfg.to_dict().items() if v is not None}, "data": sections["data"]}
    Checkpointer(tmp_path / "extended", keep_last=0, is_main=True).save(5, model, opt, sections, {"step": 5})
    convert("cookbook", "hf", tmp_path / "extended", tmp_path / "hf")
    want, got = json.loads((src / "config.json").read_text()), json.loads((tmp_path / "hf" / "config.json").read_text())
    assert got.pop("max_position_embeddings") == 128 and want.pop("max_position_embeddings") == 64
    assert rope_from_config(got) == (10000.0, {"rope_type": "linear", "factor": 2.0}) and rope_from_config(want) == (
        10000.0,
        None,
    )
    for key in ("rope_parameters", "rope_scaling", "rope_theta"):  # transformers 5 writes the first, 4 the others
        got.pop(key, None), want.pop(key, None)
    assert got == want
    assert {k: v for k, v in side_files(tmp_path / "hf").items() if k != "config.json"} == {
        k: v for k, v in side_files(src).items() if k != "config.json"
    }
    tokens = torch.randint(0, VOCAB, (1, 100), generator=torch.Generator().manual_seed(4))
    ours = Transformer(cfg).eval()
    ours.load_state_dict(model.state_dict())
    with torch.no_grad():
        diff = (ours(tokens) - hf_model(tmp_path / "hf")(tokens).logits).abs().max().item()
    assert diff < 1e-5, diff


def test_pretrain_finetunes_from_a_converted_checkpoint(tmp_path, hf_tokenizer):
    """cookbook pretrain --load CONVERTED --finetune trains from it (no optimizer state needed); with lr 0 the
    weights it saves are the Hugging Face weights, bit for bit, after converting back."""
    from helpers_data import assert_one_line_error
    from helpers_train import check, pretrain, write_token_dataset

    src = make_hf(tmp_path / "hf", "llama-gqa", hf_tokenizer, vocab_size=96)
    result = convert("hf", "cookbook", src, tmp_path / "ck")
    assert any("--finetune" in note for note in result.notes)  # the summary says how to train from it
    data = write_token_dataset(tmp_path / "data" / "tokens", vocab=96)
    flags = [
        "--load",
        str(tmp_path / "ck"),
        "--data-path",
        data,
        "--seq-length",
        "32",
        "--train-iters",
        "1",
        "--micro-batch-size",
        "2",
        "--dtype",
        "fp32",
        "--device",
        "cpu",
        "--lr",
        "0",
        "--min-lr",
        "0",
        "--eval-interval",
        "0",
        "--log-interval",
        "1",
    ]
    # without --finetune there is no optimizer state to resume: one line that says what to do
    assert_one_line_error(pretrain(flags + ["--save", str(tmp_path / "resume")]), "holds weights only", "--finetune")
    proc = check(pretrain(flags + ["--finetune", "--save", str(tmp_path / "run")]))
    assert "finetuning from the weights of" in proc.stdout + proc.stderr
    convert("cookbook", "hf", tmp_path / "run", tmp_path / "back")
    want, got = read_safetensors(src), read_safetensors(tmp_path / "back")
    assert all(torch.equal(want[k], got[k]) for k in want)
    # the run recorded the tokenizer carried in the converted checkpoint, and it came back out
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (hf_tokenizer / "tokenizer.json").read_bytes()
