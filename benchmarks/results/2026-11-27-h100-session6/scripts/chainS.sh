#!/usr/bin/env bash
# 2x H100: sd15-random FP32 export (text encoder, VAE) + Inductor UNet (1-8 images), then serve_load:
# bench b1/b8 baseline, one server on GPU 0, one on GPUs 0,1 (one instance each), concurrency 1, 8, 16.
source .dev/s8/common.sh
R=/tmp/res/serve; mkdir -p $R
export PYTHONPATH=/tmp/site:$PWD
step preset; CUDA_VISIBLE_DEVICES=0 python3 -m sdexport preset sd15-random -o $W/sd15 || exit 1
step export; CUDA_VISIBLE_DEVICES=0 timed python3 -m sdexport export $W/sd15 -o $W/e32i --components text_encoder,vae_decoder --max-batch 8 > $R/export-e32i.txt 2>&1
step inductor; CUDA_VISIBLE_DEVICES=0 timed python3 -m sdexport build $W/e32i --backend inductor --static 512x512 --max-batch 8 --components unet --device cuda > $R/build-inductor.txt 2>&1
step wait-ort; waitfor /tmp/site-ort/.ok
step ortprep; CUDA_VISIBLE_DEVICES=0 PYTHONPATH=$ORTP timed python3 -m sdexport build $W/e32i --backend ort --components vae_decoder > $R/build-ort-e32i.txt 2>&1
step serve; waitfor /tmp/site-serve/.ok; waitfor /tmp/res/serve-imports.ok
nvidia-smi dmon -s u -d 1 > $R/dmon.txt 2>&1 &
DM=$!
PYTHONPATH=$SP timeout 900 python3 benchmarks/serve_load.py $W/e32i --backend inductor --device cuda --gpus 0 --gpus 0,1 \
  --steps 30 --size 512 --concurrency 8,16 --requests-per-client 6 --time-limit-s 800 --out $R \
  --serve-arg=--step-graph; echo "serve rc=$?"
kill $DM
touch /tmp/res/S.done
