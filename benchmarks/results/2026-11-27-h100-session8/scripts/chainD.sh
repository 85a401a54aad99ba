#!/usr/bin/env bash
# 1x H100, cores 12-15, the GPU while chains B and C are on the CPU:
# (1) issue 11: sd15-random FP32 export + the LoRA stage (the copy-free fuse, d630cef6+, unmeasured on a GPU);
# (2) issue 14: FP8 on sd15 first (compile time unknown: SDXL's did not finish in 9 min), then SDXL, each bounded.
source .dev/s10/common.sh
R=/tmp/res/sd15; mkdir -p $R /tmp/res/sdxl-fp8
waitfor /tmp/site-ort/.ok
export PYTHONPATH=$ORTP
step preset; taskset -c 12-15 python3 -m sdexport preset sd15-random -o $W/sd15 > $R/preset.txt 2>&1
step export; timed taskset -c 12-15 python3 -m sdexport export $W/sd15 -o $W/e32 --components text_encoder,unet,vae_decoder --max-batch 8 > $R/export-e32.txt 2>&1
step lora; timeout 420 taskset -c 12-15 python3 benchmarks/gpu_bench.py lora --work $W --out $R --no-reexport; echo "lora rc=$?"
step lora-probe; timeout 300 taskset -c 12-15 python3 benchmarks/lora_switch_probe.py $W/e32 $W/lora_a.safetensors $W/lora_b.safetensors --device cuda --out $R; echo "probe rc=$?"
export PYTHONPATH=/tmp/site:$PWD
step fp8-sd15; timeout 420 taskset -c 12-15 python3 benchmarks/speed_probe.py --model sd15 --variants compile+qkv+cl,compile+qkv+cl+fp8 --profile --iters 100 --out /tmp/res/sdxl-fp8; echo "fp8 sd15 rc=$?"
step fp8-sdxl; timeout 720 taskset -c 12-15 python3 benchmarks/speed_probe.py --model sdxl --variants compile+qkv+cl,compile+qkv+cl+fp8 --profile --iters 50 --out /tmp/res/sdxl-fp8; echo "fp8 sdxl rc=$?"
touch /tmp/res/D.done
