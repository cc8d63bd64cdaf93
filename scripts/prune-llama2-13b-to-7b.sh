#!/usr/bin/env bash
# Llama-2-13B pruned to the Llama-2-7B shape (40 -> 32 layers, hidden 5120 -> 4096, FFN 13824 -> 11008, 40 -> 32 heads:
# 6.74B parameters), then healed by distillation from the 13B. The Megatron Cookbook did this prune with random
# channels and hand-picked layers; here heads, neurons and channels are kept by activation importance (Minitron) and
# the 8 layers by block influence, from 1024 calibration samples (docs/prune.md).
#   bash scripts/prune-llama2-13b-to-7b.sh --dry-run          validate both steps here, without the checkpoint or GPUs
#   LOAD=ckpt/llama2-13b DATA_PATH=data/pile_text_document bash scripts/prune-llama2-13b-to-7b.sh
# Step 1 prunes in one process on one GPU (the 13B in fp32, 52 GB, fits an 80 GB GPU). Step 2 heals on NNODES nodes
# x 8 GPUs with torchrun: cookbook pretrain --load PRUNED --finetune --kd-teacher LOAD, with the cookbook's recovery
# settings (lr 2.5e-5 cosine to 1e-5, warmup 50, global batch 1024, seq 4096, 12,500 iterations) and the layout
# cookbook plan recommends for a 6.7B model on 64 A100-80GB (FSDP over all, selective recompute, micro batch 2).
# TP=N checks the pruned shape splits over N tensor-parallel ranks (heads, FFN) and heals with TP N + sequence parallel.
# LOAD is a cookbook checkpoint: cookbook convert --from hf --to cookbook --load-dir Llama-2-13b-hf --save-dir ckpt/llama2-13b
set -euo pipefail
LOAD=${LOAD:-ckpt/llama2-13b}
PRESET=llama2-13b
SHAPE=(--hidden-size-remain 4096 --intermediate-size-remain 11008 --num-attention-heads-remain 32)
HEALED_SHAPE=(--num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008 --num-attention-heads 32 --num-query-groups 32)
if [[ -n "${DROP_LAYER_IDS:-}" ]]; then DROP=(--drop-layer-ids "$DROP_LAYER_IDS"); else DROP=(--drop-layers 8); fi

DATA_PATH=${DATA_PATH:-data/pile_text_document}
CALIB_DATA=${CALIB_DATA:-$DATA_PATH}
PRUNED=${PRUNED:-ckpt/llama2-13b-pruned-7b}
SAVE=${SAVE:-ckpt/llama2-13b-pruned-7b-healed}
NNODES=${NNODES:-8} GPUS_PER_NODE=${GPUS_PER_NODE:-8} TP=${TP:-1} MICRO_BATCH=${MICRO_BATCH:-2}
MASTER_ADDR=${MASTER_ADDR:-localhost} MASTER_PORT=${MASTER_PORT:-29500}
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
    # teacher's memory out: the 13B's fp32 weights sharded over 64 GPUs add ~0.8 GiB each, plus its logits per micro batch)
    echo "== 2. heal (torchrun, $((NNODES * GPUS_PER_NODE)) processes)"
    exec cookbook pretrain --preset "$PRESET" "${HEALED_SHAPE[@]}" "${HEAL[@]}" --dry-run \
        --world-size $((NNODES * GPUS_PER_NODE)) --gpu A100-80GB
fi
if [[ ! -f "$PRUNED/latest" ]]; then
    cookbook prune "${PRUNE[@]}" "$@"
fi
# rerunning continues the healing from $SAVE
if [[ -f "$SAVE/latest" ]]; then FROM=(--load "$SAVE"); else FROM=(--load "$PRUNED" --finetune); fi
exec torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-cookbook-prune-13b}" \
    -m cookbook pretrain "${FROM[@]}" --kd-teacher "$LOAD" "${HEAL[@]}"
