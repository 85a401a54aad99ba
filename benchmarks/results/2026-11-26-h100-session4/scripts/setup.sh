#!/usr/bin/env bash
# call 1 on the 2-GPU lease: install part8 + extras, copy the repo, start both chains.
set -x
nvidia-smi -L; nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  $(ls .dev/wheels/part8/*.whl | grep -v -e numpy- -e tensorrt) .dev/extra/*.whl 2>&1 | tail -3
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-np1 .dev/wheels/part8/numpy-1.26.4*.whl 2>&1 | tail -2
mkdir -p /root/wheels && cp .dev/wheels/part8/*.nchunks .dev/wheels/part8/tensorrt_rtx_cu13_bindings*.whl /root/wheels/
rm -rf /tmp/sdxrepo && mkdir /tmp/sdxrepo && tar --exclude=./.dev/wheels --exclude=./.dev/extra --exclude=./.dev/pytriton -cf - . | tar -xf - -C /tmp/sdxrepo
mkdir -p /tmp/res
cd /tmp/sdxrepo
export SDEXPORT_COMMIT=$(git rev-parse HEAD 2>/dev/null || cat .dev/s4/COMMIT)
setsid nohup bash .dev/s4/gpu1.sh > /tmp/res/gpu1.log 2>&1 < /dev/null &
setsid nohup bash .dev/s4/gpu0.sh > /tmp/res/gpu0.log 2>&1 < /dev/null &
sleep 20
PYTHONPATH=/tmp/site:$PWD python3 -c "import torch, diffusers, torchao, modelopt; print(torch.__version__, torch.cuda.device_count(), diffusers.__version__, torchao.__version__)"
tail -5 /tmp/res/gpu0.log /tmp/res/gpu1.log
