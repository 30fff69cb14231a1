"""Drives `shoal api`'s Messages endpoint with the official anthropic package; prints
one JSON object."""
import json
import sys

import anthropic

base, model = sys.argv[1], sys.argv[2]
client = anthropic.Anthropic(base_url=base, api_key="not-needed", max_retries=0)
out = {}
question = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
# Greedy, for answers to compare: this release of the package has no `temperature`
# argument (newer models take none), so it goes in the body as it is.
greedy = {"extra_body": {"temperature": 0}}


def text_of(message):
    return "".join(b.text for b in message.content if b.type == "text")


m = client.messages.create(model=model, max_tokens=24, **greedy, messages=question)
out["plain"] = {"text": text_of(m), "stop_reason": m.stop_reason, "role": m.role,
                "type": m.type, "usage": [m.usage.input_tokens, m.usage.output_tokens]}

with client.messages.stream(model=model, max_tokens=24, **greedy, messages=question) as s:
    pieces = list(s.text_stream)
    final = s.get_final_message()
out["stream"] = {"text": "".join(pieces), "pieces": len(pieces), "final_text": text_of(final),
                 "stop_reason": final.stop_reason,
                 "usage": [final.usage.input_tokens, final.usage.output_tokens]}

short = client.messages.create(model=model, max_tokens=3, **greedy, messages=question)
out["short"] = {"stop_reason": short.stop_reason, "output_tokens": short.usage.output_tokens}

cut = client.messages.create(model=model, max_tokens=24, **greedy, messages=question,
                             stop_sequences=["Paris"])
out["stop_sequence"] = {"text": text_of(cut), "stop_reason": cut.stop_reason,
                        "stop_sequence": cut.stop_sequence}

terse = client.messages.create(
    model=model, max_tokens=8, **greedy, system="You answer in one word.",
    messages=[{"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]}])
out["system"] = {"text": text_of(terse), "input_tokens": terse.usage.input_tokens}

try:
    client.messages.create(model="no-such-model", max_tokens=4, messages=question)
    out["unknown_model"] = None
except anthropic.NotFoundError as e:
    out["unknown_model"] = {"status": e.status_code, "type": e.body["error"]["type"]}

try:
    client.messages.create(model=model, max_tokens=4, messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}])
    out["image"] = None
except anthropic.BadRequestError as e:
    out["image"] = {"status": e.status_code, "type": e.body["error"]["type"],
                    "message": e.body["error"]["message"]}

print(json.dumps(out))
