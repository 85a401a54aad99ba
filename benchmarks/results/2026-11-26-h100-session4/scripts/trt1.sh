#!/usr/bin/env bash
# call 1: part8 + extras into /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $(ls .dev/wheels/part8/*.whl | grep -v -e numpy- -e tensorrt_rtx_cu13_libs) .dev/extra/*.whl 2>&1 | tail -2
mkdir -p /root/wheels && cp .dev/wheels/part8/*.nchunks /root/wheels/
nvidia-smi -L; ls /tmp/site | head -3
