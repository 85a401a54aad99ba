# sourced by the chains
cd /tmp/sdxrepo
export PYTHONUNBUFFERED=1 SDEXPORT_COMMIT=$(cat .dev/s13/COMMIT)
W=/tmp/sdx; mkdir -p $W /tmp/res
step() { echo "=== $1 $(date +%T)"; }
waitfor() { for i in $(seq ${2:-240}); do [ -e "$1" ] && return 0; sleep 5; done; echo "gave up waiting for $1"; return 1; }
ORTP=/tmp/site-ort:/tmp/site:/tmp/sdxrepo
TRTP=/tmp/site-trt:/tmp/site:/tmp/sdxrepo
SP=/tmp/site-np1:/tmp/site-serve:/tmp/site-ort:/tmp/site:/tmp/sdxrepo
command -v taskset >/dev/null || taskset() { shift 2; "$@"; }
timed() { local t0=$SECONDS; "$@"; local rc=$?; echo "timed: $((SECONDS - t0)) s rc=$rc: $*"; return $rc; }
# a dry run on a CPU machine (no GPU; checks the scripts, not the numbers):
#   DRY=1 PY=/work/main/.venv/bin/python PRESET=sdxl-tiny GB="--quick --device cpu" bash .dev/s13/chainE.sh
PY=${PY:-python3}; PRESET=${PRESET:-sdxl-random}; GB=${GB:-}
