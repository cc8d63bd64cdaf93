#!/usr/bin/env bash
# The end-to-end pipeline on the built-in sample corpus, on CPU, offline:
#   sample corpus -> tokenizer train -> preprocess -> data info
# Later recipes (pretrain, convert, prune, extend, distill) extend this same script.
set -euo pipefail
OUT=${1:-demo_out}
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

echo "demo finished: outputs in $OUT/"
