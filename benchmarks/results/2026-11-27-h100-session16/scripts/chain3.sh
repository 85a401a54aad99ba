#!/usr/bin/env bash
# after chain2: the attention probes again with FA4 importable (into /tmp/res/fa4)
while pgrep -f "s16/chain2\.sh" >/dev/null; do sleep 5; done
export PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages:$PWD SDEXPORT_COMMIT=$(cat .dev/s16/COMMIT)
R=/tmp/res/fa4; mkdir -p $R
echo "=== $(date +%T) attention sdxl"; python3 benchmarks/attention_probe.py --model sdxl --out $R > $R/attention-sdxl.log 2>&1; tail -2 $R/attention-sdxl.log
echo "=== $(date +%T) attention sd15"; python3 benchmarks/attention_probe.py --model sd15 --out $R > $R/attention-sd15.log 2>&1; tail -2 $R/attention-sd15.log
echo "=== $(date +%T) done"
