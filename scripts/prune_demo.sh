#!/usr/bin/env bash
# Structured pruning at tiny scale, on CPU, offline, over several seeds (docs/prune.md):
#   for each seed, train the tiny preset on the sample corpus; prune it to about half its parameters (4 -> 3 layers,
#   hidden 256 -> 160, FFN 688 -> 512, 4 -> 2 query heads in its 2 groups) with each importance method (activation,
#   magnitude, random; the layer by block influence for all three); heal each for the same iterations with
#   distillation from the unpruned model (KL only, --kd-ratio 1) and without (cross-entropy only); train the same shape
#   from scratch for the same tokens; held-out perplexity of each. The seed sets the base's initialisation and data
#   order, random importance's draw, and the order of the healing data, so every variant of a seed shares one base.
#   Then mean +- standard deviation over seeds, paired comparisons (which differences exceed the spread), the recovery
#   curves of the first seed in one PNG, and everything in OUT/prune_results.json.
# SEEDS (default "1 2 3"), STEPS (base iterations, 200) and HEAL_STEPS (healing and from-scratch iterations, 40) scale
# it; JOBS runs go side by side (default 2, one thread each; scripts/experiment-common.sh). SMOKE=1: a tiny shape and
# a few iterations on a 1 MB corpus, to check the script (tests/test_scripts.py). The defaults take about 30 minutes on
# 2 CPU cores.
set -euo pipefail
OUT=${1:-prune_out}
SEEDS=${SEEDS:-1 2 3}
STEPS=${STEPS:-200}
HEAL_STEPS=${HEAL_STEPS:-40}
HERE="$(cd "$(dirname "$0")" && pwd)"
LOGS="$OUT/logs"
source "$HERE/experiment-common.sh"
SEQ=128
MODEL=(--preset tiny)
SHAPE=(--hidden-size-remain 160 --intermediate-size-remain 512 --num-attention-heads-remain 2 --drop-layers 1)
SCRATCH=(--num-layers 3 --hidden-size 160 --ffn-hidden-size 512 --num-attention-heads 2 --num-query-groups 2)
CALIB=128
if [ "${SMOKE:-0}" = 1 ]; then  # a model of 2 layers, hidden 64: seconds per run
    MODEL=(--preset tiny --num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 --num-query-groups 2)
    SHAPE=(--hidden-size-remain 48 --intermediate-size-remain 96 --num-attention-heads-remain 2 --drop-layers 1)
    SCRATCH=(--num-layers 1 --hidden-size 48 --ffn-hidden-size 96 --num-attention-heads 2 --num-query-groups 2)
    CALIB=8
    export SAMPLE_MB=${SAMPLE_MB:-1}
fi
METHODS=(activation magnitude random)

stage "sample data"
mkdir -p "$LOGS"
bash "$HERE/sample-data.sh" "$OUT" > "$LOGS/sample-data.log" 2>&1 || { cat "$LOGS/sample-data.log"; exit 1; }
DATA="$OUT/data/corpus_text_document"
# held out: the last 5 documents (~21k tokens, inside the 2% valid split, never trained on); calibration: the first 1000
tail -n 5 "$OUT/corpus.jsonl" > "$OUT/heldout.jsonl"
if [ ! -f "$OUT/data/calib_text_document.idx" ]; then
    head -n 1000 "$OUT/corpus.jsonl" > "$OUT/calib.jsonl"
    cookbook preprocess --input "$OUT/calib.jsonl" --output-prefix "$OUT/data/calib" \
        --tokenizer-model "$OUT/tokenizer.model" --append-eod --workers 2 --quiet > /dev/null
fi
COMMON=(--data-path "$DATA" --split 98,2,0 --seq-length $SEQ --micro-batch-size 8 --dtype fp32 --device cpu
        --weight-decay 0.1 --clip-grad 1.0 --log-interval 10 --eval-iters 4)
# healing: half the base's peak learning rate, cosine to a tenth of that, the same for every variant
HEAL=(--lr 1e-3 --min-lr 1e-4 --lr-warmup-iters $((HEAL_STEPS < 40 ? 1 : 10)) --lr-decay-style cosine --eval-interval 10
      "${COMMON[@]}")

stage "base models: ${MODEL[*]}, $STEPS iterations, seeds $SEEDS"
for s in $SEEDS; do
    lane "seed$s-base" cookbook pretrain "${MODEL[@]}" --tokenizer-model "$OUT/tokenizer.model" --train-iters "$STEPS" \
        --lr 2e-3 --min-lr 2e-4 --lr-warmup-fraction 0.07 --lr-decay-style cosine --eval-interval 100 "${COMMON[@]}" \
        --seed "$s" --save "$OUT/seed$s/base" --load "$OUT/seed$s/base"
done
lanes_wait

stage "prune with each importance and heal $HEAL_STEPS iterations with KD; the same shape from scratch"
for s in $SEEDS; do
    for imp in "${METHODS[@]}"; do
        run="$OUT/seed$s/${imp}_kd"
        [ -f "$run/prune_report.json" ] && [ -f "$run/latest" ] && continue
        lane "seed$s-${imp}_kd" cookbook prune --load "$OUT/seed$s/base" "${SHAPE[@]}" --importance "$imp" \
            --layer-importance block-influence --calib-data "$OUT/data/calib_text_document" --calib-samples $CALIB \
            --calib-seq-length $SEQ --eval-data "$OUT/heldout.jsonl" --eval-seq-length $SEQ \
            --heal-steps "$HEAL_STEPS" --kd-ratio 1.0 "${HEAL[@]}" --seed "$s" --save "$run"
    done
    [ -f "$OUT/seed$s/scratch/latest" ] || lane "seed$s-scratch" cookbook pretrain "${MODEL[@]}" "${SCRATCH[@]}" \
        --tokenizer-model "$OUT/tokenizer.model" --train-iters "$HEAL_STEPS" --lr 2e-3 --min-lr 2e-4 \
        --lr-warmup-fraction 0.07 --lr-decay-style cosine --eval-interval 10 "${COMMON[@]}" --seed "$s" \
        --save "$OUT/seed$s/scratch"
done
lanes_wait

stage "the same pruned models healed without KD"
for s in $SEEDS; do
    for imp in "${METHODS[@]}"; do
        [ -f "$OUT/seed$s/${imp}_ce/latest" ] || lane "seed$s-${imp}_ce" cookbook pretrain \
            --load "$OUT/seed$s/${imp}_kd/pruned" --finetune --train-iters "$HEAL_STEPS" "${HEAL[@]}" --seed "$s" \
            --save "$OUT/seed$s/${imp}_ce"
    done
done
lanes_wait

stage "held-out perplexity (the base, one-shot and KD-healed ones are in each prune_report.json)"
for s in $SEEDS; do
    for run in activation_ce magnitude_ce random_ce scratch; do
        lane "seed$s-eval_$run" cookbook eval --load "$OUT/seed$s/$run" --ppl-files "$OUT/heldout.jsonl" --append-eod \
            --seq-length $SEQ --batch-size 8 --device cpu --dump-dir "$OUT/seed$s/eval_$run"
    done
done
lanes_wait

FIRST=${SEEDS%% *}
stage "recovery curves of seed $FIRST (valid cross-entropy; the KD runs' training loss is a KL)"
R="$OUT/seed$FIRST"
cookbook plot "$R/activation_kd" "$R/activation_ce" "$R/magnitude_kd" "$R/magnitude_ce" "$R/random_kd" "$R/random_ce" \
    "$R/scratch" --label "activation + KD" --label "activation" --label "magnitude + KD" --label "magnitude" \
    --label "random + KD" --label "random" --label "from scratch" --split valid --log-y \
    --title "tiny pruned to ~half: recovery over $HEAL_STEPS iterations (seed $FIRST)" -o "$OUT/prune_recovery.png" > /dev/null

stage "the tables (mean +- sd over seeds $SEEDS)"
PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" python - "$OUT" "$HEAL_STEPS" "$STEPS" $SEEDS <<'EOF'
import json, sys
from results import fmt, paired, ppl, verdict, write_json
out, heal, steps, seeds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
methods = ("activation", "magnitude", "random")
runs, dropped = {}, {}  # variant -> perplexity per seed; dropped layer per seed and method
for s in seeds:
    for imp in methods:
        report = json.load(open(f"{out}/seed{s}/{imp}_kd/prune_report.json"))
        p = next(iter(report["perplexity"]["data"].values()))
        if imp == "activation":
            runs.setdefault("base", []).append(p["before"])
        dropped[f"seed {s} {imp}"] = report["removed"]["dropped_layers"]
        runs.setdefault(f"{imp} one-shot", []).append(p["pruned"])
        runs.setdefault(f"{imp} + KD", []).append(p["healed"])
        runs.setdefault(f"{imp} no KD", []).append(ppl(f"{out}/seed{s}/eval_{imp}_ce"))
    runs.setdefault("scratch", []).append(ppl(f"{out}/seed{s}/eval_scratch"))
report = json.load(open(f"{out}/seed{seeds[0]}/activation_kd/prune_report.json"))
params = report["params"]
print(f"base: {params['before'] / 1e6:.2f}M parameters, {steps} iterations; pruned: {params['after'] / 1e6:.2f}M "
      f"({100 * params['after'] / params['before']:.0f}%); healing {heal} iterations; seeds {' '.join(seeds)}")
print(f"held-out perplexity, mean ± sd over {len(seeds)} seeds; base {fmt(runs['base'])}\n")
print("| importance | one-shot pruned | healed, no KD | healed, KD |")
print("|---|---|---|---|")
for imp in methods:
    print(f"| {imp} | {fmt(runs[imp + ' one-shot'])} | {fmt(runs[imp + ' no KD'])} | {fmt(runs[imp + ' + KD'])} |")
print(f"| from scratch, same shape | - | {fmt(runs['scratch'])} | - |")
pairs = [("activation one-shot", "random one-shot"), ("activation one-shot", "magnitude one-shot"),
         ("magnitude one-shot", "random one-shot"), ("activation + KD", "random + KD"),
         ("activation + KD", "magnitude + KD"), ("magnitude + KD", "random + KD"), ("activation no KD", "random no KD"),
         ("activation no KD", "magnitude no KD"), *[(f"{m} + KD", f"{m} no KD") for m in methods],
         ("activation + KD", "scratch")]
comparisons = {f"{a} vs {b}": paired(runs[a], runs[b]) for a, b in pairs}
print("\n| comparison (perplexity of the first against the second, per seed) | difference, mean ± sd (paired t; exceeds the spread?) |")
print("|---|---|")
for name, p in comparisons.items():
    print(f"| {name} | {verdict(p)} |")
print(f"\ndropped layers: {sorted({str(v) for v in dropped.values()})}")
write_json(f"{out}/prune_results.json", {"seeds": seeds, "steps": steps, "heal_steps": heal, "params": params,
                                        "dropped_layers": dropped, "perplexity": runs, "comparisons": comparisons})
print(f"\nwrote {out}/prune_results.json")
EOF
stage "prune experiment finished: outputs in $OUT/ (figure: $OUT/prune_recovery.png)"
times > "$OUT/times.txt"  # in this shell: its children are the runs
echo "CPU time of every run (user, system): $(tail -n 1 "$OUT/times.txt")"
