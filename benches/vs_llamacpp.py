"""chatstream against llama.cpp on the same GGUF file and the same thread count, side by
side: the two alternate, each measuring prefill of a 512-token prompt and decode of 128 tokens
(batch 1, one forward pass per token), and the ratios are printed.

    python3 -m venv .cache/llama
    # builds llama.cpp; its native build (and a wheel pip cached from one) may die with an
    # illegal instruction on a VM that hides CPU features, hence the explicit set
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF" \
      .cache/llama/bin/pip install --no-cache-dir llama-cpp-python==0.3.36
    cargo build --release
    .cache/llama/bin/python benches/vs_llamacpp.py [--model M] [--threads 2] [--rounds 3]
"""

import argparse
import json
import statistics
import subprocess
import time

from llama_cpp import Llama

p = argparse.ArgumentParser()
p.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--rounds", type=int, default=3)
p.add_argument("--prompt-len", type=int, default=512)
p.add_argument("--decode-tokens", type=int, default=128)
p.add_argument("--chatstream", default="target/release/chatstream")
args = p.parse_args()

llm = Llama(model_path=args.model, n_threads=args.threads, n_threads_batch=args.threads,
            n_ctx=args.prompt_len + args.decode_tokens + 8, n_batch=args.prompt_len, verbose=False)
vocab = llm.n_vocab()
prompt = [(i * 7919) % vocab for i in range(args.prompt_len)]


def llama_run():
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    prefill = len(prompt) / (time.perf_counter() - t)
    token = prompt[-1]
    t = time.perf_counter()
    for _ in range(args.decode_tokens):
        llm.eval([token])
    decode = args.decode_tokens / (time.perf_counter() - t)
    return prefill, decode


def chatstream_run(extra):
    out = subprocess.run(
        [args.chatstream, "bench", "--device", "cpu", "--model", args.model,
         "--threads", str(args.threads), "--prompt-len", str(args.prompt_len),
         "--decode-tokens", str(args.decode_tokens), *extra],
        check=True, capture_output=True, text=True).stdout
    v = json.loads(out.strip().splitlines()[-1])
    return v["prefill_tokens_per_s"], v["decode_tokens_per_s"]


results = {"llama.cpp": [], "chatstream": [], "chatstream --int8-activations": []}
for _ in range(args.rounds):
    results["chatstream"].append(chatstream_run([]))
    results["llama.cpp"].append(llama_run())
    results["chatstream --int8-activations"].append(chatstream_run(["--int8-activations"]))

print(f"{args.model}, {args.threads} threads, median of {args.rounds} alternating rounds")
base = {k: statistics.median(d for _, d in v) for k, v in results.items()}
pre = {k: statistics.median(p for p, _ in v) for k, v in results.items()}
for k in results:
    print(f"{k:32} prefill {pre[k]:7.1f} tok/s ({pre[k] / pre['llama.cpp']:.2f}x)   "
          f"decode {base[k]:6.1f} tok/s ({base[k] / base['llama.cpp']:.2f}x)")
