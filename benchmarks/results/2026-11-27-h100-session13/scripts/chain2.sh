#!/usr/bin/env bash
# the whole suite on this GPU host again, one torch/OpenMP thread per worker, test names as they finish
cd /tmp/sdxrepo
export PYTHONPATH=/tmp/site:$PWD OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
echo "full suite (OMP_NUM_THREADS=1, -n 14) start $(date +%T)"
timeout 1500 python3 -m pytest -v -n 14 -p no:cacheprovider -rs --durations=15 --tb=short > /tmp/res/fullsuite2.txt 2>&1; echo "rc=$?" >> /tmp/res/fullsuite2.txt
echo "full suite done $(date +%T): $(tail -n 2 /tmp/res/fullsuite2.txt | head -1)"
