#!/usr/bin/env bash
# The test command: unit + single-Ray-session tests, and beside them the tests that start their own Ray
# clusters, in a second pytest process (a running cluster would capture a plain ray.init). The cluster tests
# spend most of their time waiting (heads starting, heartbeats, restarts), so the two run at once; the
# cluster tests' report is printed after the main one.
set -uo pipefail
cd "$(dirname "$0")/.."
export SYNRAY_QUIET=1 RAY_USAGE_STATS_ENABLED=0
cluster_log=$(mktemp)
python -m pytest -q -p no:cacheprovider -m cluster "$@" >"$cluster_log" 2>&1 &
cluster_pid=$!
trap 'kill "$cluster_pid" 2>/dev/null; rm -f "$cluster_log"' EXIT
python -m pytest -q -p no:cacheprovider -m "not cluster" "$@"
main=$?
wait "$cluster_pid"
cluster=$?
echo "--- tests that start their own Ray clusters ---"
cat "$cluster_log"
[ "$cluster" -eq 5 ] && cluster=0   # no cluster tests selected is not a failure
echo "tests: main=$main cluster=$cluster"
[ "$main" -eq 0 ] && [ "$cluster" -eq 0 ]
