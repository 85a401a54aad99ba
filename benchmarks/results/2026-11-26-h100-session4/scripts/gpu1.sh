#!/usr/bin/env bash
# GPU 1: issue 14's SDXL probe (kernel profiles), then the TensorRT first-run check (issue 13).
cd /tmp/sdxrepo
export CUDA_VISIBLE_DEVICES=1 PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/res/sdxl
echo "=== sdxl-probe $(date +%T)"
timeout 1000 python3 benchmarks/speed_probe.py --model sdxl --profile --out /tmp/res/sdxl \
  --variants compile+graph,compile+qkv+cl+cudnn-attn,compile+qkv+cl,engine+cudnn-attn,compile+qkv+cl+fp8,engine,compile+qkv+cl+flash-attn
echo "probe rc=$? $(date +%T)"
touch /tmp/res/gpu1.probe.done
echo "=== trt-check $(date +%T)"
for i in $(seq 60); do [ -f /tmp/site-trt/.ok ] && break; sleep 5; done
export PYTHONPATH=/tmp/site-trt:/tmp/site-ort:/tmp/site:$PWD
python3 -m sdexport env > /tmp/res/sdxl/sdexport-env.txt 2>&1
timeout 420 python3 -m pytest -q -rs -m trt -p no:cacheprovider tests/test_trt_check.py > /tmp/res/sdxl/trt-check-hopper.txt 2>&1
echo "trt-check rc=$? $(date +%T)"
touch /tmp/res/gpu1.done
