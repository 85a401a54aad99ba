#!/usr/bin/env bash
# ffn sd15 done -> stop chain2 before its SDXL speed stage (FA4 through torch's registry fails: see attention log)
for i in $(seq 1 110); do grep -q "speed sdxl" /tmp/res/chain2.log && break; sleep 2; done
for p in $(pgrep -f "s16/chain2\.sh"); do kill -- -$(ps -o pgid= $p | tr -d ' ') 2>/dev/null; done
sleep 1; pkill -f "benchmarks/speed_probe\.py" ; tail -n 3 /tmp/res/chain2.log; tail -n 2 /tmp/res/ffn-sd15.log; ps aux | grep -c python3
