#!/usr/bin/env bash
# 2x H100 lease (256 GiB RAM, 128 GiB disk), call 1: part8 + extras, copy the repo, start chains C (sdxl-random
# preset, FP16 export with sdexport's own AutoCast reference run, TensorRT-RTX builds on the CPU, GPUs hidden)
# and E (GPU 0: SDXL torch.compile vs the Inductor engine, with the ORT GPU wheel on the path this time).
set -x
nvidia-smi -L; nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1; nproc; free -g | head -2; df -h /tmp | tail -1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  $(ls .dev/wheels/part8/*.whl | grep -v -e numpy- -e tensorrt) .dev/extra/*.whl 2>&1 | tail -3
mkdir -p /root/wheels && cp .dev/wheels/part8/*.nchunks .dev/wheels/part8/tensorrt_rtx_cu13_bindings*.whl /root/wheels/
rm -rf /tmp/sdxrepo && mkdir /tmp/sdxrepo && tar --exclude=./.dev/wheels --exclude=./.dev/extra --exclude=./.dev/pytriton --exclude=./.dev/np1 -cf - . | tar -xf - -C /tmp/sdxrepo
mkdir -p /tmp/res; cd /tmp/sdxrepo
for c in C E; do setsid nohup bash .dev/s12/chain$c.sh > /tmp/res/chain$c.log 2>&1 < /dev/null & done
sleep 10
PYTHONPATH=/tmp/site:$PWD python3 -c "import torch, diffusers; print(torch.__version__, torch.cuda.device_count(), diffusers.__version__)"
tail -n 3 /tmp/res/chain*.log
