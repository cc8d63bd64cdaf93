#!/usr/bin/env bash
# Pretrain the Megatron Cookbook's 65B Llama (preset llama-65b) on 16 nodes x 8 A100-80GB:
# tensor parallel 4 + sequence parallel, selective recompute, micro batch 2 (cookbook plan's choice).
#   bash scripts/pretrain/llama-65b.sh --dry-run          validate here, without GPUs
#   sbatch --nodes 16 scripts/pretrain/slurm.sbatch scripts/pretrain/llama-65b.sh
#   NNODES=16 MASTER_ADDR=node0 bash scripts/pretrain/llama-65b.sh   on every node (torchrun rendezvous)
export PRESET=llama-65b NNODES=${NNODES:-16} TP=${TP:-4} RECOMPUTE=${RECOMPUTE:-selective} MICRO_BATCH=${MICRO_BATCH:-2} LR=${LR:-1.5e-4}
exec bash "$(dirname "$0")/common.sh" "$@"
