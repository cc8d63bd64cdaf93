#!/usr/bin/env bash
# Distillation at tiny scale, on CPU, offline (docs/distill.md):
#   a teacher (6 layers, hidden 384, ~16M parameters) and a student base (2 layers, hidden 128, ~2.5M) trained on the
#   sample corpus; the teacher writes continuations of 32-token document prefixes (cookbook distill generate, the
#   cookbook backend, the Megatron Cookbook's sampling settings); then the student base continues for the same
#   iterations and tokens (a) on real data, (b) on the synthetic data, (c) on real data with logit KD from the
#   teacher, (d) on half real, half synthetic; held-out perplexity of each.
# STEPS (teacher iterations, default 400), BASE_STEPS (student base, 150), STUDENT_STEPS (each variant, 100) and
# PROMPTS (synthetic prompts, 1200) scale it; the defaults take ~30 minutes on 2 CPU cores.
set -euo pipefail
OUT=${1:-distill_out}
STEPS=${STEPS:-400}
BASE_STEPS=${BASE_STEPS:-150}
STUDENT_STEPS=${STUDENT_STEPS:-100}
PROMPTS=${PROMPTS:-1200}
SEQ=128
bash "$(dirname "$0")/sample-data.sh" "$OUT"
DATA="$OUT/data/corpus_text_document"
tail -n 5 "$OUT/corpus.jsonl" > "$OUT/heldout.jsonl"  # held out: inside the 2% valid split, never trained on
head -n 1700 "$OUT/corpus.jsonl" > "$OUT/prompts.jsonl"  # prompt sources: training documents, as in the original
COMMON=(--tokenizer-model "$OUT/tokenizer.model" --split 98,2,0 --seq-length $SEQ --micro-batch-size 8 --dtype fp32
        --device cpu --weight-decay 0.1 --clip-grad 1.0 --log-interval 10 --eval-iters 4)
TEACHER=(--num-layers 6 --hidden-size 384 --ffn-hidden-size 1024 --num-attention-heads 6 --num-query-groups 6)
STUDENT=(--num-layers 2 --hidden-size 128 --ffn-hidden-size 344 --num-attention-heads 2 --num-query-groups 2)
# each variant: the same continued-training schedule from the student base
CONTINUE=(--train-iters "$STUDENT_STEPS" --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 10 --lr-decay-style cosine
          --eval-interval 25 "${COMMON[@]}")

echo "== 1. the teacher: $STEPS iterations"
cookbook pretrain --preset tiny "${TEACHER[@]}" --data-path "$DATA" --train-iters "$STEPS" --lr 1e-3 --min-lr 1e-4 \
    --lr-warmup-fraction 0.05 --lr-decay-style cosine --eval-interval 100 "${COMMON[@]}" --save "$OUT/teacher" --load "$OUT/teacher"

echo "== 2. the student base: $BASE_STEPS iterations"
cookbook pretrain --preset tiny "${STUDENT[@]}" --data-path "$DATA" --train-iters "$BASE_STEPS" --lr 2e-3 --min-lr 2e-4 \
    --lr-warmup-fraction 0.05 --lr-decay-style cosine --eval-interval 50 "${COMMON[@]}" --save "$OUT/student" --load "$OUT/student"

echo "== 3. synthetic data: the teacher continues $PROMPTS prompts of 32 tokens by up to 96 tokens"
cookbook distill generate --teacher "$OUT/teacher" --backend cookbook --device cpu --batch-size 32 \
    --prompts-from "$OUT/prompts.jsonl" --prefix-tokens 32 --num-prompts "$PROMPTS" --seed 1 \
    --temperature 0.7 --top-p 0.9 --max-tokens 96 --frequency-penalty 0.5 --repetition-penalty 1.1 \
    --min-tokens 16 --max-repeat-ratio 0.5 --prompts-per-shard 256 --output "$OUT/synthetic"

echo "== 4. the student continued $STUDENT_STEPS iterations four ways"
[ -f "$OUT/real/latest" ] || cookbook pretrain --load "$OUT/student" --finetune --data-path "$DATA" "${CONTINUE[@]}" --save "$OUT/real"
cookbook distill train --load "$OUT/student" --synthetic "$OUT/synthetic" "${CONTINUE[@]}" --save "$OUT/synthetic_only"
cookbook distill train --load "$OUT/student" --synthetic "$OUT/synthetic" --data-path "$DATA" --synthetic-weight 0.5 \
    "${CONTINUE[@]}" --save "$OUT/blend"
[ -f "$OUT/kd/latest" ] || cookbook pretrain --load "$OUT/student" --finetune --data-path "$DATA" --kd-teacher "$OUT/teacher" \
    --kd-ratio 0.5 --kd-temperature 1.0 "${CONTINUE[@]}" --save "$OUT/kd"

echo "== 5. held-out perplexity"
for run in teacher student real synthetic_only blend kd; do
    cookbook eval --load "$OUT/$run" --ppl-files "$OUT/heldout.jsonl" --append-eod --seq-length $SEQ \
        --batch-size 8 --device cpu --dump-dir "$OUT/eval_$run" > /dev/null
done

echo "== 6. the table"
python - "$OUT" "$STUDENT_STEPS" <<'PY'
import json, sys
out, steps = sys.argv[1], int(sys.argv[2])
ppl = lambda run: json.load(open(f"{out}/eval_{run}/perplexity.json"))["results"][0]["ppl"]
s = json.load(open(f"{out}/synthetic/summary.json"))
print(f"synthetic: {s['records']:,} records from {s['prompts']:,} prompts, {s['generated_tokens']:,} generated tokens, "
      f"filtered {s['filtered']}\n")
print("| model | held-out perplexity |")
print("|---|---|")
print(f"| teacher | {ppl('teacher'):.2f} |")
print(f"| student base | {ppl('student'):.2f} |")
for run, label in (("real", "real data"), ("synthetic_only", "synthetic data"), ("blend", "half real, half synthetic"),
                   ("kd", "real data + logit KD (r 0.5)")):
    print(f"| student + {steps} it. on {label} | {ppl(run):.2f} |")
PY
echo "distill demo finished: outputs in $OUT/"
