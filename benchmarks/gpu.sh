#!/usr/bin/env bash
# The GPU measurement of issue 5: sd15-random exports, the four-way table with the peers, the batch and
# resolution sweep, and the TensorRT-RTX builds. Writes JSON per stage to $OUT (default
# benchmarks/results/raw); benchmarks/report.py turns them into the committed Markdown table and chart.
#
# usage: benchmarks/gpu.sh [STAGE ...]      stages: prepare fourway sweep trt (default: all, in order)
# Needs a CUDA GPU, torch with CUDA, onnxruntime-gpu==1.31.1 and the packages of pyproject.toml.
# Each stage takes 2 to 8 minutes on an H100; stages after `prepare` reuse its files in $WORK.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-benchmarks/results/raw} WORK=${WORK:-/tmp/sdx} PYTHONUNBUFFERED=1
export SDEXPORT_COMMIT=${SDEXPORT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
for stage in ${@:-prepare fourway sweep trt}; do
  echo "=== $stage ($(date +%T))"
  python3 benchmarks/gpu_bench.py "$stage" --work "$WORK" --out "$OUT" || { echo "stage $stage failed"; status=1; }
done
exit $status
