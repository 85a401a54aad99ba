#!/usr/bin/env bash
# cores 10-15, GPU 0: its own FP32 export of the text encoders and VAE (sdxl-e32i) and the Inductor engine, then
# the rows FP32 eager (the PSNR reference), FP16 eager, eager + CUDA graph, torch.compile + CUDA graph (the peer),
# Inductor AOT + step graph, and the VAE at 1024 px.
source .dev/s11/common.sh
R=/tmp/res/sdxl; mkdir -p $R
export PYTHONPATH=/tmp/site:$PWD CUDA_VISIBLE_DEVICES=0
T="taskset -c 10-15"
waitfor $W/preset.ok 120
step sdxl-prepare-i; $T $PY benchmarks/gpu_bench.py $GB sdxl-prepare --work $W --out $R --sdxl-export sdxl-e32i; echo "prepare rc=$?"
step sdxl-fp32; timeout 300 $T $PY benchmarks/gpu_bench.py $GB sdxl --work $W --out $R/fp32 --sdxl-export sdxl-e32i --only "FP32 eager"; echo "fp32 rc=$?"
touch /tmp/res/E.fp32
step sdxl-rows; timeout 1200 $T $PY benchmarks/gpu_bench.py $GB sdxl --work $W --out $R --sdxl-export sdxl-e32i --only "FP16 eager,torch.compile,Inductor,vae"; echo "sdxl rc=$?"
step validate-inductor; timeout 400 $T $PY -m sdexport validate $W/sdxl-e32i --backend inductor --device cuda > $R/validate-inductor-cuda.txt 2>&1; echo "validate rc=$?"; tail -3 $R/validate-inductor-cuda.txt
touch /tmp/res/E.done
