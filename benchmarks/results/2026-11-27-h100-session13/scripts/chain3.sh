#!/usr/bin/env bash
# lease 2: env, the Softmax-form probe, the GPU tests, then the whole suite (one thread per worker)
cd /tmp/sdxrepo
export PYTHONPATH=/tmp/site:$PWD
{ cat .dev/s14/COMMIT; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import torch, diffusers, transformers, onnxruntime, polygraphy, modelopt, peft; from importlib.metadata import version; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version(), 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers(), 'polygraphy', polygraphy.__version__, 'modelopt', modelopt.__version__, 'click', version('click'), 'peft', peft.__version__, 'ftfy', version('ftfy'))"
  python3 -m pytest --version; } > /tmp/res/env.txt 2>&1
echo "probe $(date +%T)"; timeout 300 python3 .dev/s14/softmax_probe.py > /tmp/res/softmax_probe.txt 2>&1
echo "gputest start $(date +%T)"
python3 -m pytest -v -m "gpu or trt" -rs -p no:cacheprovider --durations=10 > /tmp/res/gputests.txt 2>&1; echo "rc=$?" >> /tmp/res/gputests.txt
echo "gputest done $(date +%T): $(tail -n 2 /tmp/res/gputests.txt | head -1)"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
echo "full suite start $(date +%T)"
timeout 1500 python3 -m pytest -v -n 14 -p no:cacheprovider -rs --durations=15 --tb=short > /tmp/res/fullsuite.txt 2>&1; echo "rc=$?" >> /tmp/res/fullsuite.txt
echo "full suite done $(date +%T): $(tail -n 2 /tmp/res/fullsuite.txt | head -1)"
