"""Drives `shoal api` with the official openai package; prints one JSON object."""
import json
import sys
import threading
import time

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=base + "/v1", api_key="not-needed")
out = {}

models = client.models.list()
model = models.data[0].id
out["models"] = [m.id for m in models.data]

question = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
done = client.chat.completions.create(model=model, messages=question, max_tokens=24, temperature=0)
out["plain"] = {
    "text": done.choices[0].message.content,
    "role": done.choices[0].message.role,
    "finish_reason": done.choices[0].finish_reason,
    "usage": [done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.total_tokens],
    "object": done.object,
}

pieces, finish, usage, roles, chunks = [], None, None, [], 0
stream = client.chat.completions.create(
    model=model, messages=question, max_tokens=24, temperature=0, stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    chunks += 1
    assert chunk.object == "chat.completion.chunk", chunk
    if chunk.usage is not None:
        usage = [chunk.usage.prompt_tokens, chunk.usage.completion_tokens, chunk.usage.total_tokens]
    for c in chunk.choices:
        if c.delta.role:
            roles.append(c.delta.role)
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
out["stream"] = {"text": "".join(pieces), "finish_reason": finish, "usage": usage,
                 "roles": roles, "chunks": chunks}

short = client.chat.completions.create(model=model, messages=question, max_tokens=3, temperature=0)
out["short"] = {"finish_reason": short.choices[0].finish_reason,
                "completion_tokens": short.usage.completion_tokens}

text = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
out["completion"] = {"text": text.choices[0].text, "finish_reason": text.choices[0].finish_reason,
                     "completion_tokens": text.usage.completion_tokens}

# Four streamed requests at once: each must start answering before any of them ends.
def one(i, results, start):
    start.wait()
    first, pieces = None, []
    for chunk in client.chat.completions.create(
        model=model, messages=question, max_tokens=24, temperature=0, stream=True
    ):
        for c in chunk.choices:
            if c.delta.content:
                first = first or time.monotonic()
                pieces.append(c.delta.content)
    results[i] = {"first": first, "end": time.monotonic(), "text": "".join(pieces)}


results, start = [None] * 4, threading.Barrier(4)
threads = [threading.Thread(target=one, args=(i, results, start)) for i in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
out["concurrent"] = {
    "texts": [r["text"] for r in results],
    "overlap": max(r["first"] for r in results) < min(r["end"] for r in results),
}

try:
    client.chat.completions.create(model="no-such-model", messages=question, max_tokens=4)
    out["unknown_model"] = None
except openai.NotFoundError as e:
    out["unknown_model"] = {"status": e.status_code, "code": e.code}

print(json.dumps(out))
