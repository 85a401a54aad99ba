#!/usr/bin/env bash
# second staging call: install part2 (all wheels), copy the repo, start the chain in the background
bash .dev/wheels/part2/unstage.sh 2>&1 | tail -1
nvidia-smi -L; nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1
rm -rf /tmp/sdxrepo && mkdir /tmp/sdxrepo && tar --exclude=./.dev/wheels --exclude=./.dev/tfw --exclude=./.dev/wheels-full -cf - . | tar -xf - -C /tmp/sdxrepo
mkdir -p /tmp/res; cd /tmp/sdxrepo
setsid nohup bash .dev/s16/chain.sh > /tmp/res/chain.log 2>&1 < /dev/null &
sleep 45; cat /tmp/res/chain.log; cat /tmp/res/env.txt
