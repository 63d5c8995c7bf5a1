#!/usr/bin/env bash
# The GPU check for the CUDA backend, in two steps:
#   scripts/device-check.sh prepare   here (with Rust): builds the release binary and the CUDA
#                                     test binary, strips them, and puts them with the tiny
#                                     fixtures into .device/ (git-ignored; pass it in `carry`)
#   scripts/device-check.sh run       on the GPU machine (no Rust needed): runs the CUDA tests
#                                     (none may skip there: kernels vs CPU ops, tiny goldens on
#                                     the GPU, CPU/GPU logits parity on SmolLM2-135M- and
#                                     Llama-3.2-1B-shaped random models), then prints prefill and
#                                     decode tokens/s and decode's share of the 4.8 TB/s bound.
# Under 8 minutes on an H200.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out=.device

case "${1:-run}" in
prepare)
  cargo build --release --bin chatstream
  exe=$(cargo test --release --no-run --test cuda_parity --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "cuda_parity":
        print(m["executable"])')
  rm -rf "$out" && mkdir -p "$out/bin" "$out/fixtures"
  cp target/release/chatstream "$exe" "$out/bin/"
  mv "$out/bin/$(basename "$exe")" "$out/bin/cuda_parity"
  strip "$out/bin/"*
  fixtures="${CHATSTREAM_FIXTURES:-../shared/fixtures}"
  cp -r "$fixtures/tiny-llama" "$fixtures/tiny-qwen2" "$out/fixtures/"
  du -sh "$out"
  ;;
run)
  export CHATSTREAM_FIXTURES="$PWD/$out/fixtures"
  export LD_LIBRARY_PATH="/usr/local/cuda/lib64:/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  log=$(mktemp)
  status=0
  "$out/bin/cuda_parity" --test-threads 1 --nocapture 2>&1 | tee "$log" || status=$?
  if grep -q "skipped" "$log"; then
    echo "device-check: FAILED: a CUDA test skipped on the GPU machine" >&2
    exit 1
  fi
  [ "$status" = 0 ] || { echo "device-check: FAILED: CUDA tests" >&2; exit "$status"; }
  for shape in smollm2-135m llama-3.2-1b; do
    "$out/bin/chatstream" bench --synthetic "$shape" --device cuda --prompt-len 512 --decode-tokens 256
  done
  echo "device-check: passed"
  ;;
*)
  echo "usage: $0 prepare|run" >&2
  exit 2
  ;;
esac
