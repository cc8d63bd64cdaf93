#!/usr/bin/env bash
# Every GPU figure cookbook claims, in one run on one H100/H200 (under 8 minutes): MFU and tokens/s of a ~1B Llama
# at sequence 4096 (eager and --compile; SDPA, flash-attn and FlexAttention with document masks; --fp8), the same
# step in HF transformers, peak memory against cookbook plan, bf16 GPU loss against fp32 CPU loss, generation
# against HF generate. One table on stdout, the JSON in --out (default bench-gpu.json). See bench/gpu.py.
#
#   bash bench/gpu.sh                       # on the GPU machine, from anywhere (the repository need not be installed)
#   bash bench/gpu.sh --out gpu.json --rungs sdpa,"sdpa compile",hf
#   bash bench/gpu.sh --smoke               # tiny shapes on the CPU, seconds: what tests/test_bench_gpu.py runs
#   PYTHON=python3.11 bash bench/gpu.sh     # another interpreter
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
python="${PYTHON:-$(command -v python || command -v python3)}"
exec "$python" "$root/bench/gpu.py" "$@"
