#!/usr/bin/env bash
# The GPU check for the CUDA backend, in two steps:
#   scripts/device-check.sh prepare   here (with Rust): builds the release binary and the CUDA
#                                     test binary, strips them, and puts them with the tiny
#                                     fixtures into .device/ (git-ignored; pass it in `carry`)
#   scripts/device-check.sh run       on the GPU machine (no Rust needed): runs the CUDA tests
#                                     (none may skip there: kernels vs CPU ops, tiny goldens on
#                                     the GPU, CPU/GPU logits parity on SmolLM2-135M- and
#                                     Llama-3.2-1B-shaped random models), then prints prefill and
#                                     decode tokens/s and decode's share of the 4.8 TB/s bound
#                                     (f32 and 16-bit weights; cuBLAS against the decode
#                                     kernel), and serves concurrent chats on the GPU.
# About 2.5 minutes on an H200 (every step runs even when one before it failed).
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
  # cudarc loads libcuda, libnvrtc and libcublas by name: put every folder that holds one of
  # them (the toolkit's, or the pip wheels' next to PyTorch) on the loader's path.
  libdirs=$(find /usr/local/cuda* /usr/local/nvidia /usr/lib/x86_64-linux-gnu /opt /usr/local/lib \
      \( -name 'libcuda.so*' -o -name 'libnvrtc.so*' -o -name 'libcublas.so*' \) 2>/dev/null \
    | grep -v -e /compat/ -e /stubs/ | xargs -r -n1 dirname | sort -u | paste -sd: - || true)
  export LD_LIBRARY_PATH="/usr/local/nvidia/lib64:${libdirs}:${LD_LIBRARY_PATH:-}"
  echo "library folders: $libdirs"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  log="${OUT:-/tmp}/device-check.log"
  failed=""
  # Every step runs even when one before it failed, so one run shows everything.
  timeout 200 "$out/bin/cuda_parity" --test-threads 1 --nocapture 2>&1 | tee "$log" || failed="$failed tests"
  if grep -q "skipped" "$log"; then
    failed="$failed skipped-tests"
  fi
  # Each shape with its weights as f32 and as 16-bit floats (what a BF16 checkpoint or a
  # quantized GGUF becomes on the GPU); f32 also with cuBLAS for every product, against the
  # hand-written decode kernel.
  for run in "smollm2-135m f32" "smollm2-135m f16" "smollm2-135m f32 cublas" \
      "llama-3.2-1b f32" "llama-3.2-1b bf16" "llama-3.2-1b f32 cublas"; do
    set -- $run
    echo "bench: $run"
    CHATSTREAM_CUDA_MATMUL="${3:-}" timeout 90 "$out/bin/chatstream" bench --synthetic "$1" \
      --synthetic-format "$2" --device cuda --prompt-len 512 --decode-tokens 256 2>&1 \
      | tee -a "$log" || failed="$failed bench-$1-$2${3:+-$3}"
  done
  timeout 30 "$out/bin/chatstream" generate --model "$out/fixtures/tiny-llama" --device cuda \
    --prompt Hello --max-new-tokens 8 --ignore-eos 2>&1 | tee -a "$log" || failed="$failed generate"
  # The server on the GPU: concurrent streamed chats (workers prefill while the engine thread
  # decodes the others' steps in one pass), each of which must finish.
  "$out/bin/chatstream" serve --model "$out/fixtures/tiny-llama" --device cuda --port 8765 \
    --concurrency 4 >"${OUT:-/tmp}/serve.log" 2>&1 &
  server=$!
  timeout 120 python3 scripts/concurrent-chats.py http://127.0.0.1:8765 6 64 2>&1 | tee -a "$log" \
    || failed="$failed serve"
  kill "$server" && wait "$server" || true
  if [ -n "$failed" ]; then
    echo "device-check: FAILED:$failed" >&2
    exit 1
  fi
  echo "device-check: passed"
  ;;
*)
  echo "usage: $0 prepare|run" >&2
  exit 2
  ;;
esac
