#!/usr/bin/env bash
# The whole test suite, as CI runs it: fetches the default model if missing, installs what
# the tests need when missing (Debian's chromium, redis-server and nginx; playwright-core from
# npm; a Python venv with the openai SDK and prometheus_client; NVRTC from PyPI), then builds
# and runs every test in release mode (the golden tests run a real model), then the aarch64
# (NEON) tests under qemu with scripts/test-aarch64.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/fetch-model.sh >/dev/null
# Debian packages the tests drive: chromium (web UI), redis-server and nginx (scale-out).
missing=""
for cmd in chromium redis-server nginx; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing="$missing $cmd"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  else
    echo "test.sh: the tests need Debian's$missing: sudo apt-get install$missing" >&2
    exit 1
  fi
fi
[ -d tests/webui/node_modules/playwright-core ] || npm ci --prefix tests/webui --no-audit --no-fund >/dev/null
# The real OpenAI SDK and Prometheus parser, for tests/serve_process.rs.
if [ ! -x .cache/venv/bin/python ] || ! .cache/venv/bin/python -c "import openai, prometheus_client" 2>/dev/null; then
  python3 -m venv .cache/venv
  .cache/venv/bin/pip install --quiet --disable-pip-version-check openai prometheus_client >&2
fi
# NVRTC from PyPI lets the CUDA kernels' compilation be checked on machines without a GPU.
nvrtc=.cache/nvrtc/nvidia/cu13/lib
if [ ! -e "$nvrtc/libnvrtc.so.13" ]; then
  python3 -m pip install --quiet --disable-pip-version-check --target .cache/nvrtc "nvidia-cuda-nvrtc==13.*" >&2 \
    || echo "test.sh: could not install NVRTC; the kernel compilation test will say it skipped" >&2
fi
export LD_LIBRARY_PATH="$PWD/$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cargo test --release --all-targets --no-fail-fast "$@"
# The NEON kernels: cross-compiled for aarch64 and run under qemu (see the script).
scripts/test-aarch64.sh "$@"
