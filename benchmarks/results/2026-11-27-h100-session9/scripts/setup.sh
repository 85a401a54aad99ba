#!/usr/bin/env bash
# 2x H100 lease (128 GiB disk; session 8's 1x lease ran out of its 64 GiB), call 1: part8 + extras, copy the repo,
# start chains B (SDXL FP32 export with the UNet, ORT CUDA variant, ORT rows on GPU 1), E (SDXL torch rows and
# the Inductor engine on GPU 0), C (SDXL FP16 export + TensorRT-RTX builds on the CPU, GPUs hidden)
set -x
nvidia-smi -L; nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1; nproc; free -g | head -2; df -h /tmp | tail -1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  $(ls .dev/wheels/part8/*.whl | grep -v -e numpy- -e tensorrt) .dev/extra/*.whl 2>&1 | tail -3
mkdir -p /root/wheels && cp .dev/wheels/part8/*.nchunks .dev/wheels/part8/tensorrt_rtx_cu13_bindings*.whl /root/wheels/
rm -rf /tmp/sdxrepo && mkdir /tmp/sdxrepo && tar --exclude=./.dev/wheels --exclude=./.dev/extra --exclude=./.dev/pytriton --exclude=./.dev/np1 -cf - . | tar -xf - -C /tmp/sdxrepo
mkdir -p /tmp/res; cd /tmp/sdxrepo
for c in B C E; do setsid nohup bash .dev/s11/chain$c.sh > /tmp/res/chain$c.log 2>&1 < /dev/null & done
sleep 10
PYTHONPATH=/tmp/site:$PWD python3 -c "import torch, diffusers; print(torch.__version__, torch.cuda.device_count(), diffusers.__version__)"
tail -n 3 /tmp/res/chain*.log
