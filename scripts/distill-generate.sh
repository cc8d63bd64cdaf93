#!/usr/bin/env bash
# Synthetic data from a 67-72B teacher (the Megatron Cookbook distilled Qwen-72B and DeepSeek-67B into its 13B):
# prompts are the first 128 teacher tokens of pretraining documents, the teacher continues them in vLLM with tensor
# parallel 8 on one node, and the output is sharded jsonl, 2048 prompts per shard ({"prefix", "text": prefix +
# continuation, ...}). Sampling as the original: temperature 0.7, top-p 0.9, up to 4096 new tokens, frequency
# penalty 0.5, repetition penalty 2, stop at <|endoftext|> (REFERENCE.md, "Distillation").
#   bash scripts/distill-generate.sh --dry-run                       check the job here, without GPUs
#   TEACHER=/models/Qwen-72B PROMPTS=data/pile.jsonl bash scripts/distill-generate.sh
# Many nodes: start `vllm serve $TEACHER --tensor-parallel-size 8` on each and give their URLs, comma-separated:
#   ENDPOINTS=http://node1:8000,http://node2:8000 bash scripts/distill-generate.sh
# Rerunning the same command continues where it stopped (complete shards are kept, no duplicates, no gaps).
set -euo pipefail

TEACHER=${TEACHER:-/models/Qwen-72B}
PROMPTS=${PROMPTS:-data/pile.jsonl}  # jsonl documents (tokenized with the teacher's tokenizer) or an indexed dataset prefix
OUTPUT=${OUTPUT:-synthetic/$(basename "$TEACHER")}
NUM_PROMPTS=${NUM_PROMPTS:-2500000}  # ~10B tokens of continuations at ~4k tokens each

ARGS=(
    --teacher "$TEACHER" --prompts-from "$PROMPTS" --prefix-tokens 128 --num-prompts "$NUM_PROMPTS" --seed 1234
    --temperature 0.7 --top-p 0.9 --max-tokens 4096 --frequency-penalty 0.5 --repetition-penalty 2 --stop '<|endoftext|>'
    --min-tokens 64 --max-repeat-ratio 0.5
    --output "$OUTPUT"
)
if [[ -n "${ENDPOINTS:-}" ]]; then
    # 256 requests in flight per server (vLLM's default max_num_seqs); shards of 8192 prompts keep several waves in
    # each, so the servers seldom wait for a shard's slowest completions
    ARGS+=(--backend openai --endpoint "$ENDPOINTS" --served-model-name "${SERVED_MODEL_NAME:-$TEACHER}" --concurrency 256
           --prompts-per-shard "${PROMPTS_PER_SHARD:-8192}")
else
    ARGS+=(--backend vllm --tensor-parallel-size "${TP:-8}" --gpu-memory-utilization 0.9 --prompts-per-shard 2048)
fi

exec cookbook distill generate "${ARGS[@]}" "$@"
