#!/usr/bin/env bash
# GPU test suite at HEAD: install part6 + pins, copy the repo, run the GPU-marked tests then the whole suite
bash .dev/wheels/part6/unstage.sh 2>&1 | tail -1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/tfw/*.whl && echo "pins installed"
rm -rf /tmp/gt && mkdir -p /tmp/gt /tmp/gres && tar --exclude=./.dev -cf - . | tar -xf - -C /tmp/gt
cd /tmp/gt && git rev-parse HEAD > /tmp/gres/COMMIT 2>/dev/null || cp /tmp/gt/.git/HEAD /tmp/gres/
cat > /tmp/gt/run.sh <<'EOS'
export PYTHONPATH=/tmp/site:$PWD OMP_NUM_THREADS=1
{ nvidia-smi -L; python3 -m pip list --path /tmp/site 2>/dev/null; } > /tmp/gres/env.txt
python3 -m pytest -v -m "gpu or trt" -rs -p no:cacheprovider > /tmp/gres/gputests.txt 2>&1
echo "gpu tests rc=$?" >> /tmp/gres/chain.log
python3 -m pytest -q -n 14 -p no:cacheprovider -rs --tb=short > /tmp/gres/fullsuite.txt 2>&1
echo "full suite rc=$?" >> /tmp/gres/chain.log
EOS
setsid nohup bash /tmp/gt/run.sh > /tmp/gres/run.log 2>&1 < /dev/null &
sleep 20; tail -3 /tmp/gres/gputests.txt
