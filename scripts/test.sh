#!/usr/bin/env bash
# The whole test suite, as CI runs it: fetches the default model if missing, then builds and
# runs every test in release mode (the golden tests run a real model; debug would be slow).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/fetch-model.sh >/dev/null
cargo test --release --all-targets "$@"
