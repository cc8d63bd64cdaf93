#!/usr/bin/env bash
# Pretrain the Megatron Cookbook's 108B Llama (preset llama-108b) on 32 nodes x 8 A100-80GB:
# tensor parallel 8 + sequence parallel, selective recompute, micro batch 2 (cookbook plan's choice).
#   bash scripts/pretrain/llama-108b.sh --dry-run          validate here, without GPUs
#   sbatch --nodes 32 scripts/pretrain/slurm.sbatch scripts/pretrain/llama-108b.sh
#   NNODES=32 MASTER_ADDR=node0 bash scripts/pretrain/llama-108b.sh   on every node (torchrun rendezvous)
export PRESET=llama-108b NNODES=${NNODES:-32} TP=${TP:-8} RECOMPUTE=${RECOMPUTE:-selective} MICRO_BATCH=${MICRO_BATCH:-2} LR=${LR:-1.5e-4}
exec bash "$(dirname "$0")/common.sh" "$@"
