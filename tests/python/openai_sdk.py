"""Drives the tenant socket with the official `openai` package; prints one JSON object."""
import json
import sys

import httpx
import openai

sock, token = sys.argv[1], sys.argv[2]
client = openai.OpenAI(
    base_url="http://localhost/v1",
    api_key=token,
    http_client=httpx.Client(transport=httpx.HTTPTransport(uds=sock)),
    max_retries=0,
)
out = {}
raw = client.chat.completions.with_raw_response.create(
    model="fast", messages=[{"role": "user", "content": "hello"}], max_tokens=1000)
done = raw.parse()
out["content"] = done.choices[0].message.content
out["model"] = done.model
out["cost"] = raw.headers.get("x-bulkhead-cost-usd")
out["prompt_tokens"] = done.usage.prompt_tokens
out["completion_tokens"] = done.usage.completion_tokens
out["models"] = sorted(m.id for m in client.models.list())
tool = client.chat.completions.create(
    model="fast", messages=[{"role": "user", "content": "weather?"}],
    tools=[{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {}}}}])
out["tool"] = tool.choices[0].message.tool_calls[0].function.name
stream = client.chat.completions.create(
    model="fast", messages=[{"role": "user", "content": "stream"}], stream=True)
text, last_model, streamed_usage = "", None, None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    last_model = chunk.model
    if chunk.usage:
        streamed_usage = chunk.usage.completion_tokens
out["stream"] = [text, last_model, streamed_usage]
emb = client.embeddings.create(model="fast", input=["one", "two"], encoding_format="float")
out["embeddings"] = [len(emb.data), len(emb.data[0].embedding)]
out["fallback_model"] = client.chat.completions.create(
    model="flaky", messages=[{"role": "user", "content": "hi"}]).model
try:
    client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    out["unknown"] = "answered"
except openai.NotFoundError as e:
    out["unknown"] = e.body.get("reason_code") if isinstance(e.body, dict) else str(e.body)
try:
    client.chat.completions.create(model="fast", messages="not a list")
    out["bad"] = "answered"
except openai.BadRequestError as e:
    out["bad"] = e.body.get("reason_code") if isinstance(e.body, dict) else str(e.body)
print(json.dumps(out))
