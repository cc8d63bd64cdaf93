#!/usr/bin/env bash
# Llama-2-13B from 4096 to 32768 tokens: Position Interpolation x8 + 1000 iterations at 32768 (the Megatron
# Cookbook's recipe: 4 nodes of 8 A100-80GB, TP 8 + sequence parallel, micro batch 1, global batch 128, recompute;
# selective recompute, as Megatron-LM's --recompute-activations, is what cookbook plan finds fits: ~54 GiB per GPU).
#   bash scripts/llama2-13b-stretch-32k.sh --dry-run          validate here, without GPUs
#   NNODES=4 MASTER_ADDR=node0 LOAD=ckpt/llama2-13b bash scripts/llama2-13b-stretch-32k.sh   on every node
# Beyond 32k, context parallel splits each sequence too: add --context-parallel-size 2 (and more nodes).
export LOAD=${LOAD:-ckpt/llama2-13b} PRESET=llama2-13b FACTOR=8 SEQ=32768 NNODES=${NNODES:-4} TP=${TP:-8}
export MICRO_BATCH=${MICRO_BATCH:-1} RECOMPUTE=${RECOMPUTE:-selective}
exec bash "$(dirname "$0")/stretch-common.sh" "$@"
