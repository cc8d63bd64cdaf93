"""megatron-core's GPTModel as the oracle for converted Megatron-LM checkpoints, on CPU.

    python tests/megatron_gpt.py CASES.json   ->  prints one JSON line per case

Each case names a converted checkpoint (``megatron``), the Hugging Face model it came from (``hf``)
and, optionally, ``"stages": true``. For a TP=1, PP=1 checkpoint the GPTModel built from its args (local
layer spec) loads the state dict with ``strict=True`` and we report the largest logit difference from
transformers on the same tokens. With ``stages``, each pipeline stage's file is loaded with
``strict=True`` into the GPTModel stage megatron-core builds for it (pre_process on the first,
post_process on the last).

megatron-core runs here on CPU with a gloo world of one; three CUDA assumptions of its forward are
sidestepped: ``torch.cuda.current_device`` answers "cpu" (RoPE frequencies), the causal mask is
passed in (the default builds it on "cuda"), and the CUDA RNG tracker's fork (dropout, 0 here) is a
no-op.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", str(20000 + os.getpid() % 20000))


def setup():
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    torch.cuda.current_device = lambda: "cpu"
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()


def gpt(args, num_layers: int, pre_process: bool = True, post_process: bool = True):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels, normalization=args.normalization, layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu, activation_func=F.silu, add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias, use_cpu_initialization=True, bias_activation_fusion=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, attention_dropout=0.0, hidden_dropout=0.0,
    )
    return GPTModel(
        config, get_gpt_layer_local_spec(normalization=args.normalization), vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings, pre_process=pre_process, post_process=post_process,
        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        seq_len_interpolation_factor=args.rotary_seq_len_interpolation_factor,
        rope_scaling=args.use_rope_scaling, rope_scaling_factor=args.rope_scaling_factor,
    ).eval()


def check(case: dict) -> dict:
    from pathlib import Path

    import transformers

    from helpers_convert import megatron_files

    files = megatron_files(Path(case["megatron"]))
    args = files[0, 0]["args"]
    result = {"name": case["name"]}
    if case.get("stages"):
        pp = args.pipeline_model_parallel_size
        for s in range(pp):
            model = gpt(args, args.num_layers // pp, pre_process=s == 0, post_process=s == pp - 1)
            model.load_state_dict(files[0, s]["model"], strict=True)
        result["stages"] = pp
        return result
    model = gpt(args, args.num_layers)
    model.load_state_dict(files[0, 0]["model"], strict=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(case["hf"], dtype=torch.float32).eval()
    torch.manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (2, 48))
    positions = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    mask = torch.triu(torch.ones(1, 1, tokens.shape[1], tokens.shape[1]), diagonal=1).bool()
    with torch.no_grad():
        ours = model(tokens, positions, mask)[..., : args.vocab_size]
        theirs = hf(tokens).logits
    result["max_diff"] = (ours - theirs).abs().max().item()
    result["padded_vocab"] = model.state_dict()["embedding.word_embeddings.weight"].shape[0]
    return result


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    setup()
    for case in json.loads(open(sys.argv[1]).read()):
        print(json.dumps(check(case)), flush=True)
