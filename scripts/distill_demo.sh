#!/usr/bin/env bash
# Distillation at tiny scale, on CPU, offline, over several seeds (docs/distill.md):
#   a teacher (the tiny preset, 7.0M parameters, trained long enough to be far better than the student) and, per seed, a
#   student base (2 layers, hidden 128, 2.5M) on the sample corpus; per seed the teacher writes continuations of
#   32-token document prefixes (cookbook distill generate, the cookbook backend, the Megatron Cookbook's sampling
#   settings); then the student base continues for the same iterations and tokens (a) on real data, (b) on the
#   synthetic data, (c) on half real, half synthetic, (d) on real data with logit KD from the teacher; held-out
#   perplexity of each. The seed sets the student's initialisation and data order and the teacher's sampling. Then mean
#   +- standard deviation over seeds, paired comparisons (which differences exceed the spread), and everything in
#   OUT/distill_results.json.
# SEEDS (default "1 2 3"), STEPS (teacher iterations, 1000), BASE_STEPS (student base, 100), STUDENT_STEPS (each
# variant, 100) and PROMPTS (synthetic prompts per seed, 1200) scale it; JOBS runs go side by side (default 2, one
# thread each; scripts/experiment-common.sh). SMOKE=1: tiny shapes and a few iterations on a 1 MB corpus, to check the
# script (tests/test_scripts.py). The defaults take about 35 minutes on 2 CPU cores.
set -euo pipefail
OUT=${1:-distill_out}
SEEDS=${SEEDS:-1 2 3}
STEPS=${STEPS:-1000}
BASE_STEPS=${BASE_STEPS:-100}
STUDENT_STEPS=${STUDENT_STEPS:-100}
PROMPTS=${PROMPTS:-1200}
HERE="$(cd "$(dirname "$0")" && pwd)"
LOGS="$OUT/logs"
source "$HERE/experiment-common.sh"
SEQ=128
TEACHER=(--preset tiny)
STUDENT=(--preset tiny --num-layers 2 --hidden-size 128 --ffn-hidden-size 344 --num-attention-heads 2 --num-query-groups 2)
NEW_TOKENS=96
if [ "${SMOKE:-0}" = 1 ]; then
    TEACHER=(--preset tiny --num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 --num-query-groups 2)
    STUDENT=(--preset tiny --num-layers 1 --hidden-size 32 --ffn-hidden-size 64 --num-attention-heads 2 --num-query-groups 2)
    NEW_TOKENS=16
    export SAMPLE_MB=${SAMPLE_MB:-1}
fi

stage "sample data"
mkdir -p "$LOGS"
bash "$HERE/sample-data.sh" "$OUT" > "$LOGS/sample-data.log" 2>&1 || { cat "$LOGS/sample-data.log"; exit 1; }
DATA="$OUT/data/corpus_text_document"
tail -n 5 "$OUT/corpus.jsonl" > "$OUT/heldout.jsonl"  # held out: inside the 2% valid split, never trained on
head -n 1700 "$OUT/corpus.jsonl" > "$OUT/prompts.jsonl"  # prompt sources: training documents, as in the original
COMMON=(--tokenizer-model "$OUT/tokenizer.model" --split 98,2,0 --seq-length $SEQ --micro-batch-size 8 --dtype fp32
        --device cpu --weight-decay 0.1 --clip-grad 1.0 --log-interval 10 --eval-iters 4)
# each variant: the same continued-training schedule from its seed's student base
CONTINUE=(--train-iters "$STUDENT_STEPS" --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters $((STUDENT_STEPS < 40 ? 1 : 10)) --lr-decay-style cosine
          --eval-interval 25 "${COMMON[@]}")

stage "the teacher (${TEACHER[*]}, $STEPS iterations) and the student bases ($BASE_STEPS iterations, seeds $SEEDS)"
lane teacher cookbook pretrain "${TEACHER[@]}" --data-path "$DATA" --train-iters "$STEPS" --lr 2e-3 --min-lr 2e-4 \
    --lr-warmup-fraction 0.05 --lr-decay-style cosine --eval-interval 250 "${COMMON[@]}" --seed 1 \
    --save "$OUT/teacher" --load "$OUT/teacher"
for s in $SEEDS; do
    lane "seed$s-student" cookbook pretrain "${STUDENT[@]}" --data-path "$DATA" --train-iters "$BASE_STEPS" --lr 2e-3 \
        --min-lr 2e-4 --lr-warmup-fraction 0.05 --lr-decay-style cosine --eval-interval 50 "${COMMON[@]}" --seed "$s" \
        --save "$OUT/seed$s/student" --load "$OUT/seed$s/student"
done
lanes_wait

stage "synthetic data: the teacher continues $PROMPTS prompts of 32 tokens by up to $NEW_TOKENS tokens, per seed"
for s in $SEEDS; do
    lane "seed$s-generate" cookbook distill generate --teacher "$OUT/teacher" --backend cookbook --device cpu \
        --batch-size 32 --prompts-from "$OUT/prompts.jsonl" --prefix-tokens 32 --num-prompts "$PROMPTS" --seed "$s" \
        --temperature 0.7 --top-p 0.9 --max-tokens $NEW_TOKENS --frequency-penalty 0.5 --repetition-penalty 1.1 \
        --min-tokens 16 --max-repeat-ratio 0.5 --prompts-per-shard 256 --output "$OUT/seed$s/synthetic"
done
lanes_wait

stage "each student base continued $STUDENT_STEPS iterations four ways"
for s in $SEEDS; do
    R="$OUT/seed$s"
    [ -f "$R/real/latest" ] || lane "seed$s-real" cookbook pretrain --load "$R/student" --finetune --data-path "$DATA" \
        "${CONTINUE[@]}" --seed "$s" --save "$R/real"
    lane "seed$s-synthetic" cookbook distill train --load "$R/student" --synthetic "$R/synthetic" "${CONTINUE[@]}" \
        --seed "$s" --save "$R/synthetic_only"
    lane "seed$s-blend" cookbook distill train --load "$R/student" --synthetic "$R/synthetic" --data-path "$DATA" \
        --synthetic-weight 0.5 "${CONTINUE[@]}" --seed "$s" --save "$R/blend"
    [ -f "$R/kd/latest" ] || lane "seed$s-kd" cookbook pretrain --load "$R/student" --finetune --data-path "$DATA" \
        --kd-teacher "$OUT/teacher" --kd-ratio 0.5 --kd-temperature 1.0 "${CONTINUE[@]}" --seed "$s" --save "$R/kd"
done
lanes_wait

stage "held-out perplexity"
lane eval_teacher cookbook eval --load "$OUT/teacher" --ppl-files "$OUT/heldout.jsonl" --append-eod --seq-length $SEQ \
    --batch-size 8 --device cpu --dump-dir "$OUT/eval_teacher"
for s in $SEEDS; do
    for run in student real synthetic_only blend kd; do
        lane "seed$s-eval_$run" cookbook eval --load "$OUT/seed$s/$run" --ppl-files "$OUT/heldout.jsonl" --append-eod \
            --seq-length $SEQ --batch-size 8 --device cpu --dump-dir "$OUT/seed$s/eval_$run"
    done
done
lanes_wait

stage "the tables (mean +- sd over seeds $SEEDS)"
PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" python - "$OUT" "$STUDENT_STEPS" "$STEPS" "$BASE_STEPS" $SEEDS <<'EOF'
import json, sys
from results import fmt, mean_sd, paired, ppl, verdict, write_json
out, steps, teacher_steps, base_steps, seeds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
variants = {"student": f"student base ({base_steps} iterations)", "real": f"+ {steps} it. on real data",
            "synthetic_only": f"+ {steps} it. on synthetic data", "blend": f"+ {steps} it. on half real, half synthetic",
            "kd": f"+ {steps} it. on real data with logit KD (r 0.5)"}
runs = {v: [ppl(f"{out}/seed{s}/eval_{v}") for s in seeds] for v in variants}
teacher = ppl(f"{out}/eval_teacher")
synthetic = [json.load(open(f"{out}/seed{s}/synthetic/summary.json")) for s in seeds]
print(f"synthetic data per seed: {synthetic[0]['records']:,} records from {synthetic[0]['prompts']:,} prompts, "
      f"{mean_sd([x['generated_tokens'] for x in synthetic])[0]:,.0f} generated tokens on average, "
      f"filtered {[x['filtered'] for x in synthetic]}\n")
print(f"held-out perplexity, mean ± sd over seeds {' '.join(seeds)}\n")
print("| model | held-out perplexity | teacher's advantage |")
print("|---|---|---|")
print(f"| teacher ({teacher_steps} iterations, one run) | {teacher:.2f} | - |")
for v, label in variants.items():
    print(f"| {label} | {fmt(runs[v])} | {mean_sd(runs[v])[0] / teacher:.2f}x |")
pairs = [("synthetic_only", "real"), ("blend", "real"), ("kd", "real"), ("kd", "blend"), ("synthetic_only", "student")]
comparisons = {f"{a} vs {b}": paired(runs[a], runs[b]) for a, b in pairs}
print("\n| comparison (perplexity of the first against the second, per seed) | difference, mean ± sd (paired t; exceeds the spread?) |")
print("|---|---|")
for name, p in comparisons.items():
    print(f"| {name} | {verdict(p)} |")
write_json(f"{out}/distill_results.json", {"seeds": seeds, "teacher_steps": teacher_steps, "base_steps": base_steps,
                                          "student_steps": steps, "teacher_ppl": teacher, "perplexity": runs,
                                          "synthetic": synthetic, "comparisons": comparisons})
print(f"\nwrote {out}/distill_results.json")
EOF
stage "distill experiment finished: outputs in $OUT/"
times > "$OUT/times.txt"  # in this shell: its children are the runs
echo "CPU time of every run (user, system): $(tail -n 1 "$OUT/times.txt")"
