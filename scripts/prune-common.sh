#!/usr/bin/env bash
# Shared by scripts/prune-llama2-*.sh (each sets LOAD, PRESET, SHAPE, HEALED_SHAPE, DROP_LAYERS, PRUNED, SAVE).
# Step 1 prunes in one process on one GPU (cookbook prune: activation importance, layers by block influence, 1024
# calibration samples). Step 2 heals on NNODES nodes x 8 GPUs with torchrun: cookbook pretrain --load PRUNED
# --finetune --kd-teacher LOAD, with the Megatron Cookbook's recovery settings (lr 2.5e-5 cosine to 1e-5, warmup 50,
# global batch 1024, seq 4096, 12,500 iterations) and FSDP over all GPUs, selective recompute, micro batch 2.
# DROP_LAYER_IDS=7,13,18,24 drops given layers instead; TP=N checks the pruned shape splits over N tensor-parallel
# ranks and heals with TP N + sequence parallel. `--dry-run` validates both steps without the checkpoint or GPUs.
set -euo pipefail
if [[ -n "${DROP_LAYER_IDS:-}" ]]; then DROP=(--drop-layer-ids "$DROP_LAYER_IDS"); else DROP=(--drop-layers "$DROP_LAYERS"); fi
read -ra SHAPE <<< "$SHAPE"
read -ra HEALED_SHAPE <<< "$HEALED_SHAPE"

DATA_PATH=${DATA_PATH:-data/pile_text_document}
CALIB_DATA=${CALIB_DATA:-$DATA_PATH}
PRUNED=${PRUNED:-ckpt/llama2-7b-pruned-3.4b}
SAVE=${SAVE:-ckpt/llama2-7b-pruned-3.4b-healed}
NNODES=${NNODES:-8} TP=${TP:-1} MICRO_BATCH=${MICRO_BATCH:-2}
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
TRAIN_ITERS=${TRAIN_ITERS:-12500}
SP=(); if [[ "$TP" -gt 1 ]]; then SP=(--sequence-parallel); fi
EVAL=(); if [[ -n "${EVAL_DATA:-}" ]]; then EVAL=(--eval-data "$EVAL_DATA"); fi

PRUNE=(
    --load "$LOAD" --preset "$PRESET" "${SHAPE[@]}" "${DROP[@]}"
    --importance "${IMPORTANCE:-activation}" --layer-importance "${LAYER_IMPORTANCE:-block-influence}"
    --calib-data "$CALIB_DATA" --calib-samples 1024 --calib-seq-length 4096 --calib-batch-size 4 "${EVAL[@]}"
    --tensor-model-parallel-size "$TP" --device cuda --dtype bf16 --save "$PRUNED"
)
HEAL=(
    --data-path $DATA_PATH --split 969,30,1 --seq-length 4096
    --global-batch-size 1024 --micro-batch-size "$MICRO_BATCH" --train-iters "$TRAIN_ITERS"
    --lr 2.5e-5 --min-lr 1e-5 --lr-warmup-iters 50 --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0 --dtype bf16
    --kd-ratio "${KD_RATIO:-1.0}" --kd-temperature 1.0
    --tensor-model-parallel-size "$TP" "${SP[@]}" --recompute-granularity "${RECOMPUTE:-selective}"
    --eval-interval 500 --eval-iters 10 --log-interval 10 --save "$SAVE" --save-interval 500 --keep-last 2
)

if [[ "${1:-}" == "--dry-run" ]]; then
    shift
    echo "== 1. prune (one process)"
    cookbook prune "${PRUNE[@]}" --dry-run "$@"
    # the healing job with the pruned shape; its checkpoint and the teacher do not exist yet (the estimate leaves the
    # teacher's memory out: its fp32 weights sharded over all GPUs, e.g. ~0.4 GiB each for a 7B on 64, and its logits)
    echo "== 2. heal (torchrun, $((NNODES * GPUS_PER_NODE)) processes)"
    check_here pretrain --preset "$PRESET" "${HEALED_SHAPE[@]}" "${HEAL[@]}"
fi
if [[ ! -f "$PRUNED/latest" ]]; then
    cookbook prune "${PRUNE[@]}" "$@"
fi
# rerunning continues the healing from $SAVE
if [[ -f "$SAVE/latest" ]]; then FROM=(--load "$SAVE"); else FROM=(--load "$PRUNED" --finetune); fi
launch "cookbook-prune-$PRESET" pretrain "${FROM[@]}" --kd-teacher "$LOAD" "${HEAL[@]}"
