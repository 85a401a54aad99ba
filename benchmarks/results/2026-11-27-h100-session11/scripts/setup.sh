#!/usr/bin/env bash
# 1x H100 lease, call 1: part8 + extras, copy the repo, start chain S (SDXL batch sweep, issue 14).
set -x
nvidia-smi -L; nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1; nproc; free -g | head -2; df -h /tmp | tail -1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  $(ls .dev/wheels/part8/*.whl | grep -v -e numpy- -e tensorrt) .dev/extra/*.whl 2>&1 | tail -3
mkdir -p /root/wheels && cp .dev/wheels/part8/*.nchunks .dev/wheels/part8/tensorrt_rtx_cu13_bindings*.whl /root/wheels/
rm -rf /tmp/sdxrepo && mkdir /tmp/sdxrepo && tar --exclude=./.dev/wheels --exclude=./.dev/extra --exclude=./.dev/pytriton --exclude=./.dev/np1 -cf - . | tar -xf - -C /tmp/sdxrepo
mkdir -p /tmp/res; cd /tmp/sdxrepo
for c in S; do setsid nohup bash .dev/s13/chain$c.sh > /tmp/res/chain$c.log 2>&1 < /dev/null & done
sleep 10
PYTHONPATH=/tmp/site:$PWD python3 -c "import torch, diffusers; print(torch.__version__, torch.cuda.device_count(), diffusers.__version__)"
tail -n 3 /tmp/res/chain*.log
