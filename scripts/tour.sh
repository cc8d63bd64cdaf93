#!/usr/bin/env bash
# The README's "A short tour", every line, at tiny scale on a CPU, offline: bash scripts/tour.sh OUT
# (about ten minutes on 2 cores; run it again and every line runs again: nothing refuses its own earlier output).
#
# Lines run with `tour` (or `tour_serve`) are the README's, in its order; tests/test_tour.py checks that the two hold
# the same commands. A $NAME stands for the README's value written after "README:" on the line that sets it (sizes
# and paths scaled down to a CPU; "" when the README has nothing there). Steps that make what the README names
# without making it (heldout.jsonl, run.toml, ckpt/big, a Hugging Face folder to convert) are marked "setup".
# No line needs a GPU: torchrun runs gloo processes on the CPU.
set -euo pipefail
OUT=${1:?usage: bash scripts/tour.sh OUT}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

CORPUS="--max-mb 2"           # README: ""
WORKERS=2                     # README: 16
ITERS=30                      # README: 300
NPROC=2                       # README: 8
NPROC_3D=4                    # README: 8
HF_MODEL=tiny-hf              # README: Llama-2-7b-hf
MEGATRON_DIR=megatron/tiny    # README: megatron/llama2-7b
CONVERT_TP=2                  # README: 4
MEGATRON_RUN=megatron/tiny    # README: /runs/llama2-7b/checkpoints
HF_BACK=tiny-hf-back          # README: llama2-7b-hf
EXTEND_ITERS=10               # README: 100
CALIB="--calib-samples 64"    # README: ""
HEAL_STEPS=10                 # README: 100
PROMPTS="--num-prompts 16"    # README: ""
DISTILL_ITERS=10              # README: 100
PORT=0                        # README: 8000
FEWSHOT="1 --limit 8"         # README: 5
RECIPES="$REPO/scripts"       # README: scripts

mkdir -p "$OUT"
cd "$OUT"
START=$SECONDS

tour() {  # a README line: show it, run it, time it
    echo "== $*"
    local t=$SECONDS
    "$@"
    echo "   ($((SECONDS - t)) s)"
}

setup() {  # a step the README takes as given
    echo "== setup: $1"
}

tour_serve() {  # the README's serve line: start it, send it one completion request, stop it (SIGTERM)
    echo "== $*"
    local t=$SECONDS
    "$@" > serve.out &
    local pid=$! url=""
    for _ in $(seq 600); do
        url=$(sed -n 's/^serving .* at \(http[^ ]*\)$/\1/p' serve.out)
        [ -n "$url" ] && break
        kill -0 "$pid" 2>/dev/null || { echo "cookbook serve exited before it listened" >&2; exit 1; }
        sleep 0.2
    done
    [ -n "$url" ] || { echo "cookbook serve did not start within 120 s" >&2; kill "$pid"; exit 1; }
    python3 - "$url" <<'EOF'
import json, sys, urllib.request
request = urllib.request.Request(sys.argv[1] + "/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"prompt": "def main(", "max_tokens": 16, "temperature": 0}).encode())
with urllib.request.urlopen(request, timeout=120) as response:
    print("   completion:", repr(json.load(response)["choices"][0]["text"]))
EOF
    kill -TERM "$pid"
    wait "$pid"
    echo "   ($((SECONDS - t)) s)"
}

# --------------------------------------------------------------------------- data

tour cookbook sample-corpus corpus.jsonl $CORPUS

tour cookbook tokenizer train --input corpus.jsonl --output tok.model --vocab-size 8000
tour cookbook tokenizer train --input corpus.jsonl --output tok_hf --kind hf-bpe --vocab-size 8000

tour cookbook preprocess --input corpus.jsonl --output-prefix data/corpus \
    --tokenizer-model tok.model --append-eod --workers $WORKERS

tour cookbook merge --input data/ --output-prefix data/all

tour cookbook data info data/all --decode 1 --tokenizer tok.model

# --------------------------------------------------------------------------- training

tour cookbook pretrain --preset tiny --data-path data/all --tokenizer-model tok.model --seq-length 256 \
    --micro-batch-size 8 --train-iters $ITERS --lr 2e-3 --lr-warmup-iters 20 --save ckpt/tiny --load ckpt/tiny

setup "run.toml: the tiny job as a TOML file, saved to ckpt/fsdp"
cat > run.toml <<'EOF'
[model]
preset = "tiny"

[data]
data_path = ["data/all"]
tokenizer_model = "tok.model"
seq_length = 256

[optimizer]
lr = 2e-3
lr_warmup_iters = 5

[training]
train_iters = 20
micro_batch_size = 4
global_batch_size = 16
log_interval = 5

[checkpoint]
save = "ckpt/fsdp"
load = "ckpt/fsdp"
EOF
tour torchrun --nproc-per-node $NPROC -m cookbook pretrain --config run.toml
tour cookbook pretrain --config run.toml --reset-position-ids --reset-attention-mask --eod-mask-loss --attention-backend auto \
    --save ckpt/tiny-docs --load ckpt/tiny-docs
tour torchrun --nproc-per-node $NPROC_3D -m cookbook pretrain --config run.toml --tensor-model-parallel-size 2 \
    --sequence-parallel --pipeline-model-parallel-size 2 --recompute-granularity selective --save ckpt/tiny-3d --load ckpt/tiny-3d

tour cookbook plan --preset llama-65b --seq-length 4096 --global-batch-size 1024 --num-gpus 128
tour bash "$RECIPES/pretrain/llama-65b.sh" --dry-run

# --------------------------------------------------------------------------- evaluation

setup "heldout.jsonl: documents of the sample corpus that corpus.jsonl stops before"
cookbook sample-corpus more.jsonl --max-mb 2.1 > /dev/null
tail -n +$(( $(wc -l < corpus.jsonl) + 1 )) more.jsonl > heldout.jsonl
echo "   $(wc -l < heldout.jsonl) documents"

tour cookbook eval --load ckpt/tiny --ppl-files heldout.jsonl --append-eod --seq-length 256,512
tour cookbook generate --load ckpt/tiny --prompt "def main(" --temperature 0.7 --top-k 40

setup "$HF_MODEL: ckpt/tiny as a Hugging Face folder, to convert from"
cookbook convert --from cookbook --to hf --load-dir ckpt/tiny --save-dir $HF_MODEL --overwrite --quiet
tour cookbook convert --from hf --to megatron --load-dir $HF_MODEL --save-dir $MEGATRON_DIR --tp $CONVERT_TP --pp 2 --overwrite
tour cookbook convert --from megatron --to hf --load-dir $MEGATRON_RUN --save-dir $HF_BACK --overwrite

# --------------------------------------------------------------------------- extend, prune, distill

tour cookbook extend --load ckpt/tiny --interp-factor 2 --data-path data/all --train-iters $EXTEND_ITERS --lr 2e-4 \
    --save ckpt/tiny-512
tour cookbook eval --load ckpt/tiny-512 --passkey --seq-length 256,512
tour cookbook plot ckpt/tiny ckpt/tiny-512 --label base --label extended -o loss.png

tour cookbook prune --load ckpt/tiny --hidden-size-remain 160 --intermediate-size-remain 512 --drop-layers 1 \
    --calib-data data/all $CALIB --heal-steps $HEAL_STEPS --data-path data/all --save ckpt/tiny-pruned

setup "ckpt/big: a larger teacher with the same tokenizer (6 layers, hidden 384), trained briefly"
cookbook pretrain --preset tiny --num-layers 6 --hidden-size 384 --num-attention-heads 6 --num-query-groups 2 \
    --ffn-hidden-size 1024 --data-path data/all --tokenizer-model tok.model --seq-length 256 --micro-batch-size 8 \
    --train-iters 20 --lr 2e-3 --lr-warmup-iters 5 --log-interval 10 --save ckpt/big --load ckpt/big

tour cookbook distill generate --teacher ckpt/big --prompts-from data/all --prefix-tokens 32 --max-tokens 96 $PROMPTS \
    --output synth/
tour cookbook distill train --load ckpt/tiny --synthetic synth/ --data-path data/all --synthetic-weight 0.5 \
    --train-iters $DISTILL_ITERS --save ckpt/tiny-distilled
tour_serve cookbook serve --load ckpt/big --port $PORT

setup "tasks/: two local lm-evaluation-harness tasks over jsonl files (a multiple choice and a generation)"
mkdir -p tasks
python3 - <<'EOF_TASKS'
import json, random
rng = random.Random(0)
words = "the a cat dog runs sleeps red blue house tree river stone eats jumps over under".split()
say = lambda n: " ".join(rng.choice(words) for _ in range(n))
mc = [{"question": say(6) + "?", "choices": [say(2), say(3), say(2)], "answer": rng.randrange(3)} for _ in range(16)]
gen = [{"question": "Q: " + say(4) + "\nA:", "answer": " " + say(1)} for _ in range(16)]
for name, rows in (("mc", mc), ("gen", gen)):
    open(f"tasks/{name}.jsonl", "w").write("".join(json.dumps(r) + "\n" for r in rows))
head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: tasks/{}.jsonl\ntest_split: test\n"
open("tasks/my_mc.yaml", "w").write("task: my_mc\n" + head.format("mc") + "output_type: multiple_choice\n"
    'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\nmetric_list:\n  - metric: acc\n')
open("tasks/my_gen.yaml", "w").write("task: my_gen\n" + head.format("gen") + "output_type: generate_until\n"
    'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n'
    "  max_gen_toks: 8\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
EOF_TASKS
if python3 -c "import lm_eval" 2>/dev/null; then
    tour cookbook eval --load ckpt/tiny --tasks my_mc,my_gen --include-path tasks/ --num-fewshot $FEWSHOT --dump-dir eval/
else
    echo "== skipped: cookbook eval --tasks needs lm-evaluation-harness (pip install 'cookbook[eval]')"
fi

tour cookbook pretrain --preset tiny --data-path data/all --tokenizer-model tok.model --seq-length 256 \
    --micro-batch-size 8 --train-iters $DISTILL_ITERS --save ckpt/tiny-kd --load ckpt/tiny-kd \
    --kd-teacher ckpt/big --kd-ratio 0.5 --kd-temperature 2

echo "tour finished in $((SECONDS - START)) s: outputs in $PWD"
