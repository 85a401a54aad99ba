#!/usr/bin/env bash
# cores 0-5: sdxl-random preset + FP32 export with the ONNX UNet, the ORT CUDA variant (CPU), then on the GPU
# (after chain D): FP32 eager, torch.compile + CUDA graph, ORT CUDA fused dynamic and static + step graph, VAE.
source .dev/s10/common.sh
R=/tmp/res/sdxl; mkdir -p $R
export PYTHONPATH=/tmp/site:$PWD
T="taskset -c 0-5"
step sdxl-prepare; $T python3 benchmarks/gpu_bench.py sdxl-prepare --work $W --out $R --sdxl-onnx-unet --no-inductor; echo "prepare rc=$?"
step wait-ort; waitfor /tmp/site-ort/.ok
export PYTHONPATH=$ORTP
step sdxl-ortprep; $T python3 benchmarks/gpu_bench.py sdxl-ortprep --work $W --out $R; echo "ortprep rc=$?"
step wait-D; waitfor /tmp/res/D.done 60 || { echo "pausing chain D"; pkill -STOP -f "chai[n]D.sh"; for p in $(pgrep -f "speed_prob[e]"); do kill -STOP $p; done; }
step sdxl; timeout 1200 taskset -c 0-11 python3 benchmarks/gpu_bench.py sdxl --work $W --out $R --only "FP32 eager,torch.compile,ORT CUDA,vae"; echo "sdxl rc=$?"
touch /tmp/res/B.done
