#!/usr/bin/env bash
# GPU 0: sd15-random exports and Inductor engines, LoRA switch times (issue 11), serve load on 1 then 2 GPUs (issue 12).
cd /tmp/sdxrepo
W=/tmp/sdx R=/tmp/res/sd15
export CUDA_VISIBLE_DEVICES=0 PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
mkdir -p $W $R
step() { echo "=== $1 $(date +%T)"; }
step preset; python3 -m sdexport preset sd15-random -o $W/sd15 || exit 1
step exports
python3 -m sdexport export $W/sd15 -o $W/e32 --components text_encoder,unet,vae_decoder --max-batch 8 > $R/export-e32.txt 2>&1 &
python3 -m sdexport export $W/sd15 -o $W/e32i --components text_encoder,vae_decoder --max-batch 8 > $R/export-e32i.txt 2>&1
step inductor-dynamic
python3 -m sdexport build $W/e32i --backend inductor --static 512x512 --max-batch 8 --components unet --device cuda > $R/build-inductor.txt 2>&1; echo "build rc=$?"
wait; echo "exports done $(date +%T)"
step wait-ort
for i in $(seq 120); do [ -f /tmp/site-ort/.ok ] && break; sleep 5; done
export PYTHONPATH=/tmp/site-ort:/tmp/site:$PWD
python3 -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())"
step ortprep-e32i
python3 -m sdexport build $W/e32i --backend ort --components vae_decoder > $R/build-ort-e32i.txt 2>&1; echo "ortprep rc=$?"
step lora
timeout 600 python3 benchmarks/gpu_bench.py lora --work $W --out $R; echo "lora rc=$?"
step serve-1gpu
for i in $(seq 60); do [ -f /tmp/site-serve/.ok ] && break; sleep 5; done
SP=/tmp/site-np1:/tmp/site-serve:/tmp/site-ort:/tmp/site:$PWD
WU="--serve-arg=--step-graph --serve-arg=--warmup=512x512x1 --serve-arg=--warmup=512x512x2 --serve-arg=--warmup=512x512x4 --serve-arg=--warmup=512x512x8"
PYTHONPATH=$SP timeout 540 python3 benchmarks/serve_load.py $W/e32i --backend inductor --device cuda --gpus 0 --steps 30 --size 512 \
  --concurrency 1,2,4,8,16 --time-limit-s 420 --out $R/serve1 $WU; echo "serve1 rc=$?"
step wait-gpu1
for i in $(seq 120); do [ -f /tmp/res/gpu1.probe.done ] && break; sleep 5; done
unset CUDA_VISIBLE_DEVICES
step serve-2gpu
PYTHONPATH=$SP timeout 480 python3 benchmarks/serve_load.py $W/e32i --backend inductor --device cuda --gpus 0 --gpus 0,1 --steps 30 --size 512 \
  --concurrency 8,16 --no-baseline --time-limit-s 400 --out $R/serve2 $WU; echo "serve2 rc=$?"
touch /tmp/res/gpu0.done
