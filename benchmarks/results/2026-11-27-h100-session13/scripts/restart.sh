#!/usr/bin/env bash
pgid=$(ps -eo pgid,args | awk '/[c]hain\.sh/ {print $1; exit}')
[ -n "$pgid" ] && kill -- -"$pgid"
tpid=$(ps -eo pid,args | awk '/^ *[0-9]+ [t]imeout 900/ {print $1; exit}')
[ -n "$tpid" ] && kill -TERM "$tpid"; sleep 8
echo "left: $(ps -eo pid,args | grep -c '[p]ytest')"
cp /tmp/res/fullsuite.txt /tmp/res/fullsuite-killed.txt
cp .dev/s14/chain2.sh /tmp/sdxrepo/.dev/s14/chain2.sh
cd /tmp/sdxrepo && setsid nohup bash .dev/s14/chain2.sh > /tmp/res/chain2.log 2>&1 < /dev/null &
sleep 3; cat /tmp/res/chain2.log
