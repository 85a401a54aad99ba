#!/usr/bin/env bash
# 1x H100: the sd15-random VAE decoder (plain FP32 export + ort_cuda FP16 variant) and the batch-size switch probe
source /tmp/sdxrepo/.dev/s8/common.sh
R=/tmp/res/probe; mkdir -p $R
export PYTHONPATH=/tmp/site:$PWD
step preset; python3 -m sdexport preset sd15-random -o $W/sd15 > $R/preset.txt 2>&1 || exit 1
step export; timed python3 -m sdexport export $W/sd15 -o $W/ev --components vae_decoder --max-batch 8 > $R/export.txt 2>&1
step wait-ort; waitfor /tmp/site-ort/.ok
export PYTHONPATH=$ORTP
step ortprep; timed python3 -m sdexport build $W/ev --backend ort --components vae_decoder > $R/build-ort.txt 2>&1
step probe; timeout 400 python3 benchmarks/ort_shape_switch_probe.py $W/ev --out $R; echo "probe rc=$?"
touch /tmp/res/P.done
