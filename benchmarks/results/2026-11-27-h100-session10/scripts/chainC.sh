#!/usr/bin/env bash
# cores 0-23, GPUs hidden (TensorRT-RTX's builder would use a GPU chain E times): the sdxl-random preset, its FP16
# export (session 9's was killed for memory in AutoCast's reference run; now sdexport's own run, ~64 GiB peak)
# and a static 1024x1024 TensorRT-RTX build of each component: time, size (issue 10 item 6).
source .dev/s12/common.sh
R=/tmp/res/sdxl-trt; mkdir -p $R
export CUDA_VISIBLE_DEVICES=
export PYTHONPATH=/tmp/site:$PWD
T="taskset -c 0-23"; [ -n "$DRY" ] && T=""  # DRY: a dry run on a machine without these cores
step preset; timed $T $PY -m sdexport preset $PRESET -o $W/sdxl-model > $R/preset.txt 2>&1 && touch $W/preset.ok
waitfor /tmp/site-trt/.ok
export PYTHONPATH=$TRTP
$PY -c "import tensorrt_rtx as t; print('tensorrt_rtx', t.__version__)"
TV=""; [ -x /usr/bin/time ] && TV="/usr/bin/time -v"
step sdxl-trt; $TV timeout 1700 $T $PY benchmarks/gpu_bench.py $GB sdxl-trt --work $W --out $R 2> $R/time-v.txt; echo "sdxl-trt rc=$?"; grep -E "Maximum resident|Elapsed" $R/time-v.txt
ls -l $W/sdxl-e16 $W/sdxl-e16/* > $R/export-ls.txt 2>&1; df -h /tmp | tail -1
touch /tmp/res/C.done
