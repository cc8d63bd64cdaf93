#!/usr/bin/env bash
# Preprocess a large corpus as a SLURM job array: array task i tokenizes partition i of N
# (`cookbook preprocess --partitions N --partition-index i`), and a job that starts once every task has
# succeeded merges the N parts (`cookbook merge`). The result is byte for byte what one
# `cookbook preprocess` pass writes.
#
#   INPUT='/data/corpus/*.parquet' OUTPUT_PREFIX=/data/out/corpus TOKENIZER=/models/tokenizer.model \
#     PARTITIONS=64 bash scripts/preprocess-slurm-array.sh             # submit the array and the merge (sbatch)
#   ... bash scripts/preprocess-slurm-array.sh --dry-run                # print what would be submitted and run
#   ... bash scripts/preprocess-slurm-array.sh --local                  # every task here, in turn, then the merge
#
# Partitions are contiguous byte ranges of the inputs laid end to end (files in sorted order), so tasks
# need no shared state beyond the output folder PREFIX_<key>_document.parts/. A task that fails or is
# preempted is simply run again (resubmit the array, or `scontrol requeue`): a finished partition is never
# redone, and a task whose partition is finished returns at once.
#
# Settings (environment): INPUT (files, globs, folders; comma-separated), OUTPUT_PREFIX, TOKENIZER,
# PARTITIONS (64), JSON_KEYS (text), EXTRA (more preprocess flags, default --append-eod), CPUS per task (32),
# TIME per task (04:00:00), SBATCH_EXTRA (e.g. "--partition=cpu --account=me").
set -euo pipefail
INPUT=${INPUT:?set INPUT (files, globs or folders of the corpus)}
OUTPUT_PREFIX=${OUTPUT_PREFIX:?set OUTPUT_PREFIX}
TOKENIZER=${TOKENIZER:?set TOKENIZER (a .model file or a tokenizer folder)}
PARTITIONS=${PARTITIONS:-64}
JSON_KEYS=${JSON_KEYS:-text}
EXTRA=${EXTRA:---append-eod}
CPUS=${CPUS:-32}
TIME=${TIME:-04:00:00}
SBATCH_EXTRA=${SBATCH_EXTRA:-}
WORKERS=${WORKERS:-${SLURM_CPUS_PER_TASK:-$CPUS}}

task_cmd() {
    echo cookbook preprocess --input "'$INPUT'" --output-prefix "$OUTPUT_PREFIX" --tokenizer-model "$TOKENIZER" \
        --json-keys "$JSON_KEYS" --partitions "$PARTITIONS" --partition-index "$1" --workers "$WORKERS" -q $EXTRA
}

task() {
    # shellcheck disable=SC2086  # EXTRA is a list of flags
    cookbook preprocess --input "$INPUT" --output-prefix "$OUTPUT_PREFIX" --tokenizer-model "$TOKENIZER" \
        --json-keys "$JSON_KEYS" --partitions "$PARTITIONS" --partition-index "$1" --workers "$WORKERS" -q $EXTRA
}

merge() {
    for key in ${JSON_KEYS//,/ }; do
        cookbook merge --input "${OUTPUT_PREFIX}_${key}_document.parts" --output-prefix "${OUTPUT_PREFIX}_${key}_document"
    done
    echo "merged; the parts in ${OUTPUT_PREFIX}_<key>_document.parts/ can be removed"
}

case "${1:-}" in
    --task) task "${SLURM_ARRAY_TASK_ID:?--task runs inside the SLURM array}" ;;
    --merge) merge ;;
    --local)
        for ((i = 0; i < PARTITIONS; i++)); do task "$i"; done
        merge ;;
    --dry-run | "")
        array=(sbatch --parsable --array="0-$((PARTITIONS - 1))" --cpus-per-task="$CPUS" --time="$TIME"
               --job-name=preprocess --export=ALL $SBATCH_EXTRA "$0" --task)
        merge_job=(sbatch --parsable --cpus-per-task=4 --time="$TIME" --job-name=preprocess-merge --export=ALL
                   $SBATCH_EXTRA "$0" --merge)
        if [ "${1:-}" = "--dry-run" ]; then
            echo "would submit: ${array[*]}"
            echo "  each task runs: $(task_cmd '$SLURM_ARRAY_TASK_ID')"
            echo "would submit: ${merge_job[*]/--parsable/--parsable --dependency=afterok:<array job id>}"
            for key in ${JSON_KEYS//,/ }; do
                echo "  which runs: cookbook merge --input ${OUTPUT_PREFIX}_${key}_document.parts --output-prefix ${OUTPUT_PREFIX}_${key}_document"
            done
        else
            job=$("${array[@]}")
            "${merge_job[0]}" --dependency="afterok:${job%%;*}" "${merge_job[@]:1}"
            echo "submitted array job $job ($PARTITIONS tasks) and its merge"
        fi ;;
    *) echo "usage: preprocess-slurm-array.sh [--dry-run | --local | --task | --merge]" >&2; exit 2 ;;
esac
