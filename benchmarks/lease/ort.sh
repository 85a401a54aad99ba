#!/usr/bin/env bash
# a call carrying wheel parts: copy them, install what is complete
mkdir -p /root/wheels; for d in "$@"; do cp $d/* /root/wheels/ 2>/dev/null; done; rm -f /root/wheels/unstage.sh
cd /root/wheels
o=onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
if [ ! -f /tmp/site-ort/.ok ] && [ "$(ls $o.chunk.* 2>/dev/null | wc -l)" = "$(cat $o.nchunks)" ]; then
  cat $(ls $o.chunk.* | sort) > $o && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-ort $o && touch /tmp/site-ort/.ok && echo ORT installed
fi
t=tensorrt_rtx_cu13_libs-1.7.1.116-py3-none-manylinux_2_28_x86_64.whl
if [ ! -f /tmp/site-trt/.ok ] && [ "$(ls $t.chunk.* 2>/dev/null | wc -l)" = "$(cat $t.nchunks)" ]; then
  cat $(ls $t.chunk.* | sort) > $t && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-trt $t /root/wheels/tensorrt_rtx_cu13_bindings*.whl \
    && cp -r /tmp/sdxrepo/.dev/s5/trtpkg/tensorrt_rtx /tmp/site-trt/ && touch /tmp/site-trt/.ok && echo TRT installed
fi
p=$(ls nvidia_pytriton-*.whl 2>/dev/null | head -1)
if [ -n "$p" ] && [ ! -f /tmp/site-serve/.ok ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-serve $p && touch /tmp/site-serve/.ok && echo pytriton installed
fi
s=$(ls scipy-*.whl 2>/dev/null | head -1)
if [ -n "$s" ] && [ ! -f /tmp/site-np1/.ok ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-np1 $s numpy-1.26.4*.whl && touch /tmp/site-np1/.ok && echo np1 installed
fi
if [ -f /tmp/site-serve/.ok ] && [ -f /tmp/site-np1/.ok ] && [ -f /tmp/site-ort/.ok ] && [ ! -f /tmp/res/serve-imports.ok ]; then
  PYTHONPATH=/tmp/site-np1:/tmp/site-serve:/tmp/site-ort:/tmp/site:/tmp/sdxrepo python3 -c "import numpy, scipy, scipy.stats, torch, transformers, diffusers, onnxruntime, pytriton, zmq; import sdexport.serve; print('serve imports ok, numpy', numpy.__version__)" > /tmp/res/serve-imports.txt 2>&1 && touch /tmp/res/serve-imports.ok; tail -2 /tmp/res/serve-imports.txt
fi
ls /root/wheels | wc -l; tail -n 4 /tmp/res/chain*.log
