#!/usr/bin/env bash
# Continue training a 13B student on the teacher's synthetic text (the Megatron Cookbook: 10B synthetic tokens,
# FinEval average 44.91 -> 45.87), blended half and half with original pretraining data, on 4 nodes of 8 GPUs:
# TP 8 + sequence parallel, sequence 4096, global batch 512 (2M tokens; 5000 iterations = 10B tokens), lr 2e-5
# cosine to 2e-6 after 100 warmup iterations, bf16.
#   bash scripts/distill-train-13b.sh --dry-run                          validate here, without GPUs
#   NNODES=4 MASTER_ADDR=node0 LOAD=ckpt/llama2-13b SYNTHETIC=synthetic/Qwen-72B bash scripts/distill-train-13b.sh   on every node
# Logit distillation needs a teacher with the student's tokenizer (Qwen and DeepSeek have their own, so the
# original used synthetic text alone): KD_TEACHER=ckpt/llama2-70b adds --kd-teacher with --kd-ratio 0.5.
# Rerunning the same command continues from $SAVE.
set -euo pipefail

NNODES=${NNODES:-4}
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
LOAD=${LOAD:-ckpt/llama2-13b}
SYNTHETIC=${SYNTHETIC:-synthetic/Qwen-72B}
DATA_PATH=${DATA_PATH:-data/pile_text_document}
SAVE=${SAVE:-ckpt/llama2-13b-distilled}

ARGS=(
    --load "$LOAD" --preset llama2-13b --synthetic "$SYNTHETIC" --data-path $DATA_PATH --synthetic-weight "${SYNTHETIC_WEIGHT:-0.5}"
    --seq-length 4096 --split 998,2,0
    --global-batch-size 512 --micro-batch-size 2 --train-iters "${TRAIN_ITERS:-5000}"
    --lr 2e-5 --min-lr 2e-6 --lr-warmup-iters 100 --lr-decay-style cosine
    --weight-decay 0.1 --clip-grad 1.0 --dtype bf16
    --tensor-model-parallel-size 8 --sequence-parallel --recompute-granularity selective
    --eval-interval 200 --eval-iters 10 --log-interval 10
    --save "$SAVE" --save-interval 200 --keep-last 2
)
if [[ -n "${KD_TEACHER:-}" ]]; then
    ARGS+=(--kd-teacher "$KD_TEACHER" --kd-ratio 0.5 --kd-temperature 1.0)
fi

if [[ "${1:-}" == "--dry-run" ]]; then
    shift
    check_here distill train "${ARGS[@]}" "$@"
fi
launch cookbook-distill distill train "${ARGS[@]}" "$@"
