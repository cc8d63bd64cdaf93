#!/usr/bin/env bash
# Llama-2-7B pruned to 3.4B (32 -> 28 layers, hidden 4096 -> 3072, FFN 11008 -> 8192, 32 -> 24 heads: 3.37B
# parameters), the Megatron Cookbook's second prune, then healed by distillation from the 7B. The Megatron Cookbook did this prune with random
# channels and hand-picked layers; here heads, neurons and channels are kept by activation importance (Minitron) and
# the 4 layers by block influence (DROP_LAYER_IDS=7,13,18,24 drops the cookbook's hand-picked ones), from 1024 calibration samples (docs/prune.md).
#   bash scripts/prune-llama2-7b-to-3.4b.sh --dry-run          validate both steps here, without the checkpoint or GPUs
#   LOAD=ckpt/llama2-7b DATA_PATH=data/pile_text_document bash scripts/prune-llama2-7b-to-3.4b.sh
# Step 1 prunes in one process on one GPU (the 7B in fp32, 27 GB). Step 2 heals on NNODES nodes
# x 8 GPUs with torchrun: cookbook pretrain --load PRUNED --finetune --kd-teacher LOAD, with the cookbook's recovery
# settings (lr 2.5e-5 cosine to 1e-5, warmup 50, global batch 1024, seq 4096, 12,500 iterations) and the layout
# cookbook plan recommends for a 3.4B model on 64 A100-80GB (FSDP over all, selective recompute, micro batch 2).
# TP=N checks the pruned shape splits over N tensor-parallel ranks (heads, FFN) and heals with TP N + sequence parallel.
# LOAD is a cookbook checkpoint: cookbook convert --from hf --to cookbook --load-dir Llama-2-7b-hf --save-dir ckpt/llama2-7b
export LOAD=${LOAD:-ckpt/llama2-7b} PRESET=llama2-7b DROP_LAYERS=4
export SHAPE="--hidden-size-remain 3072 --intermediate-size-remain 8192 --num-attention-heads-remain 24"
export HEALED_SHAPE="--num-layers 28 --hidden-size 3072 --ffn-hidden-size 8192 --num-attention-heads 24 --num-query-groups 24"
export PRUNED=${PRUNED:-ckpt/llama2-7b-pruned-3.4b} SAVE=${SAVE:-ckpt/llama2-7b-pruned-3.4b-healed}
exec bash "$(dirname "$0")/prune-common.sh" "$@"
