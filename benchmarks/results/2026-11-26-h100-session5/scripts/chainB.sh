#!/usr/bin/env bash
# GPU 1, cores 12-23: sdxl-random FP32 export (with the ONNX UNet), the ORT CUDA variant, and the SDXL rows
# FP32 eager (the PSNR reference), torch.compile + CUDA graph (the peer) and the two ORT CUDA rows (issue 10).
source .dev/s6/common.sh
R=/tmp/res/sdxl; mkdir -p $R
export CUDA_VISIBLE_DEVICES=1 PYTHONPATH=/tmp/site:$PWD
T="taskset -c 12-23"
step sdxl-prepare; $T python3 benchmarks/gpu_bench.py sdxl-prepare --work $W --out $R --sdxl-onnx-unet --no-inductor; echo "prepare rc=$?"
step wait-ort; waitfor /tmp/site-ort/.ok
export PYTHONPATH=$ORTP
step sdxl-ortprep; $T python3 benchmarks/gpu_bench.py sdxl-ortprep --work $W --out $R; echo "ortprep rc=$?"
step sdxl; timeout 900 $T python3 benchmarks/gpu_bench.py sdxl --work $W --out $R --only "FP32 eager,torch.compile,ORT CUDA"; echo "sdxl rc=$?"
touch /tmp/res/B.gpu.done
