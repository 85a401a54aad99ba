#!/usr/bin/env bash
# time is short: stop the SDXL probe once 'engine' is measured (skips flash-attn), and run serve-2gpu with
# only the 0,1 configuration once serve-1gpu and the FP8 probe are done.
cd /tmp/sdxrepo
kill -9 605 2>/dev/null   # gpu0.sh (its serve-1gpu python goes on)
( while ! python3 -c "import json,sys; d=json.load(open('/tmp/res/sdxl/speed_probe-sdxl.json')); sys.exit(0 if 'engine' in d['variants'] else 1)" 2>/dev/null; do sleep 3; done
  echo "engine measured $(date +%T); stopping the probe"; kill 612 613 ) &
while pgrep -f "serve_load.py /tmp/sdx/e32i" >/dev/null; do sleep 3; done
echo "serve1 done $(date +%T)"
for i in $(seq 150); do [ -f /tmp/res/gpu1.probe.done ] && break; sleep 3; done
echo "=== serve-2gpu $(date +%T)"
W=/tmp/sdx R=/tmp/res/sd15
SP=/tmp/site-np1:/tmp/site-serve:/tmp/site-ort:/tmp/site:$PWD
PYTHONUNBUFFERED=1 PYTHONPATH=$SP timeout 400 python3 benchmarks/serve_load.py $W/e32i --backend inductor --device cuda --gpus 0,1 --steps 30 --size 512 \
  --concurrency 8,16 --no-baseline --time-limit-s 300 --out $R/serve2 --serve-arg=--step-graph --serve-arg=--warmup=512x512x1 \
  --serve-arg=--warmup=512x512x2 --serve-arg=--warmup=512x512x4 --serve-arg=--warmup=512x512x8; echo "serve2 rc=$? $(date +%T)"
touch /tmp/res/gpu0.done
