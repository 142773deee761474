#!/usr/bin/env bash
# benchmarks/run.py on a GPU, in one short run. NO GPU FIGURE EXISTS YET: no GPU was lent to the tasks that wrote this
# (issues 13 and 30); every committed figure is from a 2-core CPU.
#
#   bash benchmarks/gpu.sh              # ~2-4 min: the decoder-bound keys of issue 30 -> runs/bench_gpu.json
#   FULL=1 bash benchmarks/gpu.sh       # + the Qwen2.5-1.5B-shaped table of issue 13 (bf16, 8 groups x 8 rollouts)
#
# Part 1, the same keys as the committed CPU results (benchmarks/results/cpu_2core_decoder.json), float32 so the
# paths agree to 1e-4 as asserted on the CPU: on the decoder-bound shape (4 layers, 256 wide; 16 groups x 8 rollouts
# sharing a 316-token prompt) `fraction_of_distinct_bound` (the engine against the batch-1 scorer) and the session's
# `step_session_fraction_of_bound` (a 5-turn episode, K = 4), with each path's tokens per second
# (`engine_tokens_per_s`, `naive_tokens_per_s`, `floor_tokens_per_s`, `step_session_a/b_tokens_per_s`) and its peak
# GPU memory (`peak_memory_mb`, `step_session_peak_memory_mb`: torch.cuda.max_memory_allocated per timed call).
# Small steps on a GPU are launch-bound, so these are where the session's one call per model per score shows.
# Part 2 (FULL=1): a Qwen2.5-1.5B-shaped random model in bf16 with SDPA, 8 groups of 8 agent rollouts, plus the tiny
# shape; the float32 agreement check runs on copies of the models; multi-process scoring uses every visible GPU.
# Nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())")
[ "$NGPU" -ge 1 ] || { echo "no GPU visible: no GPU figure exists (see benchmarks/README.md)" >&2; exit 1; }
OUT=${OUT:-runs}
mkdir -p "$OUT"
$PY -c "import torch; print(torch.cuda.get_device_name(0), torch.__version__)"
$PY benchmarks/run.py --device cuda --dtype float32 --shapes decoder --skip memory,dist,capture \
    --repeat-large 3 --json "$OUT/bench_gpu.json" "$@"
if [ "${FULL:-0}" = 1 ]; then
    SKIP=()
    [ "$NGPU" -ge 2 ] || SKIP=(--skip dist)
    $PY benchmarks/run.py --device cuda --dtype bfloat16 --shapes qwen2.5-1.5b,tiny --groups 8 --tiny-n 64 \
        --repeat 3 --repeat-large 3 --dist-n 0 --nproc "$NGPU" --capture-steps 10 --capture-repeat 3 \
        "${SKIP[@]}" --json "$OUT/bench_gpu_full.json" "$@"
fi
