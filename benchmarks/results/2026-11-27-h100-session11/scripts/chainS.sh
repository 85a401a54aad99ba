#!/usr/bin/env bash
# 1x H100 (16 cores, 128 GiB, 64 GiB disk): issue 14's throughput target for SDXL. sdxl-sweep writes the
# sdxl-random preset (13 GB), an FP32 export of the text encoders and VAE for up to 8 images (3.3 GB) and the
# dynamic-batch (1-8) Inductor packages of the UNet and FP32 VAE at 1024x1024, then images/s at batch 1, 2, 4, 8
# for torch.compile + CUDA graph and the Inductor engine with step graphs (ORT GPU on the path: the package's
# text encoders run on ONNX Runtime).
source .dev/s13/common.sh
R=/tmp/res/sdxl-sweep; mkdir -p $R
export CUDA_VISIBLE_DEVICES=0
waitfor /tmp/site-ort/.ok
export PYTHONPATH=$ORTP
step sdxl-sweep; timeout 1500 $PY benchmarks/gpu_bench.py $GB sdxl-sweep --work $W --out $R; echo "sweep rc=$?"
df -h /tmp | tail -1
touch /tmp/res/S.done
