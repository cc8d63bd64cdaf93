# Sourced by the multi-node recipes (scripts/pretrain/common.sh, stretch-common.sh, prune-common.sh,
# distill-train-13b.sh): how their jobs are checked here and started on every node.
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}

# check_here CMD ARGS...: `cookbook CMD ARGS... --dry-run` for the whole job's world size, here, without GPUs
check_here() {
    exec cookbook "$@" --dry-run --world-size $((NNODES * GPUS_PER_NODE)) --gpu A100-80GB
}

# launch RDZV_ID CMD ARGS...: `cookbook CMD ARGS...` under torchrun on this node, meeting the other nodes at
# MASTER_ADDR:MASTER_PORT (c10d rendezvous; RDZV_ID in the environment overrides the id)
launch() {
    local id=$1
    shift
    exec torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" \
        --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-$id}" -m cookbook "$@"
}
