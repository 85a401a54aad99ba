#!/usr/bin/env bash
# 2x lease, GPU 1 and cores 24-31 while chain S compiles and times GPU 0: LoRA switching on ONNX Runtime CUDA with
# live weights (the GPU test, then the lora stage if there is time before serve takes GPU 1).
source /tmp/sdxrepo/.dev/s8/common.sh
R=/tmp/res/sd15; mkdir -p $R
export CUDA_VISIBLE_DEVICES=1 PYTHONPATH=$ORTP
T="taskset -c 24-31"
step wait-preset; waitfor $W/sd15/model_index.json 120
step export; timed $T python3 -m sdexport export $W/sd15 -o $W/e32 --components text_encoder,unet,vae_decoder --max-batch 8 > $R/export-e32.txt 2>&1
step gpu-tests; timeout 240 $T python3 -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_lora.py -k "cuda_ort" > $R/gpu-tests-lora.txt 2>&1; echo "tests rc=$?"
if [ $(date +%H%M) -lt 0055 ]; then
  step lora; timeout 270 $T python3 benchmarks/gpu_bench.py lora --work $W --out $R --no-reexport; echo "lora rc=$?"
else echo "no time for the lora stage before serve takes GPU 1"; fi
touch /tmp/res/D.done
