#!/usr/bin/env bash
# Llama-2-7B from 4096 to 8192 tokens: Position Interpolation x2 + 1000 iterations at 8192 (the Megatron Cookbook's
# recipe: TP 8 + sequence parallel, micro batch 2, global batch 128, one node of 8 A100-80GB).
#   bash scripts/llama2-7b-stretch-8k.sh --dry-run            validate here, without GPUs
#   LOAD=ckpt/llama2-7b DATA_PATH=data/pile_text_document bash scripts/llama2-7b-stretch-8k.sh
# LOAD is a cookbook checkpoint: cookbook convert --from hf --to cookbook --load-dir Llama-2-7b-hf --save-dir ckpt/llama2-7b
export LOAD=${LOAD:-ckpt/llama2-7b} PRESET=llama2-7b FACTOR=2 SEQ=8192 NNODES=${NNODES:-1} TP=${TP:-8}
export MICRO_BATCH=${MICRO_BATCH:-2} RECOMPUTE=${RECOMPUTE:-selective}
exec bash "$(dirname "$0")/stretch-common.sh" "$@"
