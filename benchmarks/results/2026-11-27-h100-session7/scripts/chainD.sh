#!/usr/bin/env bash
# 1x H100, cores 12-15, the GPU while chains B and C are on the CPU: the FP8 SDXL UNet probe (issue 14), before
# chain B needs the GPU for the SDXL rows.
source .dev/s9/common.sh
R=/tmp/res/sdxl-fp8; mkdir -p $R
export PYTHONPATH=/tmp/site:$PWD
step fp8; timeout 900 taskset -c 12-15 python3 benchmarks/speed_probe.py --model sdxl --variants compile+graph,compile+qkv+cl+fp8 --profile --iters 50 --out $R; echo "fp8 rc=$?"
touch /tmp/res/D.done
