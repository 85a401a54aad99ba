#!/usr/bin/env bash
# cores 24-31 (GPU 0 visible: TensorRT-RTX 1.7 builds refittable plans only where CUDA runs): sd15-random FP16
# UNet, TensorRT-RTX plan for sm 8.0 without and with --refittable (issue 11: size before and after).
source .dev/s6/common.sh
R=/tmp/res/trt-sd15; mkdir -p $R
export CUDA_VISIBLE_DEVICES=0
T="taskset -c 24-31"
waitfor /tmp/res/sd15.preset.done; waitfor /tmp/site-trt/.ok
export PYTHONPATH=$TRTP
python3 -c "import tensorrt_rtx as t; print('tensorrt_rtx', t.__version__)"
step export-fp16; timed $T python3 -m sdexport export $W/sd15 -o $W/e16 --dtype fp16 --components unet > $R/export-e16.txt 2>&1; echo "rc=$?"
for flag in "" "--refittable"; do
  step "build $flag"; timed $T python3 -m sdexport build $W/e16 --trt rtx --compute-capability 8.0 --components unet $flag > $R/build${flag}.txt 2>&1; echo "rc=$?"
  ls -l $W/e16/engines/ | tee -a $R/engines-ls.txt
done
python3 -c "import json; m=json.load(open('$W/e16/manifest.json')); print(json.dumps(m.get('engines'), indent=1))" > $R/manifest-engines.json
touch /tmp/res/C1.done
