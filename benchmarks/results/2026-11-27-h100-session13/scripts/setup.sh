#!/usr/bin/env bash
# last wheel part's call: install, copy the repo, start the test chain in its own session
bash .dev/wheels/part6/unstage.sh 2>&1 | tail -2
nvidia-smi -L; nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1; nproc; free -g | head -2
rm -rf /tmp/sdxrepo && mkdir /tmp/sdxrepo && tar --exclude=./.dev/wheels -cf - . | tar -xf - -C /tmp/sdxrepo
mkdir -p /tmp/res; cd /tmp/sdxrepo
setsid nohup bash .dev/s14/chain.sh > /tmp/res/chain.log 2>&1 < /dev/null &
sleep 45; tail -n 5 /tmp/res/chain.log
