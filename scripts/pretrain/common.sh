#!/usr/bin/env bash
# Shared by scripts/pretrain/llama-*.sh (each sets PRESET, NNODES, TP, RECOMPUTE, MICRO_BATCH, LR).
# Runs `cookbook pretrain` on NNODES nodes x 8 GPUs with torchrun (c10d rendezvous); on SLURM, submit
# with scripts/pretrain/slurm.sbatch. `--dry-run` validates the job for that world size here, without
# GPUs, and prints the memory and step-time estimate of `cookbook plan`.
#
# Hyperparameters: Llama 2's published pretraining settings (Touvron et al. 2023, table 1 and section
# 2.2: AdamW beta1 0.9, beta2 0.95, eps 1e-5, cosine decay to 10% of the peak LR, 2000 warmup steps,
# weight decay 0.1, clipping 1.0, 4096-token context, 4M-token batches = 1024 x 4096), with the peak
# LR Llama 2 used for its 34B/70B models (1.5e-4). The layout is what `cookbook plan` recommends for
# 8 x A100-80GB per node (docs/training.md). Override anything through the environment or extra flags.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/../launch.sh"
DATA_PATH=${DATA_PATH:-data/all_text_document}
TOKENIZER=${TOKENIZER:-tokenizer.model}
SAVE=${SAVE:-ckpt/$PRESET}
TRAIN_ITERS=${TRAIN_ITERS:-250000}  # 1.05T tokens at 4M tokens per iteration
MIN_LR=${MIN_LR:-$(python3 -c "print($LR / 10)")}

ARGS=(
    --preset "$PRESET" --vocab-size 32000 --seq-length 4096
    --data-path $DATA_PATH --split 969,30,1 --tokenizer-model "$TOKENIZER"
    --global-batch-size 1024 --micro-batch-size "$MICRO_BATCH" --train-iters "$TRAIN_ITERS"
    --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters 2000 --lr-decay-style cosine
    --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-5 --clip-grad 1.0 --dtype bf16
    --tensor-model-parallel-size "$TP" --sequence-parallel --recompute-granularity "$RECOMPUTE"
    --eval-interval 1000 --eval-iters 10 --log-interval 10
    --save "$SAVE" --load "$SAVE" --save-interval 1000 --keep-last 3
)

if [[ "${1:-}" == "--dry-run" ]]; then
    shift
    check_here pretrain "${ARGS[@]}" "$@"
fi
launch "cookbook-$PRESET" pretrain "${ARGS[@]}" "$@"
