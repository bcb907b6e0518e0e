#!/usr/bin/env python3
"""Client test of the tenant socket, the way agent frameworks call it: httpx over a Unix
socket.

    python3 client_test.py SOCKET TOKEN_A TOKEN_B

TOKEN_A and TOKEN_B belong to two different tenants. Each check is a plain assert; the
last line printed is "N passed, 0 failed" on success (exit 0). On the first failure the
failing check is printed and the exit status is 1.
"""

import secrets
import sys
import traceback

import httpx

PATH = "notes/hello.txt"
EXEC_FIELDS = {
    "exit_code",
    "stdout",
    "stderr",
    "stdout_truncated",
    "stderr_truncated",
    "timed_out",
    "duration_ms",
}


def client(socket_path, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(
        transport=httpx.HTTPTransport(uds=socket_path),
        base_url="http://localhost",
        headers=headers,
        timeout=60.0,
    )


def error_of(resp):
    body = resp.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), f"not an error body: {resp.text!r}"
    err = body["error"]
    assert isinstance(err.get("reason_code"), str), f"error without reason_code: {resp.text!r}"
    assert isinstance(err.get("message"), str), f"error without message: {resp.text!r}"
    return err


def check_exec_shape(body):
    missing = EXEC_FIELDS - body.keys()
    assert not missing, f"exec response lacks {sorted(missing)}: {body!r}"
    assert isinstance(body["stdout_truncated"], bool) and isinstance(body["stderr_truncated"], bool), body
    assert isinstance(body["timed_out"], bool), body
    assert isinstance(body["duration_ms"], int) and body["duration_ms"] >= 0, body


def tenant_checks(sock, name, token, content):
    """The per-tenant round trip; `content` is bytes unique to this tenant."""
    checks = []

    def put_and_get():
        with client(sock, token) as c:
            r = c.put(f"/v1/files/{PATH}", content=content, headers={"Content-Type": "application/octet-stream"})
            assert r.status_code == 200, f"PUT {PATH}: {r.status_code} {r.text!r}"
            r = c.get(f"/v1/files/{PATH}")
            assert r.status_code == 200, f"GET {PATH}: {r.status_code} {r.text!r}"
            assert r.content == content, f"GET {PATH} returned {r.content!r}, expected {content!r}"

    def listing():
        with client(sock, token) as c:
            r = c.get("/v1/files/notes")
            assert r.status_code == 200, f"GET notes: {r.status_code} {r.text!r}"
            entries = r.json()["entries"]
            assert isinstance(entries, list), entries
            for e in entries:
                assert {"name", "type", "size"} <= e.keys(), f"entry lacks fields: {e!r}"
            hello = [e for e in entries if e["name"] == "hello.txt"]
            assert len(hello) == 1, f"hello.txt not listed once: {entries!r}"
            assert hello[0]["type"] == "file", hello[0]
            assert hello[0]["size"] == len(content), hello[0]

    def exec_cat():
        with client(sock, token) as c:
            r = c.post("/v1/exec", json={"argv": ["cat", "/work/notes/hello.txt"]})
            assert r.status_code == 200, f"exec cat: {r.status_code} {r.text!r}"
            body = r.json()
            check_exec_shape(body)
            assert body["exit_code"] == 0, body
            assert body["stdout"] == content.decode(), f"sandbox saw {body['stdout']!r}, expected {content.decode()!r}"
            assert body["stdout_truncated"] is False and body["timed_out"] is False, body

    def exec_stdin():
        with client(sock, token) as c:
            r = c.post("/v1/exec", json={"argv": ["wc", "-c"], "stdin": "12345"})
            assert r.status_code == 200, f"exec wc: {r.status_code} {r.text!r}"
            body = r.json()
            check_exec_shape(body)
            assert body["exit_code"] == 0, body
            assert body["stdout"].strip() == "5", f"wc -c of 5 bytes printed {body['stdout']!r}"

    checks.append((f"{name}: PUT then GET {PATH} returns its bytes", put_and_get))
    checks.append((f"{name}: GET /v1/files/notes lists hello.txt", listing))
    checks.append((f"{name}: exec cat /work/notes/hello.txt prints its bytes", exec_cat))
    checks.append((f"{name}: exec wc -c with stdin counts 5 bytes", exec_stdin))
    return checks


def main(argv):
    if len(argv) != 4:
        print(f"usage: {argv[0]} SOCKET TOKEN_A TOKEN_B", file=sys.stderr)
        return 2
    sock, token_a, token_b = argv[1], argv[2], argv[3]
    nonce = secrets.token_hex(8)
    content_a = f"tenant A says hello {nonce}\n".encode()
    content_b = f"tenant B keeps this to itself {nonce}\n".encode()

    checks = tenant_checks(sock, "A", token_a, content_a) + tenant_checks(sock, "B", token_b, content_b)

    def isolation():
        # Both wrote the same path; each token reaches only its own tenant's file.
        with client(sock, token_a) as c:
            r = c.get(f"/v1/files/{PATH}")
            assert r.status_code == 200, f"A GET {PATH}: {r.status_code} {r.text!r}"
            assert r.content == content_a, f"A's token read {r.content!r}"
            assert content_b not in r.content, "A's token read B's file"
            r = c.post("/v1/exec", json={"argv": ["cat", "/work/notes/hello.txt"]})
            assert r.status_code == 200 and r.json()["stdout"] == content_a.decode(), f"A's sandbox saw {r.text!r}"
        with client(sock, token_b) as c:
            r = c.get(f"/v1/files/{PATH}")
            assert r.status_code == 200 and r.content == content_b, f"B's token read {r.content!r}"

    def no_token():
        with client(sock) as c:
            r = c.get(f"/v1/files/{PATH}")
            assert r.status_code == 401, f"no token: {r.status_code} {r.text!r}"
            assert error_of(r)["reason_code"] == "invalid_token", r.text
            assert content_a not in r.content and content_b not in r.content, r.text
            r = c.post("/v1/exec", json={"argv": ["true"]})
            assert r.status_code == 401 and error_of(r)["reason_code"] == "invalid_token", f"exec without token: {r.status_code} {r.text!r}"

    def unknown_field():
        with client(sock, token_a) as c:
            r = c.post("/v1/exec", json={"argv": ["true"], "tenant": "beta"})
            assert r.status_code == 400, f"unknown field: {r.status_code} {r.text!r}"
            assert error_of(r)["reason_code"] == "bad_request", r.text

    checks.append(("A's token reads A's file, never B's", isolation))
    checks.append(("no token: 401 invalid_token", no_token))
    checks.append(("unknown field in the exec body: 400 bad_request", unknown_field))

    passed = 0
    for name, fn in checks:
        try:
            fn()
        except Exception as e:  # AssertionError, or httpx/JSON errors meaning the same
            print(f"FAIL: {name}: {type(e).__name__}: {e}")
            traceback.print_exc(file=sys.stderr)
            print(f"{passed} passed, 1 failed")
            return 1
        print(f"ok: {name}")
        passed += 1
    print(f"{passed} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
