#!/usr/bin/env bash
# pip --target replaced nvidia_cutlass_dsl/ wheel by wheel; unpack the two library wheels over /tmp/site instead
here=$PWD
cd /root/wheels && for w in nvidia_cutlass_dsl_libs_base-*.whl nvidia_cutlass_dsl_libs_cu13-*.whl; do python3 -m zipfile -e $w /tmp/site; done
ls /tmp/site/nvidia_cutlass_dsl/dsl_packages/cutlass | head -30
cd /tmp/sdxrepo && PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages python3 -c "import cutlass.cute, flash_attn.cute; print('cute ok')" 2>&1 | tail -3
cp $here/.dev/s16/chain3.sh .dev/s16/
setsid nohup bash .dev/s16/chain3.sh > /tmp/res/chain3.log 2>&1 < /dev/null &
tail -3 /tmp/res/chain2.log /tmp/res/ffn-sdxl.log
