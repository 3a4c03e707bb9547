#!/usr/bin/env bash
# The test command: unit + single-Ray-session tests, then the tests that start their own Ray
# clusters, each in its own pytest process (a running cluster would capture a plain ray.init).
set -uo pipefail
cd "$(dirname "$0")/.."
export SYNRAY_QUIET=1 RAY_USAGE_STATS_ENABLED=0
python -m pytest -q -p no:cacheprovider -m "not cluster" "$@"
main=$?
python -m pytest -q -p no:cacheprovider -m cluster "$@"
cluster=$?
[ "$cluster" -eq 5 ] && cluster=0   # no cluster tests selected is not a failure
echo "tests: main=$main cluster=$cluster"
[ "$main" -eq 0 ] && [ "$cluster" -eq 0 ]
