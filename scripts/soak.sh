#!/usr/bin/env bash
# The hardening suites at soak size: 10,000 fuzzed HTTP requests, a 10,000-request disconnect
# storm and 100,000 new sessions, each printing its counts. Usage: scripts/soak.sh
# (FUZZ_CASES, STORM_REQUESTS and FLOOD_REQUESTS override the sizes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/fetch-model.sh >/dev/null
export FUZZ_CASES="${FUZZ_CASES:-10000}" STORM_REQUESTS="${STORM_REQUESTS:-10000}" FLOOD_REQUESTS="${FLOOD_REQUESTS:-100000}"
run() {
  cargo test --release --test "$1" "$2" -- --nocapture --test-threads 1 2>&1 \
    | grep -E "fuzzed requests|^admitted|RSS|new sessions|200 at once|1000 idle|^test |test result" \
    | grep -v "finished outcome"
}
run fuzz_http fuzzed
run storm storm_on_the_mock
run storm two_hundred
run security flood
run connections 1000_idle
