#!/usr/bin/env bash
# 1) the GPU tests (make gputest + the TensorRT check), 2) the whole suite on this GPU host
cd /tmp/sdxrepo
export PYTHONPATH=/tmp/site:$PWD
{ cat .dev/s14/COMMIT; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, diffusers, transformers, onnxruntime, polygraphy, modelopt, click, peft; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers(), 'polygraphy', polygraphy.__version__, 'modelopt', modelopt.__version__, 'click', click.__version__, 'peft', peft.__version__)"
  python3 -m pytest --version; } > /tmp/res/env.txt 2>&1
echo "gputest start $(date +%T)"
python3 -m pytest -q -m "gpu or trt" -rs -p no:cacheprovider --durations=10 > /tmp/res/gputests.txt 2>&1; echo "rc=$?" >> /tmp/res/gputests.txt
echo "gputest done $(date +%T): $(tail -n 2 /tmp/res/gputests.txt | head -1)"
echo "full suite start $(date +%T)"
timeout 900 python3 -m pytest -q -n 12 -p no:cacheprovider -rs --durations=15 > /tmp/res/fullsuite.txt 2>&1; echo "rc=$?" >> /tmp/res/fullsuite.txt
echo "full suite done $(date +%T): $(tail -n 2 /tmp/res/fullsuite.txt | head -1)"
