"""``Idempotency-Key`` on ``POST /generate``: the header's check, the request's fingerprint, and submitting a job
at most once per key (the keys live in :mod:`core.idempotency`)."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Callable

from fastapi import HTTPException
from pydantic import BaseModel

from core.idempotency import PENDING_SECONDS, IdempotencyKeys, KeyEntry
from core.jobs import JobRecord, JobStore

log = logging.getLogger("slidesynth.api")

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255
KEY_PATTERN = r"^[\x20-\x7e]+$"  # printable ASCII
WAIT_SECONDS = 15.0  # how long a request waits for a concurrent one with its key to store its job


def check_key(value: str | None) -> str | None:
    """The header's value, or a 422 naming the header: 1–255 printable ASCII characters."""
    if value is None:
        return None
    problem = None
    if not value:
        problem = "must not be empty"
    elif len(value) > MAX_KEY_LENGTH:
        problem = f"is {len(value)} characters long; at most {MAX_KEY_LENGTH}"
    elif any(not " " <= ch <= "~" for ch in value):
        problem = "must be printable ASCII (characters 0x20–0x7E)"
    if problem:
        raise HTTPException(422, detail=[{"loc": ["header", HEADER], "msg": f"{HEADER} {problem}",
                                          "type": "value_error"}])
    return value


def canonical_json(model: BaseModel) -> str:
    """The validated request as JSON with sorted keys and no spaces: the defaults it was given are spelled out,
    so whitespace, key order and leaving a default out do not make it another request."""
    return json.dumps(model.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def fingerprint(request: BaseModel, mask: bytes | None = None) -> str:
    """sha256 of the request: a JSON body's canonical JSON; with a mask, the ``params`` part's canonical JSON and
    the sha256 of the mask file's bytes as uploaded."""
    if mask is None:
        text = "json\n" + canonical_json(request)
    else:
        text = "multipart\n" + canonical_json(request) + "\nmask sha256 " + hashlib.sha256(mask).hexdigest()
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def submit_once(keys: IdempotencyKeys, store: JobStore, tenant: str, key: str, body_fingerprint: str,
                record: JobRecord, create: Callable[[], None], ttl: float) -> tuple[JobRecord, bool]:
    """Create ``record`` (``create`` stores and enqueues it, raising an HTTPException when it cannot) unless the
    tenant's key already names a job: ``(record, True)`` when created, ``(the earlier job, False)`` when the key
    and body were seen. 409 for the key with another body, or when a concurrent request with the key has not
    stored its job within :data:`WAIT_SECONDS`. A key whose job was deleted is forgotten with it."""
    mine = KeyEntry(record.id, body_fingerprint)
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        found = keys.claim(tenant, key, mine, PENDING_SECONDS)
        if found is None:
            break
        job = store.get(found.job_id) if found.state == "created" else None
        if found.state == "created" and (job is None or job.tenant != tenant):
            keys.release(tenant, key, found)  # its job was deleted: the key goes with it
            continue
        if found.fingerprint != body_fingerprint:
            raise HTTPException(409, detail=f"{HEADER} {key!r} was used with a different request body (for job "
                                            f"{found.job_id}); send a new key for a new request")
        if job is not None:
            return job, False
        if time.monotonic() > deadline:  # the other request is still storing its job (or died: PENDING_SECONDS)
            raise HTTPException(409, detail=f"a request with {HEADER} {key!r} is still being processed; retry",
                                headers={"Retry-After": "1"})
        time.sleep(0.05)
    try:
        create()
    except BaseException:
        try:
            keys.release(tenant, key, mine)  # a retry with the key must be able to create the job
        except Exception:  # the store is down too: the pending entry expires in PENDING_SECONDS
            log.warning("could not release %s of failed job %s", HEADER, record.id, exc_info=True)
        raise
    try:
        if not keys.replace(tenant, key, mine, KeyEntry(record.id, body_fingerprint, "created"), ttl):
            log.warning("%s of job %s expired before the job was stored", HEADER, record.id)
    except Exception:  # the job is stored and queued: the client gets it; only the key is lost
        log.warning("could not record %s of job %s", HEADER, record.id, exc_info=True)
    return record, True
