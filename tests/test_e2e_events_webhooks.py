"""Live events and webhooks end to end: a real Redis, a real Celery worker process (`slidesynth worker`), the API
served by uvicorn (`slidesynth serve`), httpx streaming the server-sent events, and a local HTTP receiver (a thread
in this process) checking each webhook's Standard Webhooks signature with its own HMAC code."""
from __future__ import annotations

import functools
import json
import threading
import time
import uuid

import pytest

from tests.conftest import make_mask, png_bytes
from tests.services import running_stack, wait_for
from tests.webhook_helpers import SECRET, Receiver, sse_events, verify

pytestmark = pytest.mark.integration

TERMINAL = ("succeeded", "failed", "canceled")
_wait = functools.partial(wait_for, interval=0.1)


@pytest.fixture(scope="module")
def service(redis_url, tmp_path_factory):
    """One worker and one API for the module's tests (each starts in ≈ 10 s on two cores)."""
    key_prefix = f"slidesynth-test-{uuid.uuid4().hex[:10]}"
    with running_stack(redis_url, key_prefix, tmp_path_factory.mktemp("events-webhooks"),
                       webhook_secrets=f"public:{SECRET}", webhook_allow_private="true", webhook_retry_seconds="0.5",
                       webhook_timeout="120",  # a held answer (the slow-receiver test) is not a timeout
                       events_ping_seconds="1") as stack:
        stack.client.logs = stack.logs
        yield stack.client


def submit(service, steps: int, size: int = 64, **params) -> str:
    resp = service.post("/generate", files={"mask": ("m.png", png_bytes(make_mask(size, size)), "image/png")},
                        data={"params": json.dumps({"steps": steps, "seed": 3, **params})})
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]


def stream(service, job_id: str, headers=None) -> list:
    with service.stream("GET", f"/jobs/{job_id}/events", headers=headers or {}, timeout=300) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        return list(sse_events(resp.iter_lines()))


def wait_done(service, job_id: str) -> dict:
    try:
        return _wait(lambda: (j := service.get(f"/jobs/{job_id}").json())["status"] in TERMINAL and j, 300,
                     f"job {job_id} to finish")
    except AssertionError:
        print((service.logs / "worker.log").read_text()[-5000:])
        raise


def test_a_jobs_event_stream_from_queued_to_succeeded_and_resumed(service):
    job_id = submit(service, steps=12)
    events = stream(service, job_id)
    real = [e for e in events if e != "ping"]
    ids = [int(e["id"]) for e in real]
    assert ids == sorted(set(ids)) and all(e["event"] == "job" for e in real)
    datas = [json.loads(e["data"]) for e in real]
    final = service.get(f"/jobs/{job_id}").json()
    assert datas[-1] == final and final["status"] == "succeeded"  # the stream ends with the terminal event
    assert datas[0]["status"] in ("queued", "running")  # the state when the stream opened
    running = [d for d in datas if d["status"] == "running"]
    steps = [d["step"] for d in running if d["step"] is not None]
    assert steps == sorted(steps) and steps[-1] == 12 and len(set(steps)) >= 10  # every sampling step, in order
    progress = [d["progress"] for d in datas]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert {d["stage"] for d in running} >= {"sampling", "decoding"}
    assert any(d["eta_seconds"] is not None for d in running)
    assert all(set(d) == set(final) for d in datas)

    # resume from the middle: only the events after that id, the same ones, ending with the terminal one
    middle = ids[len(ids) // 2]
    resumed = [e for e in stream(service, job_id, {"Last-Event-ID": str(middle)}) if e != "ping"]
    assert [int(e["id"]) for e in resumed] == [i for i in ids if i > middle]
    assert [json.loads(e["data"]) for e in resumed] == datas[len(ids) // 2 + 1:]
    with service.stream("GET", f"/jobs/{job_id}/events", headers={"Last-Event-ID": str(ids[-1])}) as resp:
        assert resp.status_code == 204
    with service.stream("GET", "/jobs/0123456789abcdef0123456789abcdef/events") as resp:
        assert resp.status_code == 404


def test_webhooks_start_progress_completed_signed_in_order(service):
    with Receiver() as receiver:
        job_id = submit(service, steps=30, size=128, webhook=receiver.url,
                        webhook_events=["start", "progress", "completed"])
        job = wait_done(service, job_id)
        got = receiver.wait_for(lambda got: got and got[-1].json["type"] == "job.completed", 60,
                                "the completed webhook")
    assert job["status"] == "succeeded"
    types = [d.json["type"] for d in got]
    assert types[0] == "job.start" and types[-1] == "job.completed" and set(types[1:-1]) == {"job.progress"}
    assert types.count("job.progress") >= 1
    for delivery in got:
        verify(SECRET, delivery, tolerance=60)
        assert delivery.json["id"] == job_id
    progress = [d for d in got if d.json["type"] == "job.progress"]
    assert all(b.received - a.received >= 0.8 for a, b in zip(progress, progress[1:]))  # at most one a second
    steps = [d.json["step"] for d in progress]
    assert steps == sorted(steps)
    assert got[-1].json["status"] == "succeeded" and got[-1].json["links"]["slide"] == f"/jobs/{job_id}/slide.tiff"
    assert len({d.headers["webhook-id"] for d in got}) == len(got)
    record = _wait(lambda: (j := service.get(f"/jobs/{job_id}").json())["webhook"]["deliveries"] == len(got) and j,
                   10, "the delivery count")
    assert record["webhook"]["failures"] == 0 and record["webhook"]["last_error"] is None


def test_a_failing_receiver_gets_the_same_webhook_id_until_it_answers_2xx(service):
    with Receiver(lambda delivery, n: (500, 0.0) if n <= 2 else (200, 0.0)) as receiver:
        job_id = submit(service, steps=2, webhook=receiver.url)  # default events: completed only
        wait_done(service, job_id)
        got = receiver.wait_for(lambda got: len(got) >= 3, 60, "three attempts")
        time.sleep(1.5)  # no fourth
    assert len(receiver.deliveries) == 3
    assert [d.headers["webhook-id"] for d in got] == [f"msg_{job_id}_completed"] * 3
    assert got[0].body == got[1].body == got[2].body and got[0].json["type"] == "job.completed"
    for delivery in got:
        verify(SECRET, delivery, tolerance=60)
    assert got[1].received - got[0].received >= 0.5 and got[2].received - got[1].received >= 1.0  # backoff
    webhook = service.get(f"/jobs/{job_id}").json()["webhook"]
    assert (webhook["deliveries"], webhook["failures"]) == (1, 2)
    assert webhook["last_error"] == "job.completed: HTTP 500 (attempt 2 of 5)"


def test_a_slow_receiver_does_not_slow_the_job(service):
    """The receiver holds its answer to the first delivery — the start event, which the worker sends before the
    first step — until the job's event stream has shown the last sampling step. A sampler that waited for the
    receiver would never get there (the hold gives up after 100 s and the test fails); the check does not
    depend on how fast this machine samples."""
    wait_done(service, submit(service, steps=2))  # a warm worker (models loaded) when this test runs alone
    sampled, released_by_step = threading.Event(), []

    def answer(delivery, n):
        if n == 1:
            released_by_step.append(sampled.wait(100))
        return 200, 0.0

    with Receiver(answer) as receiver:
        job_id = submit(service, steps=8, webhook=receiver.url, webhook_events=["start", "progress", "completed"])
        arrivals = []
        for event in stream(service, job_id):
            if event == "ping":
                continue
            job = json.loads(event["data"])
            arrivals.append((time.time(), job))
            if job["step"] == 8:
                sampled.set()
        first = receiver.wait_for(lambda got: got, 10, "the start event")[0]
        assert first.json["type"] == "job.start"
        sampled_at = next(t for t, job in arrivals if job["step"] == 8)
        assert first.received < sampled_at                  # sent before the steps, answered only after them
        _wait(lambda: released_by_step, 10, "the held answer to be released")
        assert released_by_step == [True], "the sampler waited for the receiver"
        assert arrivals[-1][1]["status"] == "succeeded"
        got = receiver.wait_for(lambda got: got and got[-1].json["type"] == "job.completed", 60,
                                "the completed webhook")
        _wait(lambda: service.get(f"/jobs/{job_id}").json()["webhook"]["deliveries"] == len(got), 15,
              "the deliveries to be answered")
    types = [d.json["type"] for d in got]
    assert types[0] == "job.start" and types[-1] == "job.completed" and set(types[1:-1]) <= {"job.progress"}
    for delivery in got:
        verify(SECRET, delivery, tolerance=60)
