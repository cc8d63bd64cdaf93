#!/usr/bin/env bash
# Context extension where context matters, at tiny scale, on CPU, offline (docs/extend.md):
#   pretrain the tiny preset at a context of L = 128 tokens on passkey documents (passkey prompts of exactly L tokens
#   followed by their answer: the key lies anywhere in the window, so the model must use all of it) mixed with the
#   sample corpus (RETRIEVAL of the samples, default 0.9); then extend it to 2L in each of these ways:
#     base   nothing: RoPE extrapolates past L
#     pi0    Position Interpolation x2, no training          ntk0  dynamic NTK, no training
#     pi     PI x2 + EXT_STEPS iterations at 2L              ntk   dynamic NTK + the same training
#     yarn   YaRN x2 + the same training                     nopi  the same training at 2L, plain RoPE
#   (the continued training: the same mix with documents of 2L tokens, the same tokens per iteration as the base).
#   Every model is measured at L, 2L and 4L: passkey and recall accuracy per depth (cookbook eval --passkey,
#   --recall; recall is never trained on: does the copy transfer?), where the heads look while they write the key
#   (--attention), and perplexity on held-out real documents. Figures of accuracy against length, a line per model,
#   and OUT/extend_results.json with every number.
# STEPS (base iterations, default 7000), EXT_STEPS (continued iterations, 200) and TRIALS (prompts per length and
# depth, 10) scale it; JOBS runs go side by side (default 2; scripts/experiment-common.sh). SMOKE=1: a tiny model and
# a few iterations on a 1 MB corpus, to check the script (tests/test_scripts.py). The defaults take about 35 minutes on
# 2 CPU cores.
set -euo pipefail
OUT=${1:-extend_out}
STEPS=${STEPS:-7000}
RETRIEVAL=${RETRIEVAL:-0.9}
EXT_STEPS=${EXT_STEPS:-200}
TRIALS=${TRIALS:-10}
SEED=${SEED:-1}
HERE="$(cd "$(dirname "$0")" && pwd)"
LOGS="$OUT/logs"
source "$HERE/experiment-common.sh"
L=128
DOCS=56000  # passkey documents of L tokens, about one per sample the base draws (of 2L: a quarter as many)
KEYS=2  # named values per recall prompt
MODEL=(--preset tiny)
if [ "${SMOKE:-0}" = 1 ]; then
    MODEL=(--preset tiny --num-layers 2 --hidden-size 64 --ffn-hidden-size 128 --num-attention-heads 4 --num-query-groups 2)
    DOCS=200
    export SAMPLE_MB=${SAMPLE_MB:-1}
fi
DEPTHS=0,0.25,0.5,0.75,1
LENGTHS=$L,$((2 * L)),$((4 * L))

stage "sample data, held-out documents, passkey documents of $L and $((2 * L)) tokens"
mkdir -p "$LOGS"
bash "$HERE/sample-data.sh" "$OUT" > "$LOGS/sample-data.log" 2>&1 || { cat "$LOGS/sample-data.log"; exit 1; }
CORPUS="$OUT/data/corpus_text_document"
tail -n 5 "$OUT/corpus.jsonl" > "$OUT/heldout.jsonl"  # inside the 2% valid split: never trained on
python - "$OUT" "$L" "$DOCS" "$SEED" <<'PY'
import sys
from pathlib import Path
from cookbook.data.tokenizer import load_tokenizer
from cookbook.inference.retrieval import write_documents
out, length, docs, seed = sys.argv[1], *map(int, sys.argv[2:])
tokenizer = load_tokenizer(f"{out}/tokenizer.model")
for n, count in ((length, docs), (2 * length, docs // 4)):
    prefix = f"{out}/data/retrieval_{n}"
    if not Path(prefix + ".idx").is_file():  # seeds apart from the evaluation's keys (seed 0)
        write_documents(prefix, tokenizer, ["passkey"], n, count, seed=1000 * seed + n)
PY
COMMON=(--split 98,2,0 --dtype fp32 --device cpu --weight-decay 0.1 --clip-grad 1.0 --log-interval 20
        --eval-interval 100 --eval-iters 4 --seed "$SEED")

MIX=(--data-path "$(awk "BEGIN {print 1 - $RETRIEVAL}")" "$CORPUS" "$RETRIEVAL")
stage "the base: ${MODEL[*]} at $L tokens, $STEPS iterations, $RETRIEVAL of the samples passkey documents"
# one run alone: it takes every lane's threads
lane base env OMP_NUM_THREADS=$((JOBS * OMP_NUM_THREADS)) cookbook pretrain "${MODEL[@]}" --max-position-embeddings $L \
    --seq-length $L --micro-batch-size 8 "${MIX[@]}" "$OUT/data/retrieval_$L" --tokenizer-model "$OUT/tokenizer.model" \
    --train-iters "$STEPS" --lr 2e-3 --min-lr 2e-4 --lr-warmup-fraction 0.05 --lr-decay-style cosine "${COMMON[@]}" \
    --save "$OUT/base" --load "$OUT/base"
lanes_wait

stage "extend to $((2 * L)): without training (PI, dynamic NTK), and $EXT_STEPS iterations each (PI, NTK, YaRN, no PI)"
# continued training as the cookbook's recipe scaled down: cosine from a tenth of the base's peak, 10 warmup, the
# same tokens per iteration as the base (4 x 2L = 8 x L), the same mix at 2L
CONTINUE=(--seq-length $((2 * L)) --micro-batch-size 4 "${MIX[@]}" "$OUT/data/retrieval_$((2 * L))"
          --train-iters "$EXT_STEPS" --lr 2e-4 --min-lr 2e-5 --lr-warmup-iters $((EXT_STEPS < 40 ? 1 : 10)) --lr-decay-style cosine
          "${COMMON[@]}")
[ -f "$OUT/pi0/latest" ] || lane pi0 cookbook extend --load "$OUT/base" --interp-factor 2 --no-train --save "$OUT/pi0"
[ -f "$OUT/ntk0/latest" ] || lane ntk0 cookbook extend --load "$OUT/base" --interp-factor 2 --rope-type dynamic \
    --no-train --save "$OUT/ntk0"
for method in pi:linear ntk:dynamic yarn:yarn; do
    lane "${method%%:*}" cookbook extend --load "$OUT/base" --interp-factor 2 --rope-type "${method#*:}" \
        "${CONTINUE[@]}" --save "$OUT/${method%%:*}"
done
if [ -f "$OUT/nopi/latest" ]; then FROM=(--load "$OUT/nopi"); else FROM=(--load "$OUT/base" --finetune); fi
lane nopi cookbook pretrain "${FROM[@]}" --max-position-embeddings $((2 * L)) "${CONTINUE[@]}" --save "$OUT/nopi"
lanes_wait

RUNS=(base pi0 ntk0 pi ntk yarn nopi)
stage "every model at $LENGTHS: passkey and recall ($TRIALS prompts per length and depth) with the heads' attention, held-out perplexity"
for run in "${RUNS[@]}"; do
    for task in passkey recall; do
        lane "eval_${task}_$run" cookbook eval --load "$OUT/$run" --$task --recall-keys $KEYS --seq-length $LENGTHS \
            --depths $DEPTHS --trials "$TRIALS" --batch-size 10 --device cpu --dtype fp32 --attention \
            --dump-dir "$OUT/eval/$run"
    done
    lane "eval_ppl_$run" cookbook eval --load "$OUT/$run" --ppl-files "$OUT/heldout.jsonl" --append-eod \
        --seq-length $LENGTHS --batch-size 4 --device cpu --dtype fp32 --dump-dir "$OUT/eval/$run"
done
lanes_wait

stage "figures: accuracy against length, a line per model"
LABELS=(--label "base (no change)" --label "PI, no training" --label "dynamic NTK, no training" --label "PI + training"
        --label "dynamic NTK + training" --label "YaRN + training" --label "no PI + training")
for task in passkey recall; do
    DUMPS=()
    for run in "${RUNS[@]}"; do DUMPS+=("$OUT/eval/$run/$task.json"); done
    cookbook plot "${DUMPS[@]}" "${LABELS[@]}" --title "$task accuracy: trained at $L, extended to $((2 * L))" \
        -o "$OUT/extend_$task.png" > /dev/null
done

stage "the tables"
PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}" python - "$OUT" "$L" "$STEPS" "$EXT_STEPS" "$TRIALS" "${RUNS[@]}" <<'PY'
import json, sys
from cookbook.inference.retrieval import NeedleAttention, copying_heads
from results import write_json
out, L, steps, ext, trials, runs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6:]
names = {"base": f"base (trained at {L})", "pi0": "PI x2, no training", "ntk0": "dynamic NTK x2, no training",
         "pi": f"PI x2 + {ext} it at {2 * L}", "ntk": f"dynamic NTK x2 + {ext} it", "yarn": f"YaRN x2 + {ext} it",
         "nopi": f"no PI + {ext} it at {2 * L}"}
lengths = [L, 2 * L, 4 * L]
results = {}
for run in runs:
    folder = f"{out}/eval/{run}"
    row = {"ppl": {r["seq_length"]: r["ppl"] for r in json.load(open(f"{folder}/perplexity.json"))["results"]}}
    for task in ("passkey", "recall"):
        dump = json.load(open(f"{folder}/{task}.json"))
        row[task] = {r["length"]: r["accuracy"] for r in dump["accuracy_by_length"]}
        row[task + "_digits"] = {r["length"]: r["accuracy"] for r in dump["digit_accuracy_by_length"]}
        row[task + "_by_depth"] = dump["accuracy"]
        # where the heads look while the key is written: per depth the head that copies most, then the mean over depths
        best = copying_heads([NeedleAttention(**h) for h in dump["attention"]])
        for field in ("copy", "share", "copy_chance", "share_chance"):
            per_length = {n_: [getattr(h, field) for h in best if h.length == n_] for n_ in lengths}
            row[f"{task}_head_{field}"] = {n_: sum(v) / len(v) for n_, v in per_length.items()}
    results[run] = row
n = trials * 5
print(f"accuracy over {n} prompts per length (5 depths x {trials}), exact (the share of the key's digits in place);")
print("held-out perplexity on 5 real documents\n")
head = " | ".join(f"{t} @ {n_}" for t in ("passkey", "recall") for n_ in lengths)
print(f"| model | {head} | " + " | ".join(f"ppl @ {n_}" for n_ in lengths) + " |")
print("|---" * (1 + 3 * len(lengths)) + "|")
for run, row in results.items():
    acc = " | ".join(f"{row[t][n_]:.2f} ({row[t + '_digits'][n_]:.2f})" for t in ("passkey", "recall") for n_ in lengths)
    print(f"| {names[run]} | {acc} | " + " | ".join(f"{row['ppl'][n_]:.2f}" for n_ in lengths) + " |")
print("\nwhile the key is written, the attention of the head that copies most (per depth, then the mean over depths):")
print("on the needle's copy of the next key token / on the whole needle")
print("chance (a head looking at every token alike): " + ", ".join(
    f"{t} @ {n_} {results['base'][t + '_head_copy_chance'][n_]:.3f} / {results['base'][t + '_head_share_chance'][n_]:.2f}"
    for t in ("passkey", "recall") for n_ in lengths) + "\n")
print("| model | " + " | ".join(f"{t} @ {n_}" for t in ("passkey", "recall") for n_ in lengths) + " |")
print("|---" * (1 + 2 * len(lengths)) + "|")
for run, row in results.items():
    cells = " | ".join(f"{row[t + '_head_copy'][n_]:.2f} / {row[t + '_head_share'][n_]:.2f}"
                       for t in ("passkey", "recall") for n_ in lengths)
    print(f"| {names[run]} | {cells} |")
write_json(f"{out}/extend_results.json", {"L": L, "steps": int(steps), "ext_steps": int(ext), "trials": trials,
                                          "models": names, "results": results})
print(f"\nwrote {out}/extend_results.json")
PY
stage "extension experiment finished: outputs in $OUT/ (figures: $OUT/extend_passkey.png, $OUT/extend_recall.png)"
times > "$OUT/times.txt"
echo "CPU time of every run (user, system): $(tail -n 1 "$OUT/times.txt")"
