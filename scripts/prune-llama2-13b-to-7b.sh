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
export LOAD=${LOAD:-ckpt/llama2-13b} PRESET=llama2-13b DROP_LAYERS=8
export SHAPE="--hidden-size-remain 4096 --intermediate-size-remain 11008 --num-attention-heads-remain 32"
export HEALED_SHAPE="--num-layers 32 --hidden-size 4096 --ffn-hidden-size 11008 --num-attention-heads 32 --num-query-groups 32"
export PRUNED=${PRUNED:-ckpt/llama2-13b-pruned-7b} SAVE=${SAVE:-ckpt/llama2-13b-pruned-7b-healed}
exec bash "$(dirname "$0")/prune-common.sh" "$@"
