"""A fake OpenAI-compatible upstream for the LLM routing tests.

Listens on 127.0.0.1 (port printed on the first line of stdout) and appends every
request it gets (path, headers, body) as one JSON line to the file named by argv[1].
With a certificate chain and key file as argv[2] and argv[3] it speaks https only.
Upstream model names choose the behaviour:
  flaky-upstream  -> 500 (the router must fall back)
  slow            -> answers after 0.3 s
  bow-*           -> (embeddings) a bag-of-words vector: each word counted in one of 64
                     buckets by its CRC-32, so texts that share words are near
  anything else   -> answers at once
Usage is reported so that it equals the daemon's worst case for the call: prompt tokens
= bytes of the request body, completion tokens = max_tokens (20 when absent). Requests
with `tools` get a tool call back.
"""
import json
import sys
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOG = sys.argv[1]
LOCK = threading.Lock()


def bag_of_words(text):
    v = [0.0] * 64
    v[0] = 0.01
    for word in "".join(c if c.isalnum() else " " for c in text.lower()).split():
        v[zlib.crc32(word.encode()) % 64] += 1.0
    return v


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        n = int(self.headers.get("content-length", "0"))
        raw = self.rfile.read(n)
        with LOCK, open(LOG, "a") as f:
            f.write(json.dumps({"path": self.path, "headers": dict(self.headers),
                                "body": raw.decode()}) + "\n")
        req = json.loads(raw)
        model = req.get("model")
        if self.path.endswith("/messages"):
            return self.anthropic(req, raw)
        if self.path.endswith("/embeddings"):
            inputs = req["input"] if isinstance(req["input"], list) else [req["input"]]
            vector = bag_of_words if model.startswith("bow") else lambda _: [0.25, 0.5, 0.75]
            return self.reply(200, {
                "object": "list", "model": model,
                "data": [{"object": "embedding", "index": i, "embedding": vector(text)}
                         for i, text in enumerate(inputs)],
                "usage": {"prompt_tokens": len(raw), "total_tokens": len(raw)},
            })
        if model == "flaky-upstream":
            return self.reply(500, {"error": {"message": "upstream broke"}})
        if model == "slow":
            time.sleep(0.3)
        out = req.get("max_completion_tokens", req.get("max_tokens", 20))
        usage = {"prompt_tokens": len(raw), "completion_tokens": out,
                 "total_tokens": len(raw) + out}
        if req.get("stream"):
            events = []
            for piece in ["hi ", "from ", "upstream"]:
                events.append({"id": "c", "object": "chat.completion.chunk", "created": 1,
                               "model": model, "choices": [{"index": 0,
                               "delta": {"content": piece}, "finish_reason": None}]})
            events.append({"id": "c", "object": "chat.completion.chunk", "created": 1,
                           "model": model, "choices": [{"index": 0, "delta": {},
                           "finish_reason": "stop"}]})
            if (req.get("stream_options") or {}).get("include_usage"):
                events.append({"id": "c", "object": "chat.completion.chunk", "created": 1,
                               "model": model, "choices": [], "usage": usage})
            body = "".join("data: " + json.dumps(e) + "\n\n" for e in events)
            body = (body + "data: [DONE]\n\n").encode()
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        message = {"role": "assistant", "content": "hi from upstream"}
        if req.get("tools"):
            message = {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": req["tools"][0]["function"]["name"],
                             "arguments": "{\"city\": \"Oslo\"}"}}]}
        self.reply(200, {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 1,
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(raw), "completion_tokens": out,
                      "total_tokens": len(raw) + out},
        })

    def anthropic(self, req, raw):
        model, out = req.get("model"), req.get("max_tokens", 20)
        if not req.get("stream"):
            return self.reply(200, {
                "id": "msg_1", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": "hi from upstream"}],
                "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": len(raw), "output_tokens": out}})
        events = [("message_start", {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": len(raw), "output_tokens": 1}}}),
            ("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}})]
        for piece in ["hi ", "from ", "upstream"]:
            events.append(("content_block_delta", {"type": "content_block_delta", "index": 0,
                           "delta": {"type": "text_delta", "text": piece}}))
        events += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
                   ("message_delta", {"type": "message_delta", "delta": {
                       "stop_reason": "end_turn", "stop_sequence": None},
                       "usage": {"output_tokens": out}}),
                   ("message_stop", {"type": "message_stop"})]
        body = "".join(f"event: {n}\ndata: {json.dumps(e)}\n\n" for n, e in events).encode()
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def reply(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
if len(sys.argv) > 3:
    # argv[2], argv[3]: certificate chain and key; then it speaks only https.
    import ssl

    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(sys.argv[2], sys.argv[3])
    server.socket = tls.wrap_socket(server.socket, server_side=True)
print(server.server_address[1], flush=True)
server.serve_forever()
