#!/usr/bin/env bash
# cores 6-11, GPU hidden (TensorRT-RTX's builder would otherwise use the GPU chain D/B time): sdxl-random FP16
# export (AutoCast) and a static 1024x1024 TensorRT-RTX build of each component: time, size (issue 10).
source .dev/s10/common.sh
R=/tmp/res/sdxl-trt; mkdir -p $R
export CUDA_VISIBLE_DEVICES=
waitfor $W/sdxl-model/model_index.json 300; sleep 20; waitfor /tmp/site-trt/.ok
export PYTHONPATH=$TRTP
python3 -c "import tensorrt_rtx as t; print('tensorrt_rtx', t.__version__)"
step sdxl-trt; timeout 1500 taskset -c 6-11 python3 benchmarks/gpu_bench.py sdxl-trt --work $W --out $R; echo "sdxl-trt rc=$?"
ls -l $W/sdxl-e16 $W/sdxl-e16/* > $R/export-ls.txt 2>&1
touch /tmp/res/C.done
