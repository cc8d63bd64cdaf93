#!/usr/bin/env bash
# Structured pruning at tiny scale, on CPU, offline (docs/prune.md):
#   train the tiny preset on the sample corpus; prune it to about half its parameters (4 -> 3 layers, hidden 256 -> 160,
#   FFN 688 -> 512, 4 -> 2 query heads in its 2 groups) with each importance method (activation, magnitude, random; the
#   layer by block influence for all three); heal each for the same iterations with distillation from the unpruned
#   model (KL only, --kd-ratio 1) and without (cross-entropy only); train the same shape from scratch for the same
#   tokens; compare held-out perplexity, and draw the recovery curves (valid loss) in one PNG.
# STEPS (base iterations, default 200) and HEAL_STEPS (healing and from-scratch iterations, default 40) scale it; the
# defaults take ~20 minutes on 2 busy CPU cores (docs/prune.md has the numbers they gave).
set -euo pipefail
OUT=${1:-prune_out}
STEPS=${STEPS:-200}
HEAL_STEPS=${HEAL_STEPS:-40}
SEQ=128
bash "$(dirname "$0")/sample-data.sh" "$OUT"
DATA="$OUT/data/corpus_text_document"
# held out: the last 5 documents (~21k tokens, inside the 2% valid split, never trained on); calibration: the first
# 1000 documents
tail -n 5 "$OUT/corpus.jsonl" > "$OUT/heldout.jsonl"
if [ ! -f "$OUT/data/calib_text_document.idx" ]; then
    head -n 1000 "$OUT/corpus.jsonl" > "$OUT/calib.jsonl"
    cookbook preprocess --input "$OUT/calib.jsonl" --output-prefix "$OUT/data/calib" \
        --tokenizer-model "$OUT/tokenizer.model" --append-eod --workers 2 --quiet
fi
COMMON=(--data-path "$DATA" --split 98,2,0 --seq-length $SEQ --micro-batch-size 8 --dtype fp32 --device cpu
        --weight-decay 0.1 --clip-grad 1.0 --log-interval 10 --eval-iters 4)
SHAPE=(--hidden-size-remain 160 --intermediate-size-remain 512 --num-attention-heads-remain 2 --drop-layers 1)
# healing: half the base's peak learning rate, cosine to a tenth of that, the same for every variant
HEAL=(--lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 10 --lr-decay-style cosine --eval-interval 10 "${COMMON[@]}")

echo "== 2. the base model: tiny preset, $STEPS iterations"
cookbook pretrain --preset tiny --tokenizer-model "$OUT/tokenizer.model" --train-iters "$STEPS" \
    --lr 2e-3 --min-lr 2e-4 --lr-warmup-fraction 0.07 --lr-decay-style cosine --eval-interval 100 "${COMMON[@]}" \
    --save "$OUT/base" --load "$OUT/base"

for imp in activation magnitude random; do
    echo "== 3. $imp importance: prune, then heal $HEAL_STEPS iterations with distillation from the base"
    if [ ! -f "$OUT/${imp}_kd/prune_report.json" ] || [ ! -f "$OUT/${imp}_kd/latest" ]; then
        cookbook prune --load "$OUT/base" "${SHAPE[@]}" --importance "$imp" --layer-importance block-influence \
            --calib-data "$OUT/data/calib_text_document" --calib-samples 128 --calib-seq-length $SEQ \
            --eval-data "$OUT/heldout.jsonl" --eval-seq-length $SEQ \
            --heal-steps "$HEAL_STEPS" --kd-ratio 1.0 "${HEAL[@]}" --save "$OUT/${imp}_kd"
    fi
    echo "== 4. $imp importance: the same pruned model healed without distillation"
    if [ ! -f "$OUT/${imp}_ce/latest" ]; then
        cookbook pretrain --load "$OUT/${imp}_kd/pruned" --finetune --train-iters "$HEAL_STEPS" "${HEAL[@]}" --save "$OUT/${imp}_ce"
    fi
done

echo "== 5. the same shape from scratch, $HEAL_STEPS iterations (the same tokens), the base's learning-rate recipe"
if [ ! -f "$OUT/scratch/latest" ]; then
    cookbook pretrain --preset tiny --num-layers 3 --hidden-size 160 --ffn-hidden-size 512 --num-attention-heads 2 \
        --num-query-groups 2 --tokenizer-model "$OUT/tokenizer.model" --train-iters "$HEAL_STEPS" \
        --lr 2e-3 --min-lr 2e-4 --lr-warmup-fraction 0.07 --lr-decay-style cosine --eval-interval 10 "${COMMON[@]}" \
        --save "$OUT/scratch"
fi

echo "== 6. held-out perplexity (the base, one-shot pruned and KD-healed ones are in each prune_report.json)"
for run in activation_ce magnitude_ce random_ce scratch; do
    cookbook eval --load "$OUT/$run" --ppl-files "$OUT/heldout.jsonl" --append-eod --seq-length $SEQ \
        --batch-size 8 --device cpu --dump-dir "$OUT/eval_$run" > /dev/null
done

echo "== 7. recovery curves (valid loss; the KD runs' training loss is a KL, so valid cross-entropy compares them)"
cookbook plot "$OUT/activation_kd" "$OUT/activation_ce" "$OUT/magnitude_kd" "$OUT/magnitude_ce" "$OUT/random_kd" \
    "$OUT/random_ce" "$OUT/scratch" --label "activation + KD" --label "activation" --label "magnitude + KD" \
    --label "magnitude" --label "random + KD" --label "random" --label "from scratch" --split valid --log-y \
    --title "tiny pruned to ~half: recovery over $HEAL_STEPS iterations" -o "$OUT/prune_recovery.png"

echo "== 8. the table"
python - "$OUT" "$HEAL_STEPS" <<'EOF'
import json, sys
out, steps = sys.argv[1], sys.argv[2]
ppl = lambda run: json.load(open(f"{out}/eval_{run}/perplexity.json"))["results"][0]["ppl"]
reports = {imp: json.load(open(f"{out}/{imp}_kd/prune_report.json")) for imp in ("activation", "magnitude", "random")}
params = reports["activation"]["params"]
before = next(iter(reports["activation"]["perplexity"]["data"].values()))["before"]
print(f"base: {params['before'] / 1e6:.2f}M parameters, held-out perplexity {before:.2f}; "
      f"pruned: {params['after'] / 1e6:.2f}M ({100 * params['after'] / params['before']:.0f}%)\n")
print(f"| importance | one-shot pruned | healed {steps} it. without KD | healed {steps} it. with KD |")
print("|---|---|---|---|")
for imp, report in reports.items():
    p = next(iter(report["perplexity"]["data"].values()))
    print(f"| {imp} (layer {report['removed']['dropped_layers'][0]} dropped) | {p['pruned']:.2f} | {ppl(imp + '_ce'):.2f} | {p['healed']:.2f} |")
print(f"| from scratch, same shape | - | {ppl('scratch'):.2f} | - |")
EOF
echo "prune demo finished: outputs in $OUT/ (figure: $OUT/prune_recovery.png)"
