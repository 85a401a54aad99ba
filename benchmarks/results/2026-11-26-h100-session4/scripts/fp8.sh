#!/usr/bin/env bash
# replaces the rest of gpu1.sh: after the running probe, the FP8 variant alone, then probe.done (serve-2gpu waits on it)
cd /tmp/sdxrepo
export CUDA_VISIBLE_DEVICES=1 PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
while pgrep -f "speed_probe.py --model sdxl --profile --out /tmp/res/sdxl " >/dev/null; do sleep 3; done
echo "=== fp8 $(date +%T)"
mkdir -p /tmp/res/sdxl-fp8
timeout 300 python3 benchmarks/speed_probe.py --model sdxl --profile --out /tmp/res/sdxl-fp8 --variants compile+graph,compile+qkv+cl+fp8
echo "fp8 rc=$? $(date +%T)"
touch /tmp/res/gpu1.probe.done /tmp/res/gpu1.done
