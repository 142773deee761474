#!/usr/bin/env bash
# benchmarks/run.py on a GPU node (issue 13, point 8; not run yet: no GPU was available when it was written).
# A Qwen2.5-1.5B-shaped random model (hidden 1536, 28 layers, vocabulary 151936, tied) in bf16 with SDPA, on 8 groups
# of 8 agent rollouts, plus the tiny shape. Nothing is downloaded. The float32 agreement check (1e-4) runs on copies
# of the models on two trajectories; timings are bf16. Multi-process scoring uses every visible GPU (skipped on one).
#   bash benchmarks/gpu.sh                 # -> runs/bench_gpu.json and the table on stdout
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
[ "$NGPU" -ge 1 ] || { echo "no GPU visible" >&2; exit 1; }
SKIP=()
[ "$NGPU" -ge 2 ] || SKIP=(--skip dist)
exec $PY benchmarks/run.py --device cuda --dtype bfloat16 --shapes qwen2.5-1.5b,tiny --groups 8 --tiny-n 64 \
    --repeat 3 --repeat-large 3 --dist-n 0 --nproc "$NGPU" --capture-steps 10 --capture-repeat 3 \
    "${SKIP[@]}" --json runs/bench_gpu.json "$@"
