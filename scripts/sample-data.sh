#!/usr/bin/env bash
# The sample data the tiny-scale experiments share (scripts/extend_demo.sh, scripts/prune_demo.sh), made once in OUT:
#   OUT/corpus.jsonl (the Python standard library's sources), OUT/tokenizer.model (SentencePiece BPE, 8000),
#   OUT/data/corpus_text_document.bin/.idx (preprocessed with --append-eod). Skipped when already there.
set -euo pipefail
OUT=${1:?usage: sample-data.sh OUT}
mkdir -p "$OUT/data"
if [ ! -f "$OUT/data/corpus_text_document.idx" ]; then
    echo "== sample corpus, tokenizer, indexed dataset (as scripts/demo.sh)"
    cookbook sample-corpus "$OUT/corpus.jsonl"
    cookbook tokenizer train --input "$OUT/corpus.jsonl" --output "$OUT/tokenizer.model" --vocab-size 8000 --max-documents 600
    cookbook preprocess --input "$OUT/corpus.jsonl" --output-prefix "$OUT/data/corpus" \
        --tokenizer-model "$OUT/tokenizer.model" --append-eod --workers 2
fi
