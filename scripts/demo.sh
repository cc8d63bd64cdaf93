#!/usr/bin/env bash
# The end-to-end pipeline on the built-in sample corpus, on CPU, offline:
#   sample corpus -> tokenizer train -> preprocess -> data info -> pretrain -> eval -> generate
# Later recipes (convert, prune, extend, distill) extend this same script.
# STEPS=N shortens or lengthens the training (default 300 iterations, a few minutes on 2 cores).
set -euo pipefail
OUT=${1:-demo_out}
STEPS=${STEPS:-300}
mkdir -p "$OUT/data"

echo "== 1. sample corpus (the Python standard library's sources)"
cookbook sample-corpus "$OUT/corpus.jsonl"

echo "== 2. train a Llama-2-style SentencePiece tokenizer (BPE, byte fallback)"
cookbook tokenizer train --input "$OUT/corpus.jsonl" --output "$OUT/tokenizer.model" \
    --vocab-size 8000 --max-documents 600

echo "== 3. preprocess into a Megatron indexed dataset"
cookbook preprocess --input "$OUT/corpus.jsonl" --output-prefix "$OUT/data/corpus" \
    --tokenizer-model "$OUT/tokenizer.model" --append-eod --workers 2

echo "== 4. inspect it"
cookbook data info "$OUT/data/corpus_text_document" --decode 1 --tokenizer "$OUT/tokenizer.model"

echo "== 5. pretrain the tiny preset on CPU (rerunning continues from the last checkpoint)"
# the last 2% of documents are the valid split; the last 30 lines of the corpus are held out for eval
cookbook pretrain --preset tiny --data-path "$OUT/data/corpus_text_document" --split 98,2,0 \
    --tokenizer-model "$OUT/tokenizer.model" --seq-length 128 --micro-batch-size 8 \
    --train-iters "$STEPS" --lr 2e-3 --min-lr 2e-4 --lr-warmup-fraction 0.07 --lr-decay-style cosine \
    --weight-decay 0.1 --clip-grad 1.0 --dtype fp32 --device cpu \
    --log-interval 20 --eval-interval 100 --eval-iters 4 --save-interval 100 \
    --save "$OUT/ckpt" --load "$OUT/ckpt"

echo "== 6. perplexity on held-out documents, at the trained context and at twice it"
tail -n 30 "$OUT/corpus.jsonl" > "$OUT/heldout.jsonl"
cookbook eval --load "$OUT/ckpt" --ppl-files "$OUT/heldout.jsonl" --append-eod --seq-length 128,256 \
    --batch-size 8 --device cpu --dump-dir "$OUT/eval"

echo "== 7. generate (KV cache; temperature 0.7, top-k 40)"
cookbook generate --load "$OUT/ckpt" --prompt "import os" --prompt "def main(" --max-new-tokens 48 \
    --temperature 0.7 --top-k 40 --seed 1 --device cpu

echo "demo finished: outputs in $OUT/ (checkpoints and metrics.jsonl in $OUT/ckpt)"
