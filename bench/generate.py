"""Benchmark: cookbook's generator (``cookbook.inference.generator.generate`` on the continuous-batching engine: KV cache, batched, the ``cookbook`` distill
backend's core) against Hugging Face transformers' ``LlamaForCausalLM.generate`` on the same model and prompts.

Both sides hold the same weights (our model, randomly initialised, copied into ``LlamaForCausalLM`` through
``cookbook.formats.hf.hf_config`` / ``hf_name``, SDPA attention, in the same dtype on the same device) and decode
the same batch of random prompts (all ``--prompt-len`` tokens long, so no padding on either side) greedily for
exactly ``--new-tokens`` tokens: no end-of-sequence token on either side (HF's ``eos_token_id`` is None), so both
generate the same number of tokens. HF runs its default ``generate`` (dynamic KV cache, no compile).

Timing: one untimed warm-up call per side, then ``--repeats`` rounds alternating the order of the sides (A B,
B A, ...) so that noise on a shared machine falls on both; the median call time per side gives prompts/s
(batch / time) and generated tokens/s (batch x new tokens / time), with the fastest call beside it. Prefill is
inside the timed call on both sides. The greedy tokens of both sides are compared and the agreement printed;
with random weights two tokens may be nearly tied, so a late disagreement in a row can be fp rounding; a
disagreement in fp32 at the first token means the models differ, and the script exits non-zero.

    python bench/generate.py                                 # hidden 512, 8 layers, vocab 32000, batch 8, CPU
    python bench/generate.py --device cuda --dtype bf16 --preset llama2-7b --num-layers 4 --batch-size 32 --threads 0
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.train import OtherLoad, timed  # noqa: E402
from cookbook.errors import CookbookError  # noqa: E402
from cookbook.formats.hf import hf_config, hf_name  # noqa: E402
from cookbook.inference.generator import generate  # noqa: E402
from cookbook.model import ModelConfig, Transformer  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT = dict(
    vocab_size=32000,
    hidden_size=512,
    num_layers=8,
    num_heads=8,
    num_kv_heads=4,
    intermediate_size=1376,
    max_seq_len=2048,
)


def build_config(args) -> ModelConfig:
    if args.preset:
        from cookbook.model.config import preset

        cfg = preset(args.preset)
    else:
        cfg = ModelConfig(**DEFAULT)
    sizes = {
        k: v
        for k, v in (
            ("hidden_size", args.hidden_size),
            ("num_layers", args.num_layers),
            ("vocab_size", args.vocab_size),
        )
        if v
    }
    if args.hidden_size and not args.preset:  # keep the default's proportions: head_dim 64, FFN ~ 8h/3
        sizes |= {
            "num_heads": max(1, args.hidden_size // 64),
            "num_kv_heads": max(1, args.hidden_size // 128),
            "intermediate_size": 256 * round(8 * args.hidden_size / 3 / 256),
        }
    need = args.prompt_len + args.new_tokens
    return cfg.replace(**sizes, max_seq_len=max(cfg.max_seq_len, need), init_std=args.init_std)


def build_models(cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    import transformers

    torch.manual_seed(0)
    with torch.device(device):
        ours = Transformer(cfg)
    ours = ours.to(dtype).eval()
    conf = hf_config(cfg)
    conf.pop("architectures"), conf.pop("model_type")
    config_cls, model_cls = (
        (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)
        if cfg.qkv_bias
        else (transformers.LlamaConfig, transformers.LlamaForCausalLM)
    )
    conf.update(attn_implementation="sdpa", bos_token_id=None, eos_token_id=None, pad_token_id=0)
    with torch.device(device):
        hf = model_cls(config_cls(**conf))
    missing, unexpected = hf.load_state_dict({hf_name(k): v for k, v in ours.state_dict().items()}, strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing) or (missing and not cfg.tie_embeddings):
        raise SystemExit(f"weights do not map onto transformers' model: missing {missing}, unexpected {unexpected}")
    hf = hf.to(dtype).eval()
    hf.generation_config.eos_token_id = hf.generation_config.bos_token_id = None
    hf.generation_config.pad_token_id = 0
    return ours, hf


def compare(a: list[list[int]], b: list[list[int]]) -> tuple[int, list[int]]:
    """(rows that agree in every token, the first differing position of each row that does not)."""
    same, first = 0, []
    for x, y in zip(a, b):
        if x == y:
            same += 1
        else:
            first.append(next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y))))
    return same, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--preset",
        default=None,
        help="a model preset (tiny, llama2-7b, ...); default: hidden 512, "
        "8 layers, 8 heads (4 kv), FFN 1376, vocab 32000 (56M parameters)",
    )
    ap.add_argument("--hidden-size", type=int, default=None)
    ap.add_argument("--num-layers", type=int, default=None)
    ap.add_argument("--vocab-size", type=int, default=None)
    ap.add_argument(
        "--init-std",
        type=float,
        default=0.2,
        help="weight init std: larger than training's 0.02 so "
        "greedy choices are clear and the token comparison means something",
    )
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per side (after one warm-up call each)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (0: leave torch's default)")
    args = ap.parse_args()
    if min(args.batch_size, args.prompt_len, args.new_tokens, args.repeats) < 1:
        raise SystemExit("--batch-size, --prompt-len, --new-tokens and --repeats must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    cfg = build_config(args)
    ours, hf = build_models(cfg, device, dtype)
    prompts = torch.randint(
        0, cfg.vocab_size, (args.batch_size, args.prompt_len), generator=torch.Generator().manual_seed(1)
    )
    prompt_lists = prompts.tolist()
    ids = prompts.to(device)
    mask = torch.ones_like(ids)
    n = args.new_tokens

    def run_ours() -> list[list[int]]:
        return generate(ours, prompt_lists, n, temperature=0, eos_id=None)

    def run_hf() -> list[list[int]]:
        with torch.no_grad():
            out = hf.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        return out[:, args.prompt_len :].tolist()

    print(
        f"model: {args.preset or 'default'} (hidden {cfg.hidden_size}, {cfg.num_layers} layers, {cfg.num_heads} heads, "
        f"{cfg.num_kv_heads} kv heads, FFN {cfg.intermediate_size}, vocab {cfg.vocab_size}; "
        f"{cfg.num_params() / 1e6:.1f}M parameters)"
    )
    print(
        f"batch: {args.batch_size} prompts x {args.prompt_len} tokens, {n} new tokens each, greedy; {args.dtype}; "
        f"{device.type}; threads {torch.get_num_threads()}; cpus {os.cpu_count()}; "
        f"{platform.processor() or platform.machine()}; torch {torch.__version__}; transformers {transformers.__version__}"
    )

    sides = {"cookbook": run_ours, "hf": run_hf}
    first = {name: fn() for name, fn in sides.items()}  # warm-up, not timed
    for name, out in first.items():
        if any(len(row) != n for row in out):
            raise SystemExit(f"{name} generated {sorted({len(r) for r in out})} tokens per row, not {n}")
    same, where = compare(first["cookbook"], first["hf"])
    print(
        f"same greedy tokens: {'yes' if same == args.batch_size else 'no'} ({same}/{args.batch_size} rows agree in all "
        f"{n} tokens" + (f"; the others first differ at token {sorted(where)}" if where else "") + ")"
    )
    if args.dtype == "fp32" and 0 in where:
        raise SystemExit("cookbook and hf choose different first tokens in fp32: the models are not the same")

    times: dict[str, list[float]] = {name: [] for name in sides}
    other = OtherLoad()
    other.start()
    for r in range(args.repeats):
        for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:
            times[name].append(timed(sides[name], device)[0])
    other_share = other.stop()

    med = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    tokens = args.batch_size * n
    print(f"\n{'side':8s} {'median s':>9s} {'min s':>7s} {'prompts/s':>10s} {'tokens/s':>9s} {'vs hf':>6s}")
    for name in sides:
        print(
            f"{name:8s} {med[name]:9.3f} {best[name]:7.3f} {args.batch_size / med[name]:10.2f} {tokens / med[name]:9.1f} "
            f"{med['hf'] / med[name]:5.2f}x"
        )
    print(
        f"ratio cookbook/hf: {med['hf'] / med['cookbook']:.2f}x (prompts/s and tokens/s; median of {args.repeats} calls "
        f"per side, alternating); fastest call of each: {best['hf'] / best['cookbook']:.2f}x"
    )
    if other_share is not None:
        print(
            f"other processes used {100 * other_share:.0f}% of the machine's CPU time during the timed calls; above a "
            "few % the figures are disturbed"
        )


if __name__ == "__main__":
    try:
        main()
    except CookbookError as e:
        sys.exit(f"error: {e}")
