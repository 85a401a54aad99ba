#!/usr/bin/env bash
nvidia-smi -L; nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  $(ls .dev/wheels/part8/*.whl | grep -v -e numpy- -e tensorrt) 2>&1 | tail -3
mkdir -p /root/wheels && cp .dev/wheels/part8/*.nchunks /root/wheels/
rm -rf /tmp/sdxrepo && mkdir /tmp/sdxrepo && tar --exclude=./.dev/wheels --exclude=./.dev/extra --exclude=./.dev/pytriton --exclude=./.dev/np1 -cf - . | tar -xf - -C /tmp/sdxrepo
mkdir -p /tmp/res; cd /tmp/sdxrepo
setsid nohup bash .dev/s8/chainP.sh > /tmp/res/chainP.log 2>&1 < /dev/null &
sleep 3; tail -3 /tmp/res/chainP.log
