#!/usr/bin/env bash
# last call of lease 2: install the staged wheels + the pinned transformers/peft/click/ftfy, start the chain
bash .dev/wheels/part6/unstage.sh 2>&1 | tail -1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/tfw/*.whl && echo "pins installed: $(ls .dev/tfw)"
nvidia-smi -L; nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1
rm -rf /tmp/sdxrepo && mkdir /tmp/sdxrepo && tar --exclude=./.dev/wheels --exclude=./.dev/tfw -cf - . | tar -xf - -C /tmp/sdxrepo
mkdir -p /tmp/res; cd /tmp/sdxrepo
setsid nohup bash .dev/s14/chain3.sh > /tmp/res/chain3.log 2>&1 < /dev/null &
sleep 40; cat /tmp/res/chain3.log; cat /tmp/res/env.txt
