"""Job webhooks, signed per Standard Webhooks (https://www.standardwebhooks.com, spec 1.0.0).

A request names a ``webhook`` URL and the ``webhook_events`` it wants: ``start`` (the job starts running),
``progress`` (at most one a second while it runs), ``completed`` (a terminal status: succeeded, failed, canceled).
Each event is one POST of ``{"type": "job.<event>", "timestamp": <when it happened>, …the job as GET /jobs/{id}
shows it}`` (minified JSON) with the headers

* ``webhook-id``: ``msg_<job id>_start`` / ``msg_<job id>_progress_<event_seq>`` / ``msg_<job id>_completed``, the
  same on every retry of the event (an idempotency key);
* ``webhook-timestamp``: the attempt's Unix time, seconds;
* ``webhook-signature``: ``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`` keyed with the bytes of the
  tenant's ``whsec_`` secret, one per secret, space-separated (rotation).

Delivery runs in a background thread per job (:class:`WebhookDispatcher`), so the sampler never waits for a
receiver: 2xx is delivered; a connection error, a timeout, 408, 429 or 5xx is retried with exponential backoff (the
same id and body, a new timestamp and signature); any other status (3xx — redirects are not followed —, 4xx) gives
the event up, and 410 Gone gives up the job's later events too. A ``progress`` event waits in the queue, coalesced
(the newest state is sent), and a failing one is dropped when a newer event is queued.

SSRF: unless ``SLIDESYNTH_WEBHOOK_ALLOW_PRIVATE``, the API refuses a URL whose host is a non-public address or
``localhost``, and each delivery resolves the host, refuses it when any address is not public (loopback, private,
link-local, shared, reserved, multicast) and connects to the address it checked (no second lookup to rebind).
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import os
import random
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from core import __version__
from core.jobs import FINISHED, JobRecord, iso
from core.jobview import job_view_data

if TYPE_CHECKING:
    from core.jobs import JobStore
    from core.settings import Settings

log = logging.getLogger("slidesynth.webhooks")

EVENTS = ("start", "progress", "completed")
DEFAULT_EVENTS = ["completed"]  # Replicate's default is completion; live progress is GET /jobs/{id}/events
SECRET_PREFIX = "whsec_"
PROGRESS_INTERVAL = 1.0  # seconds between two progress events of a job, at least
MAX_RETRY_AFTER = 60.0  # the longest Retry-After honoured, seconds
IDLE_SECONDS = 60.0  # a job's sender thread ends after this long with nothing to send
USER_AGENT = f"slidesynth-webhooks/{__version__}"


# --- secrets and signatures -------------------------------------------------------------------------------------

def decode_secret(secret: str) -> bytes:
    """The signing key of a ``whsec_<base64>`` secret; ValueError saying what is wrong."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError("a webhook secret starts with whsec_")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a webhook secret is whsec_ followed by base64") from None
    if not 24 <= len(key) <= 64:
        raise ValueError(f"a webhook secret holds 24 to 64 bytes (Standard Webhooks), not {len(key)}")
    return key


def new_secret() -> str:
    """A fresh secret: ``whsec_`` + base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(32)).decode("ascii")


def sign(keys: list[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header: ``v1,<signature>`` per key, space-separated."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join("v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode("ascii")
                    for key in keys)


# --- URLs and addresses -----------------------------------------------------------------------------------------

def _not_public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone id is no part of the address
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def check_url(url: str, allow_private: bool) -> str:
    """The URL when it can be a webhook, else ValueError saying why (without looking its host up)."""
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise ValueError("must not contain spaces or control characters")
    try:
        parts = urlsplit(url)
        parts.port  # raises for a port that is not a number in 0-65535
    except ValueError as exc:
        raise ValueError(f"is not a valid URL ({exc})") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if "@" in parts.netloc:
        raise ValueError("must not contain credentials (user:password@); authenticate the sender by its signature")
    host = parts.hostname
    if not host:
        raise ValueError("must name a host")
    if not allow_private:
        try:
            private = _not_public(host)
        except ValueError:  # a name, not an address: looked up (and checked) at each delivery
            private = host.rstrip(".") == "localhost" or host.rstrip(".").endswith(".localhost")
        if private:
            raise ValueError(f"{host} is not a public address (this service sends webhooks to public addresses "
                             f"only; SLIDESYNTH_WEBHOOK_ALLOW_PRIVATE)")
    return url


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """HTTP to the address that was checked, with the URL's host in the Host header."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to the address that was checked; the certificate is verified for the URL's host (and SNI names it)."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


@dataclass
class Attempt:
    ok: bool
    error: str | None = None
    retry: bool = False  # worth another attempt
    gone: bool = False  # 410: the receiver wants no more
    retry_after: float | None = None


def post(url: str, body: bytes, headers: dict[str, str], timeout: float, allow_private: bool) -> Attempt:
    """One delivery attempt (no redirects followed)."""
    parts = urlsplit(url)
    https = parts.scheme.lower() == "https"
    host, port = parts.hostname or "", parts.port or (443 if https else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        return Attempt(False, f"cannot resolve {host}: {exc}", retry=True)
    addresses = [info[4][0] for info in infos]
    if not allow_private:
        refused = [a for a in addresses if _not_public(a)]
        if refused:
            return Attempt(False, f"refused: {host} resolves to {refused[0]}, not a public address "
                                  f"(SLIDESYNTH_WEBHOOK_ALLOW_PRIVATE)")
    conn_type = _PinnedHTTPSConnection if https else _PinnedHTTPConnection
    conn = conn_type(host, port, addresses[0], timeout)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        response.read(65536)
        status = response.status
        retry_after = response.getheader("Retry-After")
    except (OSError, http.client.HTTPException) as exc:  # refused, reset, timeout, TLS
        return Attempt(False, f"{exc.__class__.__name__}: {exc}" if str(exc) else exc.__class__.__name__,
                       retry=True)
    finally:
        conn.close()
    if 200 <= status < 300:
        return Attempt(True)
    seconds = float(retry_after) if retry_after and retry_after.strip().isdigit() else None
    error = f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else "")
    return Attempt(False, error, retry=status in (408, 429) or status >= 500, gone=status == 410,
                   retry_after=seconds)


# --- dispatching ------------------------------------------------------------------------------------------------

def message_id(job: JobRecord, kind: str) -> str:
    """The event's ``webhook-id``: the same for every attempt, and for a job's ``start`` also across its runs."""
    return f"msg_{job.id}_progress_{job.event_seq}" if kind == "progress" else f"msg_{job.id}_{kind}"


def payload(job: JobRecord, kind: str, retention_hours: float = 0.0) -> bytes:
    happened = {"start": job.started_at, "progress": job.heartbeat_at, "completed": job.finished_at}[kind]
    data = {"type": f"job.{kind}", "timestamp": iso(happened or time.time()), **job_view_data(job, retention_hours)}
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


def wants(job: JobRecord, kind: str) -> bool:
    return bool(job.spec.webhook) and kind in job.spec.webhook_events


class WebhookDispatcher:
    """A process's webhook sender: per job with events to send, one daemon thread that delivers them in order
    (``start``, ``progress``…, ``completed``), retrying as the module says, and records the counts in the job
    (``webhook_deliveries``, ``webhook_failures``, ``webhook_last_error``). :meth:`notify` only queues."""

    def __init__(self, store: "JobStore", settings: "Settings"):
        self.store, self.settings = store, settings
        self._lock = threading.Lock()
        self._senders: dict[str, _JobSender] = {}

    def notify(self, job: JobRecord, kind: str) -> None:
        """Queue the event when the job asked for it; returns at once."""
        if not wants(job, kind):
            return
        with self._lock:
            sender = self._senders.get(job.id)
            if sender is None:
                sender = self._senders[job.id] = _JobSender(self, job.id)
                sender.start()
            sender.push(kind)

    def completed(self, job: JobRecord) -> bool:
        """Queue ``completed`` for a job that reached a terminal status: once per job, whichever process (a worker,
        or the API that canceled a queued job) gets there first. False when the job needs none or it was sent."""
        if not wants(job, "completed"):
            return False
        try:
            if not self.store.transition(job.id, set(FINISHED), expect={"webhook_completed_at": None},
                                         webhook_completed_at=time.time()):
                return False
        except Exception:
            log.exception("job %s: recording the completed webhook failed", job.id)
            return False
        self.notify(job, "completed")
        return True

    def drain(self, timeout: float) -> bool:
        """Wait until every queued event was delivered or given up (a worker process about to exit, tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                busy = [s for s in self._senders.values() if s.busy()]
            if not busy:
                return True
            time.sleep(0.05)
        return False

    def _retire(self, sender: "_JobSender") -> bool:
        """Called by an idle sender: remove it unless something was queued meanwhile."""
        with self._lock, sender.cond:
            if sender.pending:
                return False
            if self._senders.get(sender.job_id) is sender:
                del self._senders[sender.job_id]
            return True


class _JobSender(threading.Thread):
    def __init__(self, dispatcher: WebhookDispatcher, job_id: str):
        super().__init__(name=f"slidesynth-webhook-{job_id[:8]}", daemon=True)
        self.dispatcher, self.job_id = dispatcher, job_id
        self.cond = threading.Condition()
        self.pending: deque[str] = deque()
        self.current: str | None = None
        self.last_progress = float("-inf")
        self.gone = False  # the receiver answered 410: nothing more for this job
        self.counts: list[int] | None = None  # deliveries, failures (read from the record once)
        self.last_error: str | None = None

    def push(self, kind: str) -> None:
        with self.cond:
            if kind == "progress" and "progress" in self.pending:
                return  # one is waiting; it is built from the record when sent, so it will show this state
            if kind == "completed":
                self.pending = deque(k for k in self.pending if k != "progress")
            self.pending.append(kind)
            self.cond.notify_all()

    def busy(self) -> bool:
        with self.cond:
            return bool(self.pending) or self.current is not None

    def _take(self) -> str | None:
        with self.cond:
            idle_until = time.monotonic() + IDLE_SECONDS
            while True:
                now = time.monotonic()
                if self.pending:
                    if self.pending[0] == "progress" and now < self.last_progress + PROGRESS_INTERVAL:
                        self.cond.wait(self.last_progress + PROGRESS_INTERVAL - now)
                        continue
                    self.current = self.pending.popleft()
                    return self.current
                if now >= idle_until:
                    return None
                self.cond.wait(idle_until - now)

    def run(self) -> None:
        while True:
            kind = self._take()
            if kind is None:
                if self.dispatcher._retire(self):
                    return
                continue
            try:
                self._send(kind)
            except Exception:  # a webhook problem never ends the sender (nor touches the job)
                log.exception("job %s: sending the %s webhook failed", self.job_id, kind)
            finally:
                with self.cond:
                    self.current = None
            if kind == "completed" and self.dispatcher._retire(self):
                return

    def _send(self, kind: str) -> None:
        settings, store = self.dispatcher.settings, self.dispatcher.store
        job = store.get(self.job_id)
        if job is None or self.gone:
            return
        if kind == "progress":
            self.last_progress = time.monotonic()
            if job.status.terminal:
                return  # the completed event says it
        if self.counts is None:
            self.counts = [job.webhook_deliveries, job.webhook_failures]
        name = f"job.{kind}"
        keys = settings.webhook_secret_map.get(job.tenant)
        if not keys:
            self._failed(f"{name}: no webhook secret for tenant {job.tenant!r} (SLIDESYNTH_WEBHOOK_SECRETS)")
            return
        msg_id, body, url = message_id(job, kind), payload(job, kind, settings.retention_hours), job.spec.webhook
        tries = settings.webhook_max_attempts
        for attempt in range(1, tries + 1):
            timestamp = int(time.time())
            headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, "webhook-id": msg_id,
                       "webhook-timestamp": str(timestamp), "webhook-signature": sign(keys, msg_id, timestamp, body)}
            result = post(url, body, headers, settings.webhook_timeout, settings.webhook_allow_private)
            if result.ok:
                self.counts[0] += 1
                self._record()
                return
            self._failed(f"{name}: {result.error} (attempt {attempt} of {tries})")
            if result.gone:
                self.gone = True
            if not result.retry or attempt == tries:
                return
            delay = settings.webhook_retry_seconds * 2 ** (attempt - 1) * (1 + 0.1 * random.random())
            if result.retry_after is not None:
                delay = max(delay, min(result.retry_after, MAX_RETRY_AFTER))
            deadline = time.monotonic() + delay
            with self.cond:
                while (remaining := deadline - time.monotonic()) > 0:
                    if kind == "progress" and self.pending:
                        return  # a newer event is queued: this progress is stale
                    self.cond.wait(remaining)

    def _failed(self, error: str) -> None:
        log.warning("job %s: webhook %s", self.job_id, error)
        if self.counts is not None:
            self.counts[1] += 1
        self.last_error = error
        self._record()

    def _record(self) -> None:
        if self.counts is None:
            return
        try:
            self.dispatcher.store.update(self.job_id, webhook_deliveries=self.counts[0],
                                         webhook_failures=self.counts[1], webhook_last_error=self.last_error)
        except Exception as exc:  # the store restarting: the counts catch up with the next write
            log.warning("job %s: recording webhook counts failed: %s", self.job_id, exc)
