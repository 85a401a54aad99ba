#!/usr/bin/env bash
# stop chain.sh (its process group), start chain2.sh
for p in $(pgrep -f "s16/chain\.sh"); do kill -- -$(ps -o pgid= $p | tr -d ' ') 2>/dev/null; done
sleep 2; mv /tmp/res /tmp/res-first; mkdir -p /tmp/res
cp -r .dev/s16/chain2.sh /tmp/sdxrepo/.dev/s16/; cd /tmp/sdxrepo
setsid nohup bash .dev/s16/chain2.sh > /tmp/res/chain2.log 2>&1 < /dev/null &
sleep 60; cat /tmp/res/chain2.log; tail -3 /tmp/res/attention-sdxl.log
