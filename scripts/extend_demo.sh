#!/usr/bin/env bash
# The Megatron Cookbook's context-extension experiment at tiny scale, on CPU, offline (docs/extend.md):
#   pretrain the tiny preset at a context of L = 128 tokens, then continue at 2L = 256 for the same iterations
#   and data (a) with Position Interpolation (cookbook extend --interp-factor 2) and (b) without (plain RoPE,
#   the context raised), and compare held-out perplexity at L and 2L for the original, (a) and (b), plus the
#   loss curves of (a) and (b) in one PNG (and PI without any training, for reference).
# STEPS (base iterations, default 300) and EXT_STEPS (continued iterations, default 100) scale it.
set -euo pipefail
OUT=${1:-extend_out}
STEPS=${STEPS:-300}
EXT_STEPS=${EXT_STEPS:-100}
L=128
bash "$(dirname "$0")/sample-data.sh" "$OUT"
DATA="$OUT/data/corpus_text_document"
tail -n 30 "$OUT/corpus.jsonl" > "$OUT/heldout.jsonl"
COMMON=(--data-path "$DATA" --split 98,2,0 --dtype fp32 --device cpu --log-interval 10 --eval-interval 50
        --eval-iters 4 --weight-decay 0.1 --clip-grad 1.0)

echo "== 2. the original: tiny preset trained at a context of $L"
cookbook pretrain --preset tiny --max-position-embeddings $L --seq-length $L --micro-batch-size 8 \
    --tokenizer-model "$OUT/tokenizer.model" --train-iters "$STEPS" --lr 2e-3 --min-lr 2e-4 \
    --lr-warmup-fraction 0.07 --lr-decay-style cosine "${COMMON[@]}" --save "$OUT/base" --load "$OUT/base"

# continued training, as the cookbook's recipe scaled down: cosine from a tenth of the pretraining peak,
# warmup 10, the same tokens per iteration as the base (4 x 256 = 8 x 128)
CONTINUE=(--seq-length $((2 * L)) --micro-batch-size 4 --train-iters "$EXT_STEPS" --lr 2e-4 --min-lr 2e-5
          --lr-warmup-iters 10 --lr-decay-style cosine "${COMMON[@]}")

echo "== 3a. continue at $((2 * L)) with Position Interpolation (factor 2)"
cookbook extend --load "$OUT/base" --interp-factor 2 "${CONTINUE[@]}" --save "$OUT/pi"

echo "== 3a0. PI x2 without training (the weights of the original, positions interpolated)"
[ -f "$OUT/pi0/latest" ] || cookbook extend --load "$OUT/base" --interp-factor 2 --no-train --save "$OUT/pi0"

echo "== 3b. continue at $((2 * L)) without PI (plain RoPE, positions beyond the trained range)"
if [ -f "$OUT/nopi/latest" ]; then FROM=(--load "$OUT/nopi"); else FROM=(--load "$OUT/base" --finetune); fi
cookbook pretrain "${FROM[@]}" --max-position-embeddings $((2 * L)) "${CONTINUE[@]}" --save "$OUT/nopi"

echo "== 4. held-out perplexity at $L and $((2 * L))"
for run in base pi0 pi nopi; do
    cookbook eval --load "$OUT/$run" --ppl-files "$OUT/heldout.jsonl" --append-eod --seq-length $L,$((2 * L)) \
        --batch-size 8 --device cpu --dump-dir "$OUT/eval_$run"
done

echo "== 5. passkey retrieval at $L and $((2 * L))"
for run in base pi0 pi nopi; do
    cookbook eval --load "$OUT/$run" --passkey --seq-length $L,$((2 * L)) --trials 10 --depths 0,0.5,1 \
        --device cpu --dump-dir "$OUT/passkey_$run"
done

echo "== 6. loss curves of the two continuations"
cookbook plot "$OUT/pi" "$OUT/nopi" --label "with PI" --label "without PI" --smooth 5 \
    --title "tiny: continued training at $((2 * L)) tokens" -o "$OUT/extend_loss.png"

echo "== 7. the table"
python - "$OUT" $L <<'EOF'
import json, sys
out, L = sys.argv[1], int(sys.argv[2])
names = {"base": f"original (trained at {L})", "pi0": "PI x2, no training", "pi": f"(a) PI x2 + {L * 2}-token training",
         "nopi": f"(b) no PI + {L * 2}-token training"}
print(f"| model | ppl @ {L} | ppl @ {2 * L} | passkey @ {L} | passkey @ {2 * L} |")
print("|---|---|---|---|---|")
for run, name in names.items():
    ppl = {r["seq_length"]: r["ppl"] for r in json.load(open(f"{out}/eval_{run}/perplexity.json"))["results"]}
    acc = {}
    for r in json.load(open(f"{out}/passkey_{run}/passkey.json"))["accuracy"]:
        acc.setdefault(r["length"], []).append(r["accuracy"])
    mean = {k: sum(v) / len(v) for k, v in acc.items()}
    print(f"| {name} | {ppl[L]:.2f} | {ppl[2 * L]:.2f} | {mean[L]:.2f} | {mean[2 * L]:.2f} |")
EOF
echo "extension demo finished: outputs in $OUT/ (figure: $OUT/extend_loss.png)"
