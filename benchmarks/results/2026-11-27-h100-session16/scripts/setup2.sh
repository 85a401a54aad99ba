#!/usr/bin/env bash
# install part2, unpack the CuTe DSL wheels over /tmp/site (pip --target replaces shared dirs), start chain2 + chain3
bash .dev/wheels/part2/unstage.sh 2>&1 | tail -1
here=$PWD
# every nvidia-cutlass-dsl-libs-* wheel staged (the README's list has libs-core among them)
(cd /root/wheels && for w in nvidia_cutlass_dsl_libs_*-*.whl; do python3 -m zipfile -e $w /tmp/site; done)
# as run in session 16, libs-core was not staged yet and came in the scripts' folder:
[ -f .dev/s16/w/nvidia_cutlass_dsl_libs_core-4.8.1-py3-none-any.whl ] && python3 -m zipfile -e .dev/s16/w/nvidia_cutlass_dsl_libs_core-4.8.1-py3-none-any.whl /tmp/site
nvidia-smi -L; nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1
rm -rf /tmp/sdxrepo && mkdir /tmp/sdxrepo && tar --exclude=./.dev/wheels --exclude=./.dev/tfw --exclude=./.dev/wheels-full --exclude=./.dev/s16/w -cf - . | tar -xf - -C /tmp/sdxrepo
mkdir -p /tmp/res; cd /tmp/sdxrepo
PYTHONPATH=/tmp/site:/tmp/site/nvidia_cutlass_dsl/dsl_packages python3 -c "import cutlass.cute, flash_attn.cute; print('cute ok')" 2>&1 | tail -2
setsid nohup bash .dev/s16/chain2.sh > /tmp/res/chain2.log 2>&1 < /dev/null &
sleep 2
setsid nohup bash .dev/s16/chain3.sh > /tmp/res/chain3.log 2>&1 < /dev/null &
sleep 40; cat /tmp/res/chain2.log; tail -3 /tmp/res/attention-sdxl.log
