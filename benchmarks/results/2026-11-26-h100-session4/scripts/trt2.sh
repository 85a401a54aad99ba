#!/usr/bin/env bash
# calls 2 and 3: TensorRT-RTX libs chunks; when both are there, install and run the first-run check
mkdir -p /root/wheels; for d in "$@"; do cp $d/*.chunk.* /root/wheels/; done
cd /root/wheels; t=tensorrt_rtx_cu13_libs-1.7.1.116-py3-none-manylinux_2_28_x86_64.whl
[ "$(ls $t.chunk.* | wc -l)" = "$(cat $t.nchunks)" ] || { echo "have $(ls $t.chunk.* | wc -l) chunks"; exit 0; }
cat $(ls $t.chunk.* | sort) > $t && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $t && echo TRT-RTX installed
cd - >/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p $OUT
python3 -m sdexport env > $OUT/sdexport-env.txt 2>&1; tail -25 $OUT/sdexport-env.txt
timeout 420 python3 -m pytest -q -rs -m trt -p no:cacheprovider tests/test_trt_check.py 2>&1 | tee $OUT/trt-check-hopper.txt | tail -40
