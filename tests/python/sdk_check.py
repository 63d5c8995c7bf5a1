"""End-to-end check of a running chatstream with the real `openai` SDK and the real
`prometheus_client` text parser. Run by tests/python_clients.rs:

    python sdk_check.py BASE_URL API_KEY SCRAPE_PHRASE mock|real

`mock` expects `--mock echo` (the answer repeats the user's message); `real` expects a real
model at temperature 0. Exits non-zero with a message on the first failed check.
"""

import json
import sys
import time
import urllib.request

import openai
from prometheus_client.parser import text_string_to_metric_families

base, key, phrase, mode = sys.argv[1:5]
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)


def check(cond, what):
    if not cond:
        sys.exit(f"FAILED: {what}")
    print(f"ok: {what.split(':')[0]}")


def metrics():
    req = urllib.request.Request(
        base + "/metrics",
        headers={"X-FastSession-Skip": "skip", "X-ChatStream-Auth-Header": phrase},
    )
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "node")
            samples[f"{s.name}{{{labels}}}"] = s.value
    return samples


def chat(content, **kw):
    return client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": content}], **kw
    )


def streamed(content, **kw):
    text, finish, usage, roles = "", None, None, []
    for chunk in chat(content, stream=True, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.append(c.delta.role)
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    return text, finish, usage, roles


before = metrics()
check("chatstream_build_info{version=0.1.0}" in before, f"build info: {sorted(before)[:5]}")
check("chatstream_kv_cache_bytes{}" in before, "kv cache gauge")
check("chatstream_model_load_seconds{}" in before, "model load time")

models = client.models.list()
check(len(models.data) == 1 and models.data[0].id, f"models.list: {models}")

ok = 0
prompt = "one two three four five six"
if mode == "mock":
    text, finish, usage, roles = streamed(prompt, stream_options={"include_usage": True})
    check(text == prompt and finish == "stop", f"streamed echo: {text!r} {finish}")
    check(roles == ["assistant"], f"one role delta: {roles}")
    check(usage is not None and usage.completion_tokens == 6, f"usage chunk: {usage}")
    r = chat(prompt)
    check(r.choices[0].message.content == prompt, f"non-streamed: {r}")
    check(r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 0, f"usage: {r.usage}")
    text, finish, _, _ = streamed(prompt, stop=["four"])
    check(text == "one two three " and finish == "stop", f"stop sequence: {text!r} {finish}")
    r = chat(prompt, max_tokens=2)
    check(r.choices[0].finish_reason == "length", f"max_tokens: {r}")
    ok = 4
else:
    r = chat("What is the capital of France?", max_tokens=24, temperature=0)
    answer = r.choices[0].message.content
    check(len(answer) > 0 and r.usage.completion_tokens > 0, f"non-streamed: {r}")
    text, finish, usage, _ = streamed(
        "What is the capital of France?", max_tokens=24, temperature=0,
        stream_options={"include_usage": True},
    )
    check(text == answer, f"streamed equals non-streamed: {text!r} vs {answer!r}")
    check(usage.completion_tokens == r.usage.completion_tokens, f"usage: {usage}")
    words = answer.split()
    check(len(words) >= 3, f"a few words to cut at: {answer!r}")
    cut = answer.index(" " + words[2])
    text, finish, _, _ = streamed(
        "What is the capital of France?", max_tokens=24, temperature=0, stop=[" " + words[2]]
    )
    check(text == answer[:cut] and finish == "stop", f"stop sequence: {text!r} vs {answer[:cut]!r}")
    ok = 3

try:
    openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    check(False, "a wrong key is refused")
except openai.AuthenticationError as e:
    check(e.status_code == 401, "wrong key: 401")
try:
    chat(prompt, temperature="hot")
    check(False, "a bad field is refused")
except openai.BadRequestError as e:
    err = e.body if isinstance(e.body, dict) else {}
    check(e.status_code == 400 and err.get("param") == "temperature", f"bad field: {e.body}")

# A request is counted just after its last byte goes out: wait for the counters to settle.
done = 'chatstream_requests_finished_total{outcome=success}'
for _ in range(50):
    after = metrics()
    if after[done] - before.get(done, 0) >= ok:
        break
    time.sleep(0.1)
check(after[done] - before.get(done, 0) == ok, f"success counter moved by {ok}: {after[done]}")
for h in ["queue_wait", "time_to_first_token", "request_duration"]:
    name = f"chatstream_{h}_seconds_count{{}}"
    check(after[name] - before[name] == ok, f"{h} histogram counted {ok}: {after[name]}")
itl = "chatstream_inter_token_latency_seconds_count{}"
check(after[itl] > before[itl], f"inter-token latency observed: {after[itl]}")
print(json.dumps({"checked": mode}))
