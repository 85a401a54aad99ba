#!/usr/bin/env bash
sleep ${1:-60}
date +%T; tail -n 6 /tmp/res/chain.log; nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader; df -h /tmp | tail -1
mkdir -p $OUT; tar -C /tmp -czf $OUT/res.tgz --exclude='*.onnx' --exclude='*.pt2' --exclude='*.data' res
