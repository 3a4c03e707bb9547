#!/usr/bin/env bash
# The test command: unit + single-Ray-session tests, and beside them, in a second pytest process, the tests
# that start their own Ray clusters (a running cluster would capture a plain ray.init) plus the tests marked
# `beside` (synray commands typed in subprocesses, each a private local Ray: the quickstart and the asset
# rebuilds; the study's command runs in the main process, which balances the two). The cluster tests spend
# most of their time waiting (heads starting, heartbeats, restarts), so the two processes run at once; the
# second one's report is printed after the main one.
set -uo pipefail
cd "$(dirname "$0")/.."
export SYNRAY_QUIET=1 RAY_USAGE_STATS_ENABLED=0
# one intra-op thread per process: the two pytest processes and their Ray workers already keep both cores busy, and
# torch's OpenMP threads busy-wait; two 2-thread processes on 2 cores ran 1.7x slower than two 1-thread ones
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
own_log=$(mktemp)
python -m pytest -q -p no:cacheprovider -m "cluster or beside" "$@" >"$own_log" 2>&1 &
own_pid=$!
trap 'kill "$own_pid" 2>/dev/null; rm -f "$own_log"' EXIT
python -m pytest -q -p no:cacheprovider -m "not cluster and not beside" "$@"
main=$?
wait "$own_pid"
own=$?
echo "--- tests run beside the main ones (clusters, quickstart and asset-rebuild commands) ---"
cat "$own_log"
[ "$own" -eq 5 ] && own=0   # none of them selected is not a failure
echo "tests: main=$main own-ray=$own"
[ "$main" -eq 0 ] && [ "$own" -eq 0 ]
