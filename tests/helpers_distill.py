"""The distillation tests' teacher: a random tiny model as a Hugging Face folder and as a cookbook checkpoint."""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

from cookbook.formats import hf
from cookbook.formats.stream import Checkpoint, expected_shapes
from cookbook.model import ModelConfig, Transformer

# a vocabulary padded past the tokenizer's 600 pieces, as pretraining pads it
TINY = dict(
    vocab_size=640,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=128,
    max_seq_len=128,
    init_std=0.2,
)


def make_teacher(root, tokenizer, **overrides) -> dict:
    """A random tiny model as a Hugging Face folder (the tokenizer inside: a SentencePiece tokenizer.model, or a Hugging
    Face tokenizer folder's files) and converted to a cookbook checkpoint; ``overrides`` change TINY."""
    from recipes.convert import ConvertConfig, run

    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**TINY, **overrides}))
    state = model.state_dict()
    names = list(expected_shapes(model.config))
    files = {f.name: f for f in tokenizer.iterdir()} if tokenizer.is_dir() else {"tokenizer.model": tokenizer}
    ckpt = Checkpoint(
        model.config, lambda: ((n, state[n]) for n in names), {n: state[n].dtype for n in names}, hf_files=files
    )
    (root / "hf").mkdir()
    hf.write(root / "hf", ckpt, ckpt.tensors(), ckpt.dtypes)
    run(ConvertConfig("hf", "cookbook", str(root / "hf"), str(root / "ckpt")), show_progress=False)
    return {"hf": root / "hf", "cookbook": root / "ckpt", "tokenizer": tokenizer, "root": root}


@contextmanager
def serving(cfg, generator=None):
    """A ``cookbook serve`` server (inference_distill.server) answering on loopback in a thread, closed at the end."""
    from inference_distill.server import make_server

    server = make_server(cfg, generator=generator)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
