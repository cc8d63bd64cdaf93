#!/usr/bin/env bash
# Pretrain the Megatron Cookbook's 31B Llama (preset llama-31b) on 8 nodes x 8 A100-80GB:
# tensor parallel 2 + sequence parallel, selective recompute, micro batch 2 (cookbook plan's choice).
#   bash scripts/pretrain/llama-31b.sh --dry-run          validate here, without GPUs
#   sbatch --nodes 8 scripts/pretrain/slurm.sbatch scripts/pretrain/llama-31b.sh
#   NNODES=8 MASTER_ADDR=node0 bash scripts/pretrain/llama-31b.sh   on every node (torchrun rendezvous)
export PRESET=llama-31b NNODES=${NNODES:-8} TP=${TP:-2} RECOMPUTE=${RECOMPUTE:-selective} MICRO_BATCH=${MICRO_BATCH:-2} LR=${LR:-1.5e-4}
exec bash "$(dirname "$0")/common.sh" "$@"
