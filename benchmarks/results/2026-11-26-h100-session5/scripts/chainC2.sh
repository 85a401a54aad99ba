#!/usr/bin/env bash
# cores 24-31: sdxl-random FP16 export (AutoCast; the VAE stays FP32: force_upcast), TensorRT-RTX plans for sm 8.0,
# static 1024x1024, one image (issue 10: build time and size); the UNet first.
source .dev/s6/common.sh
R=/tmp/res/trt-sdxl; mkdir -p $R
export CUDA_VISIBLE_DEVICES=1
T="taskset -c 24-31"
waitfor $W/sdxl-model/model_index.json 300; sleep 20; waitfor /tmp/site-trt/.ok
export PYTHONPATH=$TRTP
step export-fp16; timed $T python3 -m sdexport export $W/sdxl-model -o $W/sdxl-e16 --dtype fp16 --max-batch 1 > $R/export-e16.txt 2>&1; echo "rc=$?"
ls -l $W/sdxl-e16 $W/sdxl-e16/* > $R/export-ls.txt 2>&1
for c in unet text_encoder text_encoder_2 vae_decoder; do
  step "build $c"; timed $T python3 -m sdexport build $W/sdxl-e16 --trt rtx --compute-capability 8.0 --static 1024x1024 --components $c > $R/build-$c.txt 2>&1; echo "rc=$?"
  ls -l $W/sdxl-e16/engines/ > $R/engines-ls.txt 2>&1
done
touch /tmp/res/C2.done
