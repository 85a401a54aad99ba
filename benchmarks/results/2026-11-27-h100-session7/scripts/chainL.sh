#!/usr/bin/env bash
# 2x H100, cores 24-31 then alone: sd15-random FP32 export with the UNet (while S prepares), then after S the
# LoRA stage on a quiet host (issue 11: live weights, fuse split into files / base weights / deltas) and the
# ORT UNet batch-size switch probe (what serve --backend ort would pay; EXHAUSTIVE vs HEURISTIC steady state).
source .dev/s9/common.sh
R=/tmp/res/sd15; mkdir -p $R
export PYTHONPATH=$ORTP
waitfor /tmp/res/sd15.preset.done 200
step export; CUDA_VISIBLE_DEVICES=1 timed taskset -c 24-31 python3 -m sdexport export $W/sd15 -o $W/e32 --components text_encoder,unet,vae_decoder --max-batch 8 > $R/export-e32.txt 2>&1
step wait-S; waitfor /tmp/res/S.done 300
step lora; CUDA_VISIBLE_DEVICES=0 timeout 420 python3 benchmarks/gpu_bench.py lora --work $W --out $R --no-reexport; echo "lora rc=$?"
step unet-probe; CUDA_VISIBLE_DEVICES=0 timeout 420 python3 benchmarks/ort_shape_switch_probe.py $W/e32 --component unet --out $R; echo "probe rc=$?"
touch /tmp/res/L.done
