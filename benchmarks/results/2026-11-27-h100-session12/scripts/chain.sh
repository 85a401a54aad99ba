#!/usr/bin/env bash
# 1x H100: issue 14's SDXL throughput where one batch size is served: static Inductor packages per batch size
# vs torch.compile compiled first at that size (benchmarks/gpu_bench.py sdxl-static), one process per size,
# then `sdexport validate --backend inductor --device cuda` on the packages just measured.
cd /tmp/sdxrepo
export PYTHONUNBUFFERED=1 SDEXPORT_COMMIT=$(cat .dev/s14/COMMIT) PYTHONPATH=/tmp/site:/tmp/sdxrepo CUDA_VISIBLE_DEVICES=0
R=/tmp/res; mkdir -p $R
for b in $BATCHES; do
  echo "=== batch $b $(date +%T)"
  timeout 1500 python3 benchmarks/gpu_bench.py sdxl-static --batches $b --work /tmp/sdx --out $R/b$b; echo "static b$b rc=$?"
  echo "=== validate b$b $(date +%T)"
  timeout 600 python3 -m sdexport validate /tmp/sdx/sdxl-e32b --backend inductor --device cuda > $R/b$b/validate-inductor-cuda.txt 2>&1; echo "validate b$b rc=$?"
  tail -n 15 $R/b$b/validate-inductor-cuda.txt
  df -h /tmp | tail -1
done
touch $R/S.done
