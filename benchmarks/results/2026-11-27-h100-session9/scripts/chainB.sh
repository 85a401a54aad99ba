#!/usr/bin/env bash
# cores 0-9: sdxl-random preset (shared; preset.ok), the FP32 export with the ONNX UNet, the ORT CUDA variant
# (CPU, ~630 s), then on GPU 1: the ORT CUDA rows (dynamic; static + step graph); PSNR against chain E's FP32
# eager image (kept in /tmp/sdx by the sdxl stage).
source .dev/s11/common.sh
R=/tmp/res/sdxl-ort; mkdir -p $R
export PYTHONPATH=/tmp/site:$PWD
T="taskset -c 0-9"
step preset; timed $T $PY -m sdexport preset $PRESET -o $W/sdxl-model > $R/preset.txt 2>&1 && touch $W/preset.ok
step sdxl-prepare; $T $PY benchmarks/gpu_bench.py $GB sdxl-prepare --work $W --out $R --sdxl-onnx-unet --no-inductor; echo "prepare rc=$?"
step wait-ort; waitfor /tmp/site-ort/.ok
export PYTHONPATH=$ORTP
step sdxl-ortprep; $T $PY benchmarks/gpu_bench.py $GB sdxl-ortprep --work $W --out $R; echo "ortprep rc=$?"
df -h /tmp | tail -1
step wait-E-reference; waitfor /tmp/res/E.fp32 120
step sdxl-ort; CUDA_VISIBLE_DEVICES=1 timeout 900 $T $PY benchmarks/gpu_bench.py $GB sdxl --work $W --out $R --only "ORT CUDA"; echo "sdxl rc=$?"
step validate-ort; CUDA_VISIBLE_DEVICES=1 timeout 400 $T $PY -m sdexport validate $W/sdxl-e32 --backend ort --device cuda > $R/validate-ort-cuda.txt 2>&1; echo "validate rc=$?"; tail -3 $R/validate-ort-cuda.txt
step sdxl-compile-gpu1; CUDA_VISIBLE_DEVICES=1 timeout 600 $T $PY benchmarks/gpu_bench.py $GB sdxl --work $W --out $R/compile-gpu1 --only "torch.compile"; echo "compile gpu1 rc=$?"
touch /tmp/res/B.done
