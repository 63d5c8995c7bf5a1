#!/usr/bin/env bash
# The NEON kernels, checked without an ARM machine: cross-compiles the crate for
# aarch64-unknown-linux-gnu with Debian's rustc-web (whose arm64 standard library Debian
# packages; rustup's target cannot be fetched here) and runs the CPU tests under
# qemu-aarch64 user emulation, where NEON is present: every kernel against its naive twin
# (NEON ones included), the golden logits of the tiny model, generation, the invariants and
# the unit tests; with --full also the SmolLM2 goldens (about 6 more minutes). Speed under
# emulation means nothing; this checks correctness only. scripts/test.sh runs it without
# --full.
# Installs what it needs on Debian (as root): arm64 multiarch, rustc-web, cargo-web,
# libstd-rust-web-dev:arm64, gcc-aarch64-linux-gnu, qemu-user-static, libc6:arm64 (the
# cross toolchain's own libc6-arm64-cross hangs libtest under this qemu; the arm64 one runs).
# Other arguments go to cargo test (e.g. a test name filter).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tests=(--lib --test ops_reference --test golden_tiny --test generate --test proptest_invariants)
if [ "${1:-}" = --full ]; then
  shift
  tests+=(--test golden_smollm2)
fi
need=""
[ -x /usr/bin/rustc ] && /usr/bin/rustc --version | grep -q '^rustc 1\.9' || need="$need rustc-web cargo-web"
[ -d /usr/lib/rustlib/aarch64-unknown-linux-gnu ] || need="$need libstd-rust-web-dev:arm64"
command -v aarch64-linux-gnu-gcc >/dev/null || need="$need gcc-aarch64-linux-gnu"
command -v qemu-aarch64-static >/dev/null || need="$need qemu-user-static"
[ -e /lib/ld-linux-aarch64.so.1 ] || need="$need libc6:arm64 libgcc-s1:arm64"
if [ -n "$need" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "test-aarch64.sh: needs Debian's$need (run as root, or install them)" >&2
    exit 1
  fi
  dpkg --print-foreign-architectures | grep -qx arm64 || dpkg --add-architecture arm64
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $need >/dev/null
fi
scripts/fetch-model.sh >/dev/null
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64-static -L /"
export RUSTC=/usr/bin/rustc
/usr/bin/cargo test --release --target aarch64-unknown-linux-gnu --target-dir target/aarch64 \
  "${tests[@]}" --no-fail-fast "$@"
