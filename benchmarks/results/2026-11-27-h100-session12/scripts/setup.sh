#!/usr/bin/env bash
# last wheel part's call: install, copy the repo, start the chain in its own session
bash .dev/wheels/part6/unstage.sh 2>&1 | tail -2
nvidia-smi -L; nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1; nproc; free -g | head -2; df -h /tmp | tail -1
rm -rf /tmp/sdxrepo && mkdir /tmp/sdxrepo && tar --exclude=./.dev/wheels -cf - . | tar -xf - -C /tmp/sdxrepo
mkdir -p /tmp/res; cd /tmp/sdxrepo
BATCHES="${BATCHES:-8 4 2 1}" setsid nohup bash .dev/s14/chain.sh > /tmp/res/chain.log 2>&1 < /dev/null &
sleep 20
PYTHONPATH=/tmp/site:$PWD python3 -c "import torch, diffusers, onnxruntime, polygraphy; print(torch.__version__, torch.cuda.device_count(), diffusers.__version__, onnxruntime.__version__, onnxruntime.get_available_providers())"
tail -n 5 /tmp/res/chain.log
