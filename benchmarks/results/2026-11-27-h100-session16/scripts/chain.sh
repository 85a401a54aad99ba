#!/usr/bin/env bash
# session 16 probes: attention backends incl. FA4, GEGLU epilogue fusion, then the SDXL UNet with FA4
export PYTHONPATH=/tmp/site:$PWD SDEXPORT_COMMIT=$(cat .dev/s16/COMMIT)
R=/tmp/res
{ nvidia-smi; python3 -c "import torch,sys; print(sys.version); print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version())";
  python3 -m pip list --path /tmp/site 2>/dev/null; } > $R/env.txt 2>&1
stage() { echo "=== $(date +%T) $*"; }
stage attention sdxl; python3 benchmarks/attention_probe.py --model sdxl --out $R > $R/attention-sdxl.log 2>&1; tail -2 $R/attention-sdxl.log
stage ffn sdxl; python3 benchmarks/ffn_probe.py --model sdxl --out $R > $R/ffn-sdxl.log 2>&1; tail -2 $R/ffn-sdxl.log
stage attention sd15; python3 benchmarks/attention_probe.py --model sd15 --out $R > $R/attention-sd15.log 2>&1; tail -2 $R/attention-sd15.log
stage ffn sd15; python3 benchmarks/ffn_probe.py --model sd15 --out $R > $R/ffn-sd15.log 2>&1; tail -2 $R/ffn-sd15.log
stage speed sdxl; python3 benchmarks/speed_probe.py --model sdxl --variants compile+graph,compile+qkv+cl,compile+qkv+cl+fa4 --out $R/speed > $R/speed-sdxl.log 2>&1; tail -2 $R/speed-sdxl.log
stage done
