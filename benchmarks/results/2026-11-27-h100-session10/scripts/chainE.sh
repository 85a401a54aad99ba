#!/usr/bin/env bash
# cores 24-31, GPU 0: FP32 export of the text encoders and VAE + the Inductor engine (sdxl-e32i), then FP32 eager
# (the PSNR reference), torch.compile + CUDA graph and the Inductor AOT engine + step graph on the same GPU; the
# ORT GPU wheel is on the path (the Inductor package runs its text encoders on ONNX Runtime: session 9's row
# failed without it).
source .dev/s12/common.sh
R=/tmp/res/sdxl; mkdir -p $R
export CUDA_VISIBLE_DEVICES=0
T="taskset -c 24-31"; [ -n "$DRY" ] && T=""  # DRY: a dry run on a machine without these cores
waitfor $W/preset.ok 120; waitfor /tmp/site-ort/.ok
export PYTHONPATH=$ORTP
step sdxl-prepare-i; $T $PY benchmarks/gpu_bench.py $GB sdxl-prepare --work $W --out $R --sdxl-export sdxl-e32i; echo "prepare rc=$?"
step sdxl-fp32; timeout 300 $T $PY benchmarks/gpu_bench.py $GB sdxl --work $W --out $R/fp32 --sdxl-export sdxl-e32i --only "FP32 eager"; echo "fp32 rc=$?"
step sdxl-rows; timeout 900 $T $PY benchmarks/gpu_bench.py $GB sdxl --work $W --out $R --sdxl-export sdxl-e32i --only "torch.compile,Inductor"; echo "sdxl rc=$?"
step validate-inductor; timeout 400 $T $PY -m sdexport validate $W/sdxl-e32i --backend inductor --device cuda > $R/validate-inductor-cuda.txt 2>&1; echo "validate rc=$?"; tail -3 $R/validate-inductor-cuda.txt
step fp8mm; timeout 600 $T $PY benchmarks/speed_probe.py --model sdxl --variants compile+qkv+cl,compile+qkv+cl+fp8mm --out $R/fp8mm; echo "fp8mm rc=$?"
touch /tmp/res/E.done
