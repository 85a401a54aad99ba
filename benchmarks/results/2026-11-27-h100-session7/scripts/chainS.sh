#!/usr/bin/env bash
# 2x H100, cores 0-23: gpu_bench serve-prepare (sd15-random e32i + Inductor UNet 1-8 + VAE variant), then
# serve_load: bench b1/b8, one server on GPU 0, one on GPUs 0,1; concurrency 1, 8, 16 (issue 12 targets).
source .dev/s9/common.sh
R=/tmp/res/serve; mkdir -p $R
T="taskset -c 0-23"
step serve-prepare; CUDA_VISIBLE_DEVICES=0 PYTHONPATH=/tmp/site:$PWD $T python3 benchmarks/gpu_bench.py serve-prepare --work $W --out $R --skip-ort; echo "rc=$?"
touch /tmp/res/sd15.preset.done
step wait-ort; waitfor /tmp/site-ort/.ok
step vae-variant; CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$ORTP timed $T python3 -m sdexport build $W/e32i --backend ort --components vae_decoder > $R/build-ort-e32i.txt 2>&1
step serve; waitfor /tmp/res/serve-imports.ok
nvidia-smi dmon -s u -d 1 > $R/dmon.txt 2>&1 &
DM=$!
PYTHONPATH=$SP timeout 900 $T python3 benchmarks/serve_load.py $W/e32i --backend inductor --device cuda --gpus 0 --gpus 0,1 \
  --steps 30 --size 512 --concurrency 1,8,16 --requests-per-client 6 --time-limit-s 800 --out $R \
  --serve-arg=--step-graph; echo "serve rc=$?"
kill $DM
touch /tmp/res/S.done
