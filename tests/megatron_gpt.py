"""megatron-core's GPTModel as the oracle for Megatron-LM checkpoints, on CPU.

    python tests/megatron_gpt.py [torch] CASES.json                    one JSON line per case
    torchrun --nproc-per-node 2 tests/megatron_gpt.py save-dist CASES.json
    torchrun --nproc-per-node 2 tests/megatron_gpt.py load-dist CASES.json

``torch``: each case names a converted legacy checkpoint (``megatron``), the Hugging Face model it came from
(``hf``) and, optionally, ``"stages": true``. For a TP=1, PP=1 checkpoint the GPTModel built from its args
(local layer spec) loads the state dict with ``strict=True`` and we report the largest logit difference from
transformers on the same tokens. With ``stages``, each pipeline stage's file is loaded with ``strict=True``
into the GPTModel stage megatron-core builds for it (pre_process on the first, post_process on the last).

``save-dist``: each case (``spec``: the model's shape and RoPE, ``tp``, ``pp``) is a random GPTModel, built at
that TP (or as that PP's stages) and saved by ``dist_checkpointing.save`` as Megatron-LM saves a run with
``--ckpt-format torch_dist``: the model's ``sharded_state_dict()`` (optionally with ``singleton_local_shards``),
``args`` as Megatron-LM records them, Adam's moments as optimizer state, the RNG state and the scheduler; then
its logits on ``tokens`` (gathered over TP, unpadded; with PP, of the whole model megatron-core loads back from
the stages' checkpoint) go to ``logits``.

``load-dist``: each case names a torch_dist checkpoint (``megatron``); the GPTModel built at ``tp`` from the
args in its common.pt asks ``dist_checkpointing.load`` for its ``sharded_state_dict()`` with strict checking
(every key the model asks for is there, and nothing else is), loads the result with ``strict=True`` and
writes its logits on ``tokens`` to ``logits``.

megatron-core runs here on CPU with gloo; its CUDA assumptions are sidestepped: ``torch.cuda.current_device``
answers "cpu" (RoPE frequencies), ``torch.cuda.synchronize`` does nothing (checkpoint saving), ``Tensor.cuda``
keeps a tensor where it is (the tied embedding's all-reduce between pipeline stages), the causal mask is passed
in (the default builds it on "cuda"), and the CUDA RNG tracker's fork (dropout, 0 here) is a no-op.
dist_checkpointing.save starts a helper process with ``spawn``, hence the ``__main__`` guard.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import warnings

import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("MASTER_PORT", str(20000 + os.getpid() % 20000))


def setup():
    import torch.distributed as dist
    from megatron.core import tensor_parallel

    dist.init_process_group(
        "gloo", rank=int(os.environ.get("RANK", 0)), world_size=int(os.environ.get("WORLD_SIZE", 1))
    )
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    torch.Tensor.cuda = lambda self, *a, **k: self  # the tied output layer's copy at PP > 1 is all-reduced "on cuda"
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()


def parallel(tp: int, pp: int = 1) -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tp, pp)


def gpt(args, num_layers: int, pre_process: bool = True, post_process: bool = True):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(
        num_layers=num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu,
        add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias,
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        tensor_model_parallel_size=_tp(),
        pipeline_model_parallel_size=_pp(),
        pipeline_dtype=torch.float32,
    )
    return GPTModel(
        config,
        get_gpt_layer_local_spec(normalization=args.normalization),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        seq_len_interpolation_factor=args.rotary_seq_len_interpolation_factor,
        rope_scaling=args.use_rope_scaling,
        rope_scaling_factor=args.rope_scaling_factor,
    ).eval()


def _tp() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


def _pp() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_world_size()


def logits(model, tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """The model's logits on ``tokens``, gathered over TP ranks, without the padded vocabulary."""
    from megatron.core import parallel_state

    positions = torch.arange(tokens.shape[1])[None].expand_as(tokens)
    mask = torch.triu(torch.ones(1, 1, tokens.shape[1], tokens.shape[1]), diagonal=1).bool()
    with torch.no_grad():
        out = model(tokens, positions, mask)
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(out) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, out.contiguous(), group=group)
    return torch.cat(parts, dim=-1)[..., :vocab]


# --------------------------------------------------------------------------- legacy torch checkpoints


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
    with torch.no_grad():
        ours = logits(model, tokens, args.vocab_size)
        theirs = hf(tokens).logits
    result["max_diff"] = (ours - theirs).abs().max().item()
    result["padded_vocab"] = model.state_dict()["embedding.word_embeddings.weight"].shape[0]
    return result


# --------------------------------------------------------------------------- torch_dist checkpoints


def run_args(spec: dict, tp: int, pp: int) -> argparse.Namespace:
    """The args a Megatron-LM run of this model records (as its arguments.py names them): no vocab_size (the
    tokenizer decides it), the vocabulary padded to 128 x TP, and an enum as real args hold."""
    from megatron.core.transformer.enums import AttnBackend

    vocab, heads = spec["vocab"], spec["heads"]
    multiple = 128 * tp
    interp = spec.get("interpolation")
    return argparse.Namespace(
        num_layers=spec["layers"],
        hidden_size=spec["hidden"],
        ffn_hidden_size=spec["ffn"],
        num_attention_heads=heads,
        group_query_attention=spec["groups"] != heads,
        num_query_groups=spec["groups"],
        kv_channels=spec.get("head_dim") or spec["hidden"] // heads,
        max_position_embeddings=spec.get("max_positions", 64),
        seq_length=spec.get("max_positions", 64),
        position_embedding_type="rope",
        use_rotary_position_embeddings=False,
        rotary_base=spec.get("theta", 10000),
        rotary_percent=1.0,
        rotary_interleaved=False,
        rotary_seq_len_interpolation_factor=interp,
        use_rope_scaling=False,
        rope_scaling_factor=8.0,
        normalization="RMSNorm",
        norm_epsilon=spec.get("eps", 1e-5),
        apply_layernorm_1p=False,
        swiglu=True,
        add_bias_linear=False,
        add_qkv_bias=spec.get("qkv_bias", False),
        untie_embeddings_and_output_weights=not spec.get("tied", False),
        num_experts=None,
        vocab_size=None,
        padded_vocab_size=-(-vocab // multiple) * multiple,
        make_vocab_size_divisible_by=128,
        tokenizer_type="HuggingFaceTokenizer",
        tokenizer_model=spec.get("tokenizer"),
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        ckpt_format="torch_dist",
        transformer_impl="local",
        params_dtype=torch.float32,
        attention_backend=AttnBackend.auto,
        use_distributed_optimizer=False,
        consumed_train_samples=640,
        iteration=spec.get("iteration", 20),
    )


def randomize(model, seed: int) -> None:
    """Random norm weights and q/k/v biases too (initialised to 1 and 0), so a swapped tensor cannot go unnoticed."""
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        for i, (name, p) in enumerate(model.named_parameters()):
            if "norm" in name or name.endswith("bias"):  # norms are replicated over TP ranks, biases split
                g = torch.Generator().manual_seed(seed * 1000 + i * 10 + (rank if name.endswith("bias") else 0))
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))


def save_dist(case: dict) -> dict:
    from pathlib import Path

    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    tp, pp = case["tp"], case.get("pp", 1)
    parallel(tp, pp)
    args = run_args(case["spec"], tp, pp)
    torch.manual_seed(case.get("seed", 0))
    model = gpt(
        args, args.num_layers, parallel_state.is_pipeline_first_stage(), parallel_state.is_pipeline_last_stage()
    )
    randomize(model, case.get("seed", 0))
    metadata = {"singleton_local_shards": bool(case.get("singleton")), "chained_optim_avoid_prefix": True}
    model_sd = model.sharded_state_dict(metadata=dict(metadata))
    optimizer = {"state": {}}  # Adam's moments, sharded as the parameters (megatron-core's optimizer naming)
    for moment in ("exp_avg", "exp_avg_sq"):
        optimizer["state"][moment] = {
            k: make_sharded_optimizer_tensor(v, torch.zeros_like(v.data), prefix=f"optimizer.state.{moment}")
            for k, v in model_sd.items()
            if hasattr(v, "data") and isinstance(v.data, torch.Tensor) and not k.endswith("_extra_state")
        }
    ranks = (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank())
    rng = ShardedObject(
        "rng_state",
        [{"random_rng_state": random.getstate(), "torch_rng_state": torch.get_rng_state()}],
        (pp, tp),
        ranks,
        replica_id=parallel_state.get_data_parallel_rank(),
    )
    state = {
        "model": model_sd,
        "optimizer": optimizer,
        "rng_state": rng,
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": args.iteration,
        "opt_param_scheduler": {"num_steps": 640, "max_lr": 3e-4},
        "num_floating_point_operations_so_far": 1.5e12,
    }
    root = Path(case["megatron"])
    it_dir = root / f"iter_{args.iteration:07d}"
    if torch.distributed.get_rank() == 0:
        it_dir.mkdir(parents=True, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(state, str(it_dir), content_metadata=metadata)
    if pp > 1:  # no pipeline schedule here: megatron-core itself reads the stages back into one model
        parallel(tp)
        model = gpt(args, args.num_layers)
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict(metadata=dict(metadata))}, str(it_dir))
        model.load_state_dict(loaded["model"], strict=True)
    out = logits(model, torch.tensor(case["tokens"]), case["spec"]["vocab"])
    if torch.distributed.get_rank() == 0:
        (root / "latest_checkpointed_iteration.txt").write_text(str(args.iteration))
        torch.save(out, case["logits"])
    return {"name": case["name"], "keys": len(model_sd)}


def load_dist(case: dict) -> dict:
    from pathlib import Path

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    tp = case["tp"]
    parallel(tp)
    root = Path(case["megatron"])
    it_dir = root / f"iter_{int((root / 'latest_checkpointed_iteration.txt').read_text()):07d}"
    common = dist_checkpointing.load_common_state_dict(str(it_dir))
    args = common["args"]
    model = gpt(args, args.num_layers)
    content = dist_checkpointing.load_content_metadata(preloaded_state_dict=common) or {}
    request = {"model": model.sharded_state_dict(metadata=dict(content))}  # as Megatron-LM asks, with --finetune
    state, missing, unexpected = dist_checkpointing.load(request, str(it_dir), strict=StrictHandling.RETURN_ALL)
    model.load_state_dict(state["model"], strict=True)
    out = logits(model, torch.tensor(case["tokens"]), args.vocab_size)
    if torch.distributed.get_rank() == 0:
        torch.save(out, case["logits"])
    return {
        "name": case["name"],
        "missing": sorted(missing),
        "unexpected": sorted(unexpected),
        "iteration": common["iteration"],
        "padded_vocab": args.padded_vocab_size,
        "tp": tp,
    }


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    setup()
    mode, path = ("torch", sys.argv[1]) if len(sys.argv) == 2 else sys.argv[1:3]  # the mode defaults to torch
    cases = json.loads(open(path).read())
    if mode == "torch":
        parallel(1)
    for case in cases:
        result = {"torch": check, "save-dist": save_dist, "load-dist": load_dist}[mode](case)
        if torch.distributed.get_rank() == 0:
            print(json.dumps(result), flush=True)
