#!/usr/bin/env bash
# GPU 0, cores 0-11: sd15-random exports + Inductor dynamic-batch UNet; serve on 1 GPU (issue 12), LoRA switch
# times (issue 11), validate --backend inductor --device cuda (issue 14); then serve on 1 vs 2 GPUs.
source .dev/s6/common.sh
R=/tmp/res/sd15; mkdir -p $R
export CUDA_VISIBLE_DEVICES=0 PYTHONPATH=/tmp/site:$PWD
T="taskset -c 0-11"
step preset; $T python3 -m sdexport preset sd15-random -o $W/sd15 || exit 1
touch /tmp/res/sd15.preset.done
step exports
$T python3 -m sdexport export $W/sd15 -o $W/e32 --components text_encoder,unet,vae_decoder --max-batch 8 > $R/export-e32.txt 2>&1 &
$T python3 -m sdexport export $W/sd15 -o $W/e32i --components text_encoder,vae_decoder --max-batch 8 > $R/export-e32i.txt 2>&1; echo "e32i rc=$?"
step inductor
timed $T python3 -m sdexport build $W/e32i --backend inductor --static 512x512 --max-batch 8 --components unet --device cuda > $R/build-inductor.txt 2>&1; echo "inductor rc=$?"
wait; echo "e32 export done $(date +%T)"
step wait-ort; waitfor /tmp/site-ort/.ok
export PYTHONPATH=$ORTP
step ortprep; $T python3 -m sdexport build $W/e32i --backend ort --components vae_decoder > $R/build-ort-e32i.txt 2>&1; echo "ortprep rc=$?"
step serve-1gpu; waitfor /tmp/site-serve/.ok; waitfor /tmp/site-np1/.ok
PYTHONPATH=$SP timeout 560 $T python3 benchmarks/serve_load.py $W/e32i --backend inductor --device cuda --gpus 0 --steps 30 --size 512 \
  --concurrency 1,2,4,8,16 --time-limit-s 420 --out $R/serve1 --serve-arg=--step-graph; echo "serve1 rc=$?"
touch /tmp/res/A.serve1.done
step lora; timeout 420 $T python3 benchmarks/gpu_bench.py lora --work $W --out $R --no-reexport; echo "lora rc=$?"
step validate; timeout 300 $T python3 -m sdexport validate $W/e32i --backend inductor --device cuda > $R/validate-inductor-cuda.txt 2>&1; echo "validate rc=$?"
touch /tmp/res/A.solo.done
step wait-B; waitfor /tmp/res/B.gpu.done 180
unset CUDA_VISIBLE_DEVICES
step serve-2gpu
PYTHONPATH=$SP timeout 560 taskset -c 0-23 python3 benchmarks/serve_load.py $W/e32i --backend inductor --device cuda --gpus 0 --gpus 0,1 \
  --steps 30 --size 512 --concurrency 8,16 --requests-per-client 6 --no-baseline --time-limit-s 450 --out $R/serve2 \
  --serve-arg=--step-graph; echo "serve2 rc=$?"
touch /tmp/res/A.done
