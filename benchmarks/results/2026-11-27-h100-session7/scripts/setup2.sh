#!/usr/bin/env bash
# 2x H100 lease, call 1 (carry .dev/wheels/part8 .dev/extra .dev/s9): wheels, repo copy, chain S (issue 12 serve
# with VAE slicing, cores 0-23) and chain L (sd15 e32 export on cores 24-31, then the LoRA stage alone after S).
set -x
nvidia-smi -L; nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1; nproc; free -g | head -2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  $(ls .dev/wheels/part8/*.whl | grep -v -e numpy- -e tensorrt) .dev/extra/*.whl 2>&1 | tail -3
mkdir -p /root/wheels && cp .dev/wheels/part8/*.nchunks .dev/wheels/part8/numpy-1.26.4*.whl /root/wheels/
rm -rf /tmp/sdxrepo && mkdir /tmp/sdxrepo && tar --exclude=./.dev/wheels --exclude=./.dev/extra --exclude=./.dev/pytriton --exclude=./.dev/np1 -cf - . | tar -xf - -C /tmp/sdxrepo
mkdir -p /tmp/res; cd /tmp/sdxrepo
for c in S L; do setsid nohup bash .dev/s9/chain$c.sh > /tmp/res/chain$c.log 2>&1 < /dev/null & done
sleep 5; tail -3 /tmp/res/chain*.log
