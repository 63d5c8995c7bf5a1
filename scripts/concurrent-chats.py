#!/usr/bin/env python3
"""Sends N concurrent streamed chat completions to a running chatstream server and checks that
each one finishes (its last event is `data: [DONE]`, after at least one token). Standard
library only, so it runs on the GPU machine as it is.

    scripts/concurrent-chats.py http://127.0.0.1:8765 [N] [MAX_TOKENS]
"""
import json
import sys
import threading
import time
import urllib.request


def wait_ready(base, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(base + "/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"concurrent-chats: {base} not ready after {seconds} s")


def chat(base, i, max_tokens, results):
    body = json.dumps({
        "messages": [{"role": "user", "content": f"Hello number {i}"}],
        "max_tokens": max_tokens,
        "stream": True,
    }).encode()
    req = urllib.request.Request(base + "/v1/chat/completions", data=body,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            events = [l.decode().strip() for l in r if l.startswith(b"data: ")]
        tokens = sum(1 for e in events if '"content"' in e)
        ok = r.status == 200 and events[-1:] == ["data: [DONE]"] and tokens > 0
        results[i] = (ok, f"status {r.status}, {tokens} token events, last {events[-1:]}")
    except Exception as e:  # any failure is this request's result
        results[i] = (False, repr(e))


def main():
    base = sys.argv[1].rstrip("/")
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    max_tokens = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    wait_ready(base)
    results = {}
    threads = [threading.Thread(target=chat, args=(base, i, max_tokens, results)) for i in range(n)]
    start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(n):
        print(f"chat {i}: {'ok' if results[i][0] else 'FAILED'}: {results[i][1]}")
    print(f"{n} chats in {time.time() - start:.2f} s")
    if not all(ok for ok, _ in results.values()):
        sys.exit("concurrent-chats: FAILED")


main()
