"""Webhooks: request validation (422 naming the field, nothing stored), the settings' secrets, and delivery — signed
per Standard Webhooks (checked by tests/webhook_helpers.verify, written from the spec), ordered, throttled, retried
— to a real HTTP receiver in a thread, from the real job store and the real job runner (no broker; the Redis +
Celery path is tests/test_e2e_events_webhooks.py)."""
from __future__ import annotations

import json
import time

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from core.jobs import FileJobStore, JobRecord, JobSpec, JobStatus
from tests.conftest import make_mask, png_bytes
from tests.webhook_helpers import OTHER_SECRET, SECRET, Receiver, verify


@pytest.fixture
def settings(embedded_settings):
    embedded_settings.webhook_secrets = f"public:{SECRET}"
    embedded_settings.webhook_retry_seconds = 0.2
    embedded_settings.webhook_timeout = 2.0
    return embedded_settings


@pytest.fixture
def client(settings):
    from service.app import create_app

    app = create_app(settings)
    with TestClient(app) as c:
        c.settings, c.store, c.app = settings, app.state.services.store, app
        yield c


SUBTYPE_JOB = {"conditioning": {"type": "subtype", "subtype": "LUAD"}, "width": 64, "height": 64, "steps": 3}


def assert_nothing_created(client):
    assert client.store.list("public", 0, 10)[1] == 0
    jobs_dir = client.settings.data_dir / "jobs"
    assert not jobs_dir.exists() or not any(jobs_dir.iterdir())


@pytest.mark.parametrize("fields, loc, fragment", [
    ({"webhook": "ftp://hooks.example.org/x"}, ["webhook"], "http:// or https://"),
    ({"webhook": "hooks.example.org/x"}, ["webhook"], "http:// or https://"),
    ({"webhook": "https://user:secret@hooks.example.org/x"}, ["webhook"], "credentials"),
    ({"webhook": "https://token@hooks.example.org/x"}, ["webhook"], "credentials"),
    ({"webhook": "https://hooks.example.org:99999/x"}, ["webhook"], "not a valid URL"),
    ({"webhook": "https:///x"}, ["webhook"], "must name a host"),
    ({"webhook": "https://hooks.example.org/a b"}, ["webhook"], "spaces"),
    ({"webhook": "http://127.0.0.1:8080/x"}, ["webhook"], "not a public address"),
    ({"webhook": "http://localhost/x"}, ["webhook"], "not a public address"),
    ({"webhook": "http://[::1]/x"}, ["webhook"], "not a public address"),
    ({"webhook": "http://169.254.169.254/latest/meta-data"}, ["webhook"], "not a public address"),
    ({"webhook": "http://10.1.2.3/x"}, ["webhook"], "not a public address"),
    ({"webhook": "http://[::ffff:192.168.0.1]/x"}, ["webhook"], "not a public address"),
    ({"webhook": "https://hooks.example.org/" + "x" * 2100}, ["webhook"], "at most 2048"),
    ({"webhook": 42}, ["webhook"], "string"),
    ({"webhook": "https://hooks.example.org/x", "webhook_events": ["start", "finished"]}, ["webhook_events", 1],
     "'start', 'progress' or 'completed'"),
    ({"webhook": "https://hooks.example.org/x", "webhook_events": []}, ["webhook_events"], "at least 1"),
    ({"webhook": "https://hooks.example.org/x", "webhook_events": "completed"}, ["webhook_events"], "valid array"),
    ({"webhook_events": ["completed"]}, ["webhook_events"], "needs a `webhook`"),
])
def test_bad_webhook_fields_are_422s_naming_them(client, fields, loc, fragment):
    resp = client.post("/generate", json={**SUBTYPE_JOB, **fields})
    assert resp.status_code == 422, resp.text
    assert [d["loc"] for d in resp.json()["detail"]] == [["body", *loc]]
    assert fragment in resp.json()["detail"][0]["msg"]
    # the same in the params part of a mask request
    resp = client.post("/generate", files={"mask": ("m.png", png_bytes(make_mask(32, 32)), "image/png")},
                       data={"params": json.dumps(fields)})
    assert resp.status_code == 422, resp.text
    assert [d["loc"] for d in resp.json()["detail"]] == [["body", "params", *loc]]
    assert_nothing_created(client)


def test_a_tenant_without_a_secret_gets_no_webhook(settings):
    from service.app import create_app

    settings.api_keys = "lab-a:key-a,lab-b:key-b"
    settings.webhook_secrets = f"lab-a:{SECRET}"
    with TestClient(create_app(settings)) as c:
        body = {**SUBTYPE_JOB, "webhook": "https://hooks.example.org/x"}
        resp = c.post("/generate", json=body, headers={"X-API-Key": "key-b"})
        assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["body", "webhook"]
        assert "no webhook signing secret for tenant 'lab-b'" in resp.text
        assert not (settings.data_dir / "jobs").exists()
        resp = c.post("/generate", json=body, headers={"X-API-Key": "key-a"})
        assert resp.status_code == 202, resp.text


def test_an_accepted_webhook_is_in_the_job(client):
    resp = client.post("/generate", json={**SUBTYPE_JOB, "webhook": "https://hooks.example.org/x?a=1"})
    assert resp.status_code == 202, resp.text
    job = client.get(resp.json()["status_url"]).json()
    assert job["webhook"] == {"url": "https://hooks.example.org/x?a=1", "events": ["completed"], "deliveries": 0,
                              "failures": 0, "last_error": None}  # the default: completed only
    resp = client.post("/generate", json={**SUBTYPE_JOB, "webhook": "http://hooks.example.org/y",
                                          "webhook_events": ["progress", "start", "progress"]})
    record = client.store.get(resp.json()["id"])
    assert record.spec.webhook_events == ["progress", "start"]
    assert client.get("/jobs").json()["items"][0]["webhook"]["events"] == ["progress", "start"]
    resp = client.post("/generate", json=SUBTYPE_JOB)
    assert client.get(resp.json()["status_url"]).json()["webhook"] is None


def test_private_addresses_when_the_setting_allows_them(client):
    client.settings.webhook_allow_private = True
    resp = client.post("/generate", json={**SUBTYPE_JOB, "webhook": "http://127.0.0.1:8080/x"})
    assert resp.status_code == 202, resp.text


@pytest.mark.parametrize("value, fragment", [
    ("public", "tenant:whsec_"),
    ("public:secret", "starts with whsec_"),
    ("public:whsec_!!!", "base64"),
    ("public:whsec_" + "QUJD", "24 to 64 bytes"),
])
def test_bad_webhook_secrets_are_refused(embedded_settings, value, fragment):
    from core.settings import Settings

    with pytest.raises(ValidationError) as err:
        Settings(data_dir=embedded_settings.data_dir, webhook_secrets=value)
    assert "webhook_secrets" in str(err.value) and fragment in str(err.value)


def test_secrets_per_tenant_and_rotation(embedded_settings):
    import base64

    embedded_settings.webhook_secrets = f"lab-a:{SECRET}, lab-b:{OTHER_SECRET},lab-a:{OTHER_SECRET}"
    keys = embedded_settings.webhook_secret_map
    assert keys["lab-a"] == [base64.b64decode(SECRET[6:]), base64.b64decode(OTHER_SECRET[6:])]
    assert keys["lab-b"] == [base64.b64decode(OTHER_SECRET[6:])]


# --- delivery -----------------------------------------------------------------------------------------------------

@pytest.fixture
def delivery_settings(settings):
    settings.webhook_allow_private = True  # the receiver is on 127.0.0.1
    return settings


def make_job(store, url: str, events=("start", "progress", "completed"), job_id="hook01", tenant="public"):
    spec = JobSpec(model="diffinfinite-untrained", engine="diffinfinite", conditioning="subtype", width=64, height=64,
                   mpp=0.5, seed=1, steps=3, guidance=1.0, subtype="adenocarcinoma", subtype_id=0, webhook=url,
                   webhook_events=list(events))
    job = JobRecord(id=job_id, tenant=tenant, spec=spec)
    store.job_dir(job_id).mkdir(parents=True, exist_ok=True)
    store.create(job)
    return job


def finish(store, job, status=JobStatus.succeeded):
    store.transition(job.id, {JobStatus.queued, JobStatus.running}, status=status, finished_at=time.time(),
                     progress=1.0)
    return store.get(job.id)


def test_events_arrive_in_order_signed_and_progress_is_throttled(delivery_settings):
    settings = delivery_settings
    from core.webhooks import WebhookDispatcher

    store = FileJobStore(settings.data_dir)
    settings.webhook_secrets = f"public:{SECRET},public:{OTHER_SECRET}"  # rotation: two signatures
    with Receiver() as receiver:
        job = make_job(store, receiver.url)
        hooks = WebhookDispatcher(store, settings)
        store.transition(job.id, {JobStatus.queued}, status=JobStatus.running, started_at=time.time())
        hooks.notify(job, "start")
        started = time.time()
        step = 0
        while time.time() - started < 2.6:  # a progress write every 20 ms, as a fast sampler makes them
            step += 1
            store.update(job.id, step=step, progress=min(0.99, step / 200), heartbeat_at=time.time())
            hooks.notify(job, "progress")
            time.sleep(0.02)
        assert hooks.completed(finish(store, job))
        assert not hooks.completed(store.get(job.id))  # once per job
        assert hooks.drain(10)
    got = receiver.deliveries
    types = [d.json["type"] for d in got]
    assert types[0] == "job.start" and types[-1] == "job.completed" and set(types[1:-1]) == {"job.progress"}
    assert 2 <= len(types) - 2 <= 4, types  # ≈ 2.6 s of progress at most one a second
    progress_times = [d.received for d in got if d.json["type"] == "job.progress"]
    assert all(b - a >= 0.8 for a, b in zip(progress_times, progress_times[1:])), progress_times
    steps = [d.json["step"] for d in got if d.json["type"] == "job.progress"]
    assert steps == sorted(steps) and steps[-1] > 50  # the newest state when sent, not a stale queue
    for delivery in got:
        verify(SECRET, delivery)
        verify(OTHER_SECRET, delivery)
        assert delivery.path == "/hook?src=slidesynth"
        assert delivery.headers["content-type"] == "application/json"
        assert delivery.headers["webhook-id"].startswith(f"msg_{job.id}_")
        assert "." not in delivery.headers["webhook-id"]
    assert len({d.headers["webhook-id"] for d in got}) == len(got)
    completed = got[-1].json
    assert completed["status"] == "succeeded" and completed["id"] == job.id and completed["progress"] == 1.0
    assert completed["timestamp"].endswith("+00:00") and completed["links"]["self"] == f"/jobs/{job.id}"
    record = store.get(job.id)
    assert (record.webhook_deliveries, record.webhook_failures, record.webhook_last_error) == (len(got), 0, None)


def test_retries_keep_the_id_and_back_off(delivery_settings):
    settings = delivery_settings
    from core.webhooks import WebhookDispatcher

    store = FileJobStore(settings.data_dir)
    answers = {1: 500, 2: 503}
    with Receiver(lambda d, n: (answers.get(n, 200), 0.0)) as receiver:
        job = make_job(store, receiver.url, events=["completed"])
        hooks = WebhookDispatcher(store, settings)
        hooks.notify(job, "start")  # not asked for: nothing
        assert hooks.completed(finish(store, job, JobStatus.failed))
        assert hooks.drain(15)
    got = receiver.deliveries
    assert len(got) == 3 and len({d.headers["webhook-id"] for d in got}) == 1
    assert got[0].headers["webhook-id"] == f"msg_{job.id}_completed" and got[0].json["status"] == "failed"
    assert got[0].body == got[1].body == got[2].body
    for delivery in got:
        verify(SECRET, delivery)
    # exponential backoff: 0.2 s, then 0.4 s (+ up to 10 % jitter)
    assert 0.2 <= got[1].received - got[0].received < 1.0 and 0.4 <= got[2].received - got[1].received < 1.2
    record = store.get(job.id)
    assert (record.webhook_deliveries, record.webhook_failures) == (1, 2)
    assert record.webhook_last_error == "job.completed: HTTP 503 (attempt 2 of 5)"


@pytest.mark.parametrize("status, attempts", [(404, 1), (400, 1), (301, 1), (408, 5), (429, 5), (502, 5)])
def test_which_statuses_are_retried(delivery_settings, status, attempts):
    settings = delivery_settings
    from core.webhooks import WebhookDispatcher

    store = FileJobStore(settings.data_dir)
    settings.webhook_retry_seconds = 0.01
    with Receiver(lambda d, n: (status, 0.0)) as receiver:
        job = make_job(store, receiver.url, events=["completed"])
        hooks = WebhookDispatcher(store, settings)
        hooks.completed(finish(store, job))
        assert hooks.drain(15)
    assert len(receiver.deliveries) == attempts
    record = store.get(job.id)
    assert (record.webhook_deliveries, record.webhook_failures) == (0, attempts)
    assert record.webhook_last_error.startswith(f"job.completed: HTTP {status}")


def test_gone_stops_the_jobs_later_events_and_retry_after_is_honoured(delivery_settings):
    settings = delivery_settings
    from core.webhooks import WebhookDispatcher

    store = FileJobStore(settings.data_dir)
    with Receiver(lambda d, n: (410, 0.0)) as receiver:
        job = make_job(store, receiver.url, events=["start", "completed"])
        hooks = WebhookDispatcher(store, settings)
        hooks.notify(job, "start")
        hooks.completed(finish(store, job))
        assert hooks.drain(10)
    assert [d.json["type"] for d in receiver.deliveries] == ["job.start"]

    # 429 with Retry-After: 1 — the receiver's wait, not the 0.2 s backoff
    with Receiver(lambda d, n: (429, 0.0, {"Retry-After": "1"}) if n == 1 else (200, 0.0)) as receiver:
        job = make_job(store, receiver.url, events=["completed"], job_id="hook02")
        hooks = WebhookDispatcher(store, settings)
        hooks.completed(finish(store, job))
        assert hooks.drain(10)
    got = receiver.deliveries
    assert len(got) == 2 and got[1].received - got[0].received >= 1.0


def test_delivery_refuses_hosts_that_resolve_to_private_addresses(settings):
    """The API checks the URL's literal host; each delivery checks the addresses the name resolves to (a name that
    points inside — DNS rebinding, localhost. — is refused there, and nothing is sent)."""
    from core.webhooks import WebhookDispatcher

    store = FileJobStore(settings.data_dir)
    with Receiver() as receiver:
        port = receiver.server.server_address[1]
        for i, url in enumerate((f"http://localhost:{port}/x", f"http://2130706433:{port}/x")):
            job = make_job(store, url, events=["completed"], job_id=f"ssrf{i}")
            hooks = WebhookDispatcher(store, settings)
            hooks.completed(finish(store, job))
            assert hooks.drain(10)
            record = store.get(job.id)
            assert record.webhook_failures == 1 and record.webhook_deliveries == 0
            assert "not a public address" in record.webhook_last_error and "127.0.0.1" in record.webhook_last_error
        assert receiver.deliveries == []
        settings.webhook_allow_private = True
        job = make_job(store, f"http://localhost:{port}/x", events=["completed"], job_id="ssrf9")
        hooks = WebhookDispatcher(store, settings)
        hooks.completed(finish(store, job))
        assert hooks.drain(10)
        assert len(receiver.deliveries) == 1


def test_no_secret_at_delivery_sends_nothing_and_a_timeout_is_retried(delivery_settings):
    settings = delivery_settings
    from core.webhooks import WebhookDispatcher

    store = FileJobStore(settings.data_dir)
    with Receiver(lambda d, n: (200, 1.5 if n == 1 else 0.0)) as receiver:
        job = make_job(store, receiver.url, events=["completed"], tenant="lab-z")
        hooks = WebhookDispatcher(store, settings)
        hooks.completed(finish(store, job))
        assert hooks.drain(10)
        record = store.get(job.id)
        assert "no webhook secret for tenant 'lab-z'" in record.webhook_last_error and not receiver.deliveries
        settings.webhook_timeout = 0.5
        job = make_job(store, receiver.url, events=["completed"], job_id="slow01")
        hooks.completed(finish(store, job))
        assert hooks.drain(10)
    record = store.get(job.id)
    assert (record.webhook_deliveries, record.webhook_failures) == (1, 1)
    assert "timed out" in record.webhook_last_error
    assert [d.headers["webhook-id"] for d in receiver.deliveries] == [f"msg_{job.id}_completed"] * 2


def test_the_job_runner_sends_start_progress_completed(delivery_settings):
    settings = delivery_settings
    """The real pipeline in-process (untrained model, tiny mask): the webhook thread gets the runner's events."""
    from models.registry import ModelRegistry
    from worker.jobrunner import WorkerContext, run_job

    store = FileJobStore(settings.data_dir)
    ctx = WorkerContext(settings, store, ModelRegistry(settings.models_dir))
    with Receiver() as receiver:
        spec = JobSpec(model="diffinfinite-untrained", engine="diffinfinite", conditioning="mask", width=64,
                       height=64, mpp=0.5, seed=3, steps=6, guidance=1.0, mask_file="mask.png", webhook=receiver.url,
                       webhook_events=["start", "progress", "completed"])
        job_dir = store.job_dir("run01")
        job_dir.mkdir(parents=True)
        (job_dir / "mask.png").write_bytes(png_bytes(make_mask(64, 64, classes=(0, 1, 3))))
        store.create(JobRecord(id="run01", spec=spec))
        assert run_job("run01", ctx) == JobStatus.succeeded
        assert ctx.webhooks.drain(15)
        assert run_job("run01", ctx) == JobStatus.succeeded  # a duplicate delivery: no second completed
        assert ctx.webhooks.drain(5)
    got = receiver.deliveries
    types = [d.json["type"] for d in got]
    assert types[0] == "job.start" and types[-1] == "job.completed" and types.count("job.completed") == 1
    assert "job.progress" in types and set(types[1:-1]) == {"job.progress"}
    assert got[0].json["status"] == "running" and got[-1].json["status"] == "succeeded"
    assert got[-1].json["links"]["slide"] == "/jobs/run01/slide.tiff"
    for delivery in got:
        verify(SECRET, delivery)
    assert store.get("run01").webhook_deliveries == len(got)


def test_canceling_a_queued_job_sends_completed_from_the_api_once(client):
    client.settings.webhook_allow_private = True
    with Receiver() as receiver:
        resp = client.post("/generate", json={**SUBTYPE_JOB, "webhook": receiver.url})
        job_id = resp.json()["id"]
        assert client.delete(f"/jobs/{job_id}").status_code == 200
        receiver.wait_for(lambda got: len(got) == 1, 10, "the completed webhook")
        # the worker then drops the job's message: it sends no second completed
        from models.registry import ModelRegistry
        from worker.jobrunner import WorkerContext, run_job

        ctx = WorkerContext(client.settings, client.store, ModelRegistry(client.settings.models_dir))
        assert run_job(job_id, ctx) == JobStatus.canceled
        assert ctx.webhooks.drain(5)
        time.sleep(0.3)
    assert [(d.json["type"], d.json["status"]) for d in receiver.deliveries] == [("job.completed", "canceled")]
    verify(SECRET, receiver.deliveries[0])
    assert client.get(f"/jobs/{job_id}").json()["webhook"]["deliveries"] == 1
