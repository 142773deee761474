#!/usr/bin/env bash
# bash recipes/score_public_pair.sh [recipes/score_public_pair.yaml]
# Sample labelled episodes of a public instruct model in the demo world, export (instruct, base) as a critic bundle,
# and evaluate progress advantage against the baselines. Every setting lives in the YAML; environment variables
# POLICY, REFERENCE, OUT_DIR override the pair and the output folder (smoke tests point them at tiny local models).
set -euo pipefail
CONFIG="${1:-recipes/score_public_pair.yaml}"
PY="${PYTHON:-python}"
get() { "$PY" -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))[sys.argv[2]])" "$CONFIG" "$1"; }
POLICY="${POLICY:-$(get policy)}"
REFERENCE="${REFERENCE:-$(get reference)}"
OUT_DIR="${OUT_DIR:-$(get out_dir)}"
mkdir -p "$OUT_DIR"

# 1. Episodes of the policy, labelled by the world (success, failure_step, failure_kind).
"$PY" "$(dirname "$0")/sample_world.py" --config "$CONFIG" --model "$POLICY" --output "$OUT_DIR/trajectories.jsonl"

# 2. The pair as a critic bundle (beta = 1: the pair has no training beta to inherit).
progadv export --policy "$POLICY" --reference "$REFERENCE" --beta 1.0 --overwrite "$OUT_DIR/bundle"

# 3. Per-step scores, then best-of-N / success prediction / failure attribution vs the baselines.
progadv score --bundle "$OUT_DIR/bundle" "$OUT_DIR/trajectories.jsonl" -o "$OUT_DIR/scores.jsonl"
progadv evaluate --bundle "$OUT_DIR/bundle" "$OUT_DIR/trajectories.jsonl" -o "$OUT_DIR/eval"
echo "done: $OUT_DIR/eval/metrics.md"
