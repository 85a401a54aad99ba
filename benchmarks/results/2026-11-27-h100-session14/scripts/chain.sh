#!/usr/bin/env bash
# session 14: SD 1.5 headline re-measured at today's commit: prepare (FP32 export + Inductor packages), fourway at
# 30 steps (eager, Inductor, torch.compile rows), the dynamic-batch throughput sweep, then the ORT rows
cd /tmp/sdxrepo
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 SDEXPORT_COMMIT=$(cat .dev/s15/COMMIT)
{ cat .dev/s15/COMMIT; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, diffusers, transformers, onnxruntime; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"; } > /tmp/res/env.txt 2>&1
R=/tmp/res/sd15; mkdir -p $R
st() { echo "=== $* start $(date +%T)"; python3 benchmarks/gpu_bench.py "$@" --work /tmp/sdx --out $R > $R/$1.log 2>&1; echo "=== $1 rc=$? $(date +%T)"; }
st prepare --skip-fp16 --skip-ort
st fourway --steps 30 --only "eager,Inductor,torch.compile"
st sweep --sizes "" --batches 1,2,4,8
st ortprep
mv $R/fourway.json $R/fourway-main.json
st fourway --steps 30 --only "FP32 eager (TF32 off),ORT CUDA, fused static,Inductor AOT (fused QKV, channels-last) + step graph,torch.compile + step graph"
echo "chain done $(date +%T)"
