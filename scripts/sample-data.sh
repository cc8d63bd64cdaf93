#!/usr/bin/env bash
# The sample data the tiny-scale experiments share (scripts/extend_experiment.sh, prune_demo.sh, distill_demo.sh), made
# once in OUT: OUT/corpus.jsonl (the Python standard library's sources; SAMPLE_MB: only the first that many MB),
# OUT/tokenizer.model (SentencePiece BPE, VOCAB pieces, default 8000), OUT/data/corpus_text_document.bin/.idx
# (preprocessed with --append-eod). Skipped when already there.
set -euo pipefail
OUT=${1:?usage: sample-data.sh OUT}
mkdir -p "$OUT/data"
if [ ! -f "$OUT/data/corpus_text_document.idx" ]; then
    echo "== sample corpus, tokenizer, indexed dataset (as scripts/demo.sh)"
    cookbook sample-corpus "$OUT/corpus.jsonl" ${SAMPLE_MB:+--max-mb "$SAMPLE_MB"}
    cookbook tokenizer train --input "$OUT/corpus.jsonl" --output "$OUT/tokenizer.model" --vocab-size "${VOCAB:-8000}" \
        --max-documents 600
    cookbook preprocess --input "$OUT/corpus.jsonl" --output-prefix "$OUT/data/corpus" \
        --tokenizer-model "$OUT/tokenizer.model" --append-eod --workers 2
fi
