#!/usr/bin/env bash
# last staging call: install part6 + the pinned transformers/peft/click/ftfy, start the chain in the background
bash .dev/wheels/part6/unstage.sh 2>&1 | tail -1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .dev/tfw/*.whl && echo "pins installed: $(ls .dev/tfw | tr '\n' ' ')"
nvidia-smi -L; nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1
rm -rf /tmp/sdxrepo && mkdir /tmp/sdxrepo && tar --exclude=./.dev/wheels --exclude=./.dev/tfw -cf - . | tar -xf - -C /tmp/sdxrepo
mkdir -p /tmp/res; cd /tmp/sdxrepo
setsid nohup bash .dev/s15/chain.sh > /tmp/res/chain.log 2>&1 < /dev/null &
sleep 30; cat /tmp/res/chain.log; cat /tmp/res/env.txt
