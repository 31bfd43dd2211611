"""A local webhook receiver (a thread running http.server) and a Standard Webhooks verifier written from the spec,
independent of core.webhooks; and a uvicorn server in a thread for streaming tests."""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SECRET = "whsec_" + base64.b64encode(bytes(range(32))).decode()  # 32 bytes, as Standard Webhooks asks (24–64)
OTHER_SECRET = "whsec_" + base64.b64encode(bytes(range(100, 124))).decode()


@dataclass
class Delivery:
    received: float  # time.time() when the request arrived
    path: str
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def json(self) -> dict:
        return json.loads(self.body)


class Receiver:
    """Records every POST. ``answer(delivery, n)`` → (status, seconds to sleep before answering[, headers]); n
    counts the requests received so far (1 for the first)."""

    def __init__(self, answer=lambda delivery, n: (200, 0.0)):
        self.deliveries: list[Delivery] = []
        self.answer = answer
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                delivery = Delivery(time.time(), self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                with receiver.lock:
                    receiver.deliveries.append(delivery)
                    n = len(receiver.deliveries)
                status, delay, *headers = receiver.answer(delivery, n)
                time.sleep(delay)
                self.send_response(status)
                for name, value in (headers[0] if headers else {}).items():
                    self.send_header(name, value)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?src=slidesynth"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "Receiver":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait_for(self, predicate, timeout: float, what: str):
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                got = list(self.deliveries)
            if predicate(got):
                return got
            time.sleep(0.05)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; got {[d.headers for d in got]}")


def verify(secret: str, delivery: Delivery, tolerance: float = 300.0) -> None:
    """The Standard Webhooks check a receiver makes: the signature over "{id}.{timestamp}.{body}" with the secret's
    base64-decoded bytes, and a timestamp within the tolerance."""
    headers = delivery.headers
    msg_id, timestamp = headers["webhook-id"], headers["webhook-timestamp"]
    assert timestamp.isdigit() and abs(time.time() - int(timestamp)) <= tolerance, timestamp
    key = base64.b64decode(secret[len("whsec_"):])
    signed = msg_id.encode() + b"." + timestamp.encode() + b"." + delivery.body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    versions = [part.split(",", 1) for part in headers["webhook-signature"].split(" ")]
    assert any(v == "v1" and hmac.compare_digest(sig, expected) for v, sig in versions), headers


@contextmanager
def uvicorn_thread(app, port: int):
    """The ASGI app behind a real uvicorn server, in a thread of the test process."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise AssertionError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def sse_events(lines):
    """Server-sent events from an iterator of text lines: dicts of their fields, and "ping" for a comment."""
    fields: dict[str, str] = {}
    for line in lines:
        if line == "":
            if fields:
                yield fields
                fields = {}
            continue
        if line.startswith(":"):
            yield "ping"
            continue
        name, _, value = line.partition(":")
        fields[name] = value[1:] if value.startswith(" ") else value
