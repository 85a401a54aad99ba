sleep ${1:-60}; date +%T; cat /tmp/gres/chain.log 2>/dev/null; tail -n 3 /tmp/gres/gputests.txt; tail -n 2 /tmp/gres/fullsuite.txt 2>/dev/null
mkdir -p $OUT; tar -C /tmp -czf $OUT/gres.tgz gres
