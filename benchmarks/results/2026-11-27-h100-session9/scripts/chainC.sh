#!/usr/bin/env bash
# cores 16-31, GPUs hidden (TensorRT-RTX's builder would use a GPU the other chains time): sdxl-random FP16 export
# (AutoCast; the UNet's needs ~80 GB RAM) and a static 1024x1024 TensorRT-RTX build of each component: time,
# size (issue 10 item 6).
source .dev/s11/common.sh
R=/tmp/res/sdxl-trt; mkdir -p $R
export CUDA_VISIBLE_DEVICES=
waitfor $W/preset.ok 120; waitfor /tmp/site-trt/.ok
export PYTHONPATH=$TRTP
$PY -c "import tensorrt_rtx as t; print('tensorrt_rtx', t.__version__)"
step sdxl-trt; timeout 1700 taskset -c 16-31 $PY benchmarks/gpu_bench.py $GB sdxl-trt --work $W --out $R; echo "sdxl-trt rc=$?"
ls -l $W/sdxl-e16 $W/sdxl-e16/* > $R/export-ls.txt 2>&1; df -h /tmp | tail -1
touch /tmp/res/C.done
