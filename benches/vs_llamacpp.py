"""chatstream against llama.cpp on the same GGUF file and the same thread count, side by
side: the two alternate, each measuring prefill of a 512-token prompt, decode of 128 tokens
(batch 1, one forward pass per token) after `--decode-after` cached tokens (16, as
`chatstream bench`), and aggregate decode of several sequences at once (`--levels`: N
sequences, one pass of N tokens a step, each row's logits computed, as a server that
coalesces its streams runs them), and the ratios are printed.

    python3 -m venv .cache/llama
    # builds llama.cpp for this CPU (AVX-512 and VNNI where it has them); on a VM that hides
    # CPU features the native build (and a wheel pip cached from one) may die with an illegal
    # instruction: then name the set, e.g. "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON
    # -DGGML_F16C=ON -DGGML_AVX512=OFF"
    CMAKE_ARGS="-DGGML_NATIVE=ON" .cache/llama/bin/pip install --no-cache-dir llama-cpp-python==0.3.36
    cargo build --release
    .cache/llama/bin/python benches/vs_llamacpp.py [--model M] [--threads 2] [--rounds 3]
"""

import argparse
import ctypes
import json
import statistics
import subprocess
import time

import llama_cpp as L

p = argparse.ArgumentParser()
p.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--rounds", type=int, default=3)
p.add_argument("--prompt-len", type=int, default=512)
p.add_argument("--decode-tokens", type=int, default=128)
p.add_argument("--decode-after", type=int, default=16,
               help="tokens cached before the timed decode steps, in both")
p.add_argument("--levels", default="1,4", help="sequences decoded at once (1 always runs)")
p.add_argument("--chatstream", default="target/release/chatstream")
args = p.parse_args()
levels = sorted({1, *(int(n) for n in args.levels.split(","))})

quiet = L.llama_log_callback(lambda level, text, data: None)  # kept alive: llama.cpp holds it
L.llama_log_set(quiet, ctypes.c_void_p(0))
L.llama_backend_init()
model = L.llama_model_load_from_file(args.model.encode(), L.llama_model_default_params())
assert model, f"llama.cpp could not load {args.model}"
vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
# the token ids chatstream bench uses
tokens = [(i * 7919) % vocab for i in range(max(args.prompt_len, args.decode_after))]
prompt = tokens[:args.prompt_len]
# one context for everything: a unified cache holding the largest level's sequences
cp = L.llama_context_default_params()
cp.n_seq_max = max(levels)
cp.kv_unified = True
cp.n_ctx = max(args.prompt_len, max(levels) * (args.decode_after + args.decode_tokens)) + 256
cp.n_batch = cp.n_ubatch = max(args.prompt_len, args.decode_after, max(levels))
cp.n_threads = cp.n_threads_batch = args.threads
ctx = L.llama_init_from_model(model, cp)
assert ctx, "llama.cpp could not make a context"
batch = L.llama_batch_init(cp.n_batch, 0, 1)


def decode(rows, every_row):
    """One llama_decode of (token, position, sequence) rows: each row's logits computed, or
    (a prompt) the last row's only."""
    batch.n_tokens = len(rows)
    for i, (tok, pos, seq) in enumerate(rows):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
        batch.seq_id[i][0], batch.logits[i] = seq, every_row or i == len(rows) - 1
    assert L.llama_decode(ctx, batch) == 0, "llama_decode failed"


def llama_run():
    """Prefill tokens/s, then aggregate decode tokens/s at each level."""
    mem = L.llama_get_memory(ctx)
    L.llama_memory_clear(mem, True)
    t = time.perf_counter()
    decode([(tok, pos, 0) for pos, tok in enumerate(prompt)], False)
    prefill = len(prompt) / (time.perf_counter() - t)
    rates = {}
    for n in levels:
        L.llama_memory_clear(mem, True)
        for s in range(n):
            decode([(tok, pos, s) for pos, tok in enumerate(tokens[:args.decode_after])], False)
        token = tokens[0]
        t = time.perf_counter()
        for step in range(args.decode_tokens):
            decode([(token, args.decode_after + step, s) for s in range(n)], True)
        rates[n] = n * args.decode_tokens / (time.perf_counter() - t)
    return prefill, rates


def chatstream_run(extra):
    out = subprocess.run(
        [args.chatstream, "bench", "--device", "cpu", "--model", args.model,
         "--threads", str(args.threads), "--prompt-len", str(args.prompt_len),
         "--decode-tokens", str(args.decode_tokens), "--decode-after", str(args.decode_after),
         "--levels", ",".join(map(str, levels)), *extra],
        check=True, capture_output=True, text=True).stdout
    v = json.loads(out.strip().splitlines()[-1])
    return v["prefill_tokens_per_s"], {
        lv["sequences"]: lv["tokens_per_s"] for lv in v["batched_decode"]}


# the default (int16 activations where the CPU has AVX-512 VNNI), then the other two
options = ["f32", "int8"]
results = {"llama.cpp": [], "chatstream": [], **{f"chatstream {o}": [] for o in options}}
for _ in range(args.rounds):
    results["chatstream"].append(chatstream_run([]))
    results["llama.cpp"].append(llama_run())
    for o in options:
        results[f"chatstream {o}"].append(chatstream_run(["--activations", o]))

print(f"{args.model}, {args.threads} threads, median of {args.rounds} alternating rounds; "
      f"decode after {args.decode_after} cached tokens")
pre = {k: statistics.median(p for p, _ in v) for k, v in results.items()}
dec = {k: {n: statistics.median(r[n] for _, r in v) for n in levels}
       for k, v in results.items()}
# each round's n-over-one ratio, then the median of those (the rounds see different phases)
over = {k: {n: statistics.median(r[n] / r[1] for _, r in v) for n in levels}
        for k, v in results.items()}
ref = "llama.cpp"
for k in results:
    print(f"{k:32} prefill {pre[k]:7.1f} tok/s ({pre[k] / pre[ref]:.2f}x)")
    for n in levels:
        print(f"{'':32} {n} sequence{'s' if n > 1 else ' '} decode {dec[k][n]:6.1f} tok/s "
              f"({dec[k][n] / dec[ref][n]:.2f}x)   over one {over[k][n]:.2f}")
