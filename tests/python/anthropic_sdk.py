"""Drives the tenant socket with the official `anthropic` package; prints one JSON object.

Recent releases of the SDK take an `httpx2` client, whose transport reaches a Unix socket.
"""
import json
import sys

import anthropic
import httpx2

sock, token = sys.argv[1], sys.argv[2]
client = anthropic.Anthropic(
    base_url="http://localhost",
    api_key=token,
    http_client=httpx2.Client(transport=httpx2.HTTPTransport(uds=sock)),
    max_retries=0,
)
out = {}
m = client.messages.create(model="claude", max_tokens=1000,
                           messages=[{"role": "user", "content": "hello"}])
out["text"] = m.content[0].text
out["model"] = m.model
out["output_tokens"] = m.usage.output_tokens
with client.messages.stream(model="claude", max_tokens=1000,
                            messages=[{"role": "user", "content": "stream"}]) as s:
    text = "".join(s.text_stream)
    final = s.get_final_message()
out["stream"] = [text, final.model, final.usage.output_tokens]
for name, model in [("wrong_api", "fast"), ("unknown", "nope")]:
    try:
        client.messages.create(model=model, max_tokens=10,
                               messages=[{"role": "user", "content": "x"}])
        out[name] = "answered"
    except anthropic.APIStatusError as e:
        err = e.body.get("error", {}) if isinstance(e.body, dict) else {}
        out[name] = [e.status_code, err.get("type"), err.get("reason_code")]
print(json.dumps(out))
