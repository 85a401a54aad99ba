#!/usr/bin/env bash
# The GPU measurement of issues 4 and 5: sd15-random exports, the GPU tests (step graphs), the four-way
# table with the peers, the kernel profile, the batch and resolution sweep, the INT8 accuracy report and
# (optionally) the TensorRT-RTX builds. Writes JSON per stage to $OUT (default
# benchmarks/results/raw); benchmarks/report.py turns them into the committed Markdown table and chart.
#
# usage: benchmarks/gpu.sh [STAGE ...]   stages: prepare gputests fourway profile sweep int8 trt serve-prepare serve lora
#                                                sdxl-prepare sdxl-ortprep sdxl sdxl-trt sdxl-sweep
#                                        (default: the SD 1.5 stages but trt, in that order; the SDXL stages
#                                        (issue 10) run when named: benchmarks/gpu.sh sdxl-prepare sdxl-ortprep sdxl)
# Needs a CUDA GPU, torch with CUDA, onnxruntime-gpu==1.31.1 and the packages of pyproject.toml.
# Each stage takes 2 to 8 minutes on an H100; stages after `prepare` reuse its files in $WORK.
# The SDXL stages take longer (sdxl-prepare ~8 min, sdxl-ortprep ~11 min of CPU, sdxl-trt ~25 min; sdxl-sweep
# compiles a dynamic-batch UNet and VAE and runs up to 8 images at 1024 px) and about
# 80 GB of free disk in $WORK together: the preset 13 GB, its FP32 export with the ONNX UNet (which the ORT rows
# run) 13 GB, the ORT variant 5 GB plus 20 GB of scratch, the FP16 export 7 GB plus 20 GB of scratch.
# On Hopper, where TensorRT-RTX builds but cannot load its engines, run sdxl-trt with the GPUs hidden
# (`CUDA_VISIBLE_DEVICES= benchmarks/gpu.sh sdxl-trt`): it builds on the CPU for TensorRT-RTX's default targets.
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-benchmarks/results/raw} WORK=${WORK:-/tmp/sdx} PYTHONUNBUFFERED=1
export SDEXPORT_COMMIT=${SDEXPORT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
for stage in ${@:-prepare gputests fourway profile sweep int8}; do
  echo "=== $stage ($(date +%T))"
  if [ "$stage" = gputests ]; then  # the tests that need CUDA (skipped in CPU-only CI), on the tiny preset
    mkdir -p "$OUT"
    python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gputests.txt" | tail -5
    [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "stage gputests failed"; status=1; }
    continue
  fi
  if [ "$stage" = serve ]; then  # issue 12: serve_load on prepare's (or serve-prepare's) dynamic-batch Inductor export (needs
    # nvidia-pytriton); one GPU, and one vs two where the host has two or more
    gpus="--gpus 0"; [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ] && gpus="--gpus 0 --gpus 0,1"
    python3 benchmarks/serve_load.py "$WORK/e32i" --backend inductor --device cuda $gpus --steps 30 --size 512 \
      --serve-arg=--step-graph --out "$OUT/serve" || { echo "stage serve failed"; status=1; }
    continue
  fi
  extra=()
  [ "$stage" = sdxl-prepare ] && extra=(--sdxl-onnx-unet)  # the ORT rows of the sdxl stage run the ONNX UNet
  python3 benchmarks/gpu_bench.py "$stage" --work "$WORK" --out "$OUT" "${extra[@]}" || { echo "stage $stage failed"; status=1; }
done
exit $status
