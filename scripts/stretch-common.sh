#!/usr/bin/env bash
# Shared by scripts/llama2-*-stretch-*.sh (each sets LOAD, FACTOR, SEQ, NNODES, TP, MICRO_BATCH, RECOMPUTE).
# Runs `cookbook extend` on NNODES nodes x 8 GPUs with torchrun: Position Interpolation (linear RoPE scaling by
# FACTOR, Megatron-LM's --rotary-seq-len-interpolation-factor), then continued training at SEQ tokens.
# `--dry-run` validates the job for that world size here, without GPUs (the preset stands in for LOAD when the
# checkpoint is not on this machine) and prints the memory and step-time estimate of `cookbook plan`.
#
# Hyperparameters: the Megatron Cookbook's extension recipes (REFERENCE.md, "Extension"): lr 2e-5 cosine to
# 2e-6, 30 warmup iterations, 1000 iterations, weight decay 0.01, clipping 1.0, bf16, global batch 128, TP 8 +
# sequence parallel. Override anything through the environment or extra flags.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
DATA_PATH=${DATA_PATH:-data/pile_text_document}
SAVE=${SAVE:-ckpt/$(basename "$LOAD")-$((SEQ / 1024))k}
TRAIN_ITERS=${TRAIN_ITERS:-1000}

ARGS=(
    --load "$LOAD" --preset "$PRESET" --interp-factor "$FACTOR" --rope-type linear --seq-length "$SEQ"
    --data-path $DATA_PATH --split 969,30,1
    --global-batch-size 128 --micro-batch-size "$MICRO_BATCH" --train-iters "$TRAIN_ITERS"
    --lr 2e-5 --min-lr 2e-6 --lr-warmup-iters 30 --lr-decay-style cosine
    --weight-decay 0.01 --clip-grad 1.0 --dtype bf16
    --tensor-model-parallel-size "$TP" --sequence-parallel --recompute-granularity "$RECOMPUTE"
    --eval-interval 100 --eval-iters 10 --log-interval 10
    --save "$SAVE" --save-interval 100 --keep-last 2
)

if [[ "${1:-}" == "--dry-run" ]]; then
    shift
    check_here extend "${ARGS[@]}" "$@"
fi
# rerunning the same command continues from $SAVE (cookbook extend resumes its own run)
launch cookbook-stretch extend "${ARGS[@]}" "$@"
