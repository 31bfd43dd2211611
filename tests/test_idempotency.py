"""``Idempotency-Key`` on ``POST /generate``: the real app with the embedded file store and filesystem broker, and
with a real Redis (job store, keys and broker). Nothing is mocked: "nothing enqueued" is counted in the broker."""
from __future__ import annotations

import json
import multiprocessing
import threading
import time

import pytest
from fastapi.testclient import TestClient

from tests.conftest import make_mask, png_bytes

KEY = "Idempotency-Key"
SUBTYPE = {"conditioning": {"type": "subtype", "subtype": "LUAD"}, "width": 64, "height": 64, "steps": 2,
           "seed": 5}


def embedded_client(settings):
    from service.app import create_app

    app = create_app(settings)
    client = TestClient(app)
    client.settings, client.store = settings, app.state.services.store
    client.keys = app.state.services.idempotency
    return client


@pytest.fixture
def client(embedded_settings):
    with embedded_client(embedded_settings) as c:
        yield c


def queued_messages(client) -> list[str]:
    """The job messages in the embedded broker (kombu's filesystem transport: a file per message)."""
    folder = client.settings.data_dir / "broker" / "queue"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def all_jobs(client, tenant="public"):
    return client.store.list(tenant, 0, 100)


def post_mask(client, mask: bytes, params: dict | str, key: str | None = None, **headers):
    if key is not None:
        headers[KEY] = key
    return client.post("/generate", files={"mask": ("m.png", mask, "image/png")},
                       data={"params": params if isinstance(params, str) else json.dumps(params)}, headers=headers)


def test_same_key_and_body_answer_the_first_job_and_enqueue_nothing(client):
    first = client.post("/generate", json=SUBTYPE, headers={KEY: "order-17"})
    assert first.status_code == 202, first.text
    job_id = first.json()["id"]
    assert len(queued_messages(client)) == 1
    # the same request again, its JSON written differently: key order, spaces, a default spelled out
    again_body = json.dumps({"seed": 5, "quality": 90, "priority": "normal", **SUBTYPE}, indent=2)
    again = client.post("/generate", content=again_body, headers={KEY: "order-17", "content-type": "application/json"})
    assert again.status_code == 200, again.text
    assert again.json() == first.json() and again.headers["Location"] == f"/jobs/{job_id}"
    jobs, total = all_jobs(client)
    assert total == 1 and jobs[0].id == job_id
    assert len(queued_messages(client)) == 1  # nothing enqueued
    # the replay reports the job as it is now
    assert client.delete(f"/jobs/{job_id}").json()["status"] == "canceled"
    replay = client.post("/generate", json=SUBTYPE, headers={KEY: "order-17"})
    assert replay.status_code == 200 and replay.json()["status"] == "canceled" and replay.json()["id"] == job_id
    # without a key every request is a new job
    assert client.post("/generate", json=SUBTYPE).json()["id"] != job_id
    assert all_jobs(client)[1] == 2


def test_same_key_with_another_body_is_a_409_and_changes_nothing(client):
    job_id = client.post("/generate", json=SUBTYPE, headers={KEY: "k1"}).json()["id"]
    for other in ({**SUBTYPE, "seed": 6}, {**SUBTYPE, "priority": "high"}):
        resp = client.post("/generate", json=other, headers={KEY: "k1"})
        assert resp.status_code == 409, resp.text
        assert "different request body" in resp.json()["detail"] and KEY in resp.json()["detail"]
    resp = post_mask(client, png_bytes(make_mask(32, 32)), {}, key="k1")  # a mask request is another body too
    assert resp.status_code == 409
    jobs, total = all_jobs(client)
    assert total == 1 and jobs[0].id == job_id and len(queued_messages(client)) == 1
    # the key still answers its own body
    assert client.post("/generate", json=SUBTYPE, headers={KEY: "k1"}).status_code == 200


def test_multipart_identity_is_the_params_json_and_the_mask_bytes(client):
    mask = png_bytes(make_mask(32, 32))
    first = post_mask(client, mask, {"seed": 1, "steps": 2}, key="m1")
    assert first.status_code == 202, first.text
    same = post_mask(client, mask, '{ "steps": 2,\n "seed": 1, "outputs": ["tiff"] }', key="m1")
    assert same.status_code == 200 and same.json()["id"] == first.json()["id"]
    other_pixels = post_mask(client, png_bytes(make_mask(32, 32, classes=(0, 1))), {"seed": 1, "steps": 2}, key="m1")
    assert other_pixels.status_code == 409
    other_params = post_mask(client, mask, {"seed": 2, "steps": 2}, key="m1")
    assert other_params.status_code == 409
    assert all_jobs(client)[1] == 1 and len(queued_messages(client)) == 1


def test_keys_are_per_tenant(embedded_settings):
    settings = embedded_settings.model_copy(update={"api_keys": "a:key-a,b:key-b"})
    with embedded_client(settings) as c:
        a = c.post("/generate", json=SUBTYPE, headers={KEY: "shared", "X-API-Key": "key-a"})
        b = c.post("/generate", json=SUBTYPE, headers={KEY: "shared", "X-API-Key": "key-b"})
        assert a.status_code == b.status_code == 202 and a.json()["id"] != b.json()["id"]
        again = c.post("/generate", json=SUBTYPE, headers={KEY: "shared", "X-API-Key": "key-b"})
        assert again.status_code == 200 and again.json()["id"] == b.json()["id"]
        # another body under a tenant's key is a conflict for that tenant
        other = c.post("/generate", json={**SUBTYPE, "seed": 9}, headers={KEY: "shared", "X-API-Key": "key-a"})
        assert other.status_code == 409
        assert len(queued_messages(c)) == 2


@pytest.mark.parametrize("value, fragment", [
    ("k" * 256, "256 characters long"),
    ("tab\there", "printable ASCII"),
    ("clé".encode("utf-8"), "printable ASCII"),
    ("", "must not be empty"),
])
def test_bad_keys_are_422s_naming_the_header(client, value, fragment):
    resp = client.post("/generate", json=SUBTYPE, headers={KEY: value})
    assert resp.status_code == 422, resp.text
    assert [d["loc"] for d in resp.json()["detail"]] == [["header", KEY]]
    assert fragment in resp.json()["detail"][0]["msg"]
    assert all_jobs(client)[1] == 0 and queued_messages(client) == []
    assert not (client.settings.data_dir / "idempotency").exists() or \
        not list((client.settings.data_dir / "idempotency").glob("*.json"))


def test_the_longest_key_of_printable_ascii_is_accepted(client):
    key = ("~ !\"#$%&'()*+,-./09:;<=>?@AZ[\\]^_`az{|}" * 7)[:255]
    assert len(key) == 255
    first = client.post("/generate", json=SUBTYPE, headers={KEY: key})
    assert first.status_code == 202
    assert client.post("/generate", json=SUBTYPE, headers={KEY: key}).json()["id"] == first.json()["id"]


def test_keys_expire_after_the_setting(embedded_settings):
    settings = embedded_settings.model_copy(update={"idempotency_hours": 0.5 / 3600})  # half a second
    with embedded_client(settings) as c:
        first = c.post("/generate", json=SUBTYPE, headers={KEY: "short-lived"}).json()["id"]
        assert c.post("/generate", json=SUBTYPE, headers={KEY: "short-lived"}).json()["id"] == first
        time.sleep(0.8)
        later = c.post("/generate", json={**SUBTYPE, "seed": 6}, headers={KEY: "short-lived"})
        assert later.status_code == 202 and later.json()["id"] != first  # expired: a new request, even another body


def test_a_deleted_jobs_key_is_forgotten(client):
    job_id = client.post("/generate", json=SUBTYPE, headers={KEY: "gone"}).json()["id"]
    client.delete(f"/jobs/{job_id}")  # queued → canceled
    assert client.delete(f"/jobs/{job_id}").status_code == 204  # finished → deleted
    again = client.post("/generate", json=SUBTYPE, headers={KEY: "gone"})
    assert again.status_code == 202 and again.json()["id"] != job_id
    assert client.post("/generate", json=SUBTYPE, headers={KEY: "gone"}).json()["id"] == again.json()["id"]


def test_concurrent_requests_with_one_key_make_one_job(client):
    results, barrier = [], threading.Barrier(8)

    def post():
        barrier.wait()
        resp = client.post("/generate", json=SUBTYPE, headers={KEY: "race"})
        results.append((resp.status_code, resp.json()["id"]))

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(code for code, _ in results) == [200] * 7 + [202]
    assert len({job_id for _, job_id in results}) == 1
    assert all_jobs(client)[1] == 1 and len(queued_messages(client)) == 1


def _claim_in_process(root, job_id, start, out):
    from core.idempotency import FileIdempotencyKeys, KeyEntry

    keys = FileIdempotencyKeys(root)
    start.wait()
    found = keys.claim("public", "one-key", KeyEntry(job_id, "fp"), 60)
    out.put((job_id, None if found is None else found.job_id))


def test_the_file_keys_are_taken_once_across_processes(tmp_path):
    """The embedded store's lock holds between processes (several API workers on one data dir)."""
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_claim_in_process, args=(tmp_path, f"job{i}", start, out)) for i in range(6)]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    winners = [job for job, found in results if found is None]
    assert len(winners) == 1
    assert all(found == winners[0] for job, found in results if found is not None)


# --- Redis: keys, store and broker in a real Redis -------------------------------------------------------------


@pytest.fixture
def redis_settings(embedded_settings, redis_url, key_prefix):
    import redis

    yield embedded_settings.model_copy(update={"broker_url": redis_url, "key_prefix": key_prefix,
                                               "queue": key_prefix})
    r = redis.Redis.from_url(redis_url)
    for pattern in (f"{key_prefix}*", f"_kombu.binding*{key_prefix}*"):
        for key in r.scan_iter(pattern):
            r.delete(key)


def test_redis_keys_replay_conflict_and_expire(redis_settings, redis_url):
    import redis

    r = redis.Redis.from_url(redis_url)
    prefix = redis_settings.key_prefix
    with embedded_client(redis_settings) as c:
        first = c.post("/generate", json=SUBTYPE, headers={KEY: "r1"})
        assert first.status_code == 202, first.text
        job_id = first.json()["id"]
        assert c.post("/generate", json=SUBTYPE, headers={KEY: "r1"}).json() == first.json()
        assert c.post("/generate", json={**SUBTYPE, "seed": 1}, headers={KEY: "r1"}).status_code == 409
        assert r.llen(prefix) == 1 and c.store.list("public", 0, 10)[1] == 1
        entry = c.keys.get("public", "r1")
        assert entry.job_id == job_id and entry.state == "created"
        ttl_ms = r.pttl(c.keys.redis_key("public", "r1"))
        assert 24 * 3600 * 1000 - 60_000 < ttl_ms <= 24 * 3600 * 1000  # SLIDESYNTH_IDEMPOTENCY_HOURS
    short = redis_settings.model_copy(update={"idempotency_hours": 0.5 / 3600})
    with embedded_client(short) as c:
        a = c.post("/generate", json=SUBTYPE, headers={KEY: "r2"}).json()["id"]
        time.sleep(0.8)
        assert c.post("/generate", json=SUBTYPE, headers={KEY: "r2"}).json()["id"] != a


def test_redis_claim_is_atomic_across_threads(redis_settings):
    from core.idempotency import KeyEntry, RedisIdempotencyKeys

    keys = RedisIdempotencyKeys(redis_settings.job_store_url, redis_settings.key_prefix)
    barrier, results = threading.Barrier(16), []

    def claim(i):
        barrier.wait()
        results.append((f"job{i}", keys.claim("public", "hot", KeyEntry(f"job{i}", "fp"), 60)))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [job for job, found in results if found is None]
    assert len(winners) == 1 and {found.job_id for _, found in results if found} == {winners[0]}
    # only the holder's exact entry can be replaced or released
    assert not keys.release("public", "hot", KeyEntry("job-other", "fp"))
    assert keys.replace("public", "hot", KeyEntry(winners[0], "fp"), KeyEntry(winners[0], "fp", "created"), 60)
    assert not keys.release("public", "hot", KeyEntry(winners[0], "fp"))  # it is "created" now
    assert keys.release("public", "hot", KeyEntry(winners[0], "fp", "created")) and keys.get("public", "hot") is None


def test_a_failed_enqueue_releases_the_key(redis_settings):
    """The broker is down (nothing listens on its port) while the job store is up: 503, nothing left behind, and
    a retry with the same key once the broker is back creates the job."""
    down = redis_settings.model_copy(update={"broker_url": "redis://127.0.0.1:9/0",
                                             "redis_url": redis_settings.broker_url})
    with embedded_client(down) as c:
        resp = c.post("/generate", json=SUBTYPE, headers={KEY: "retry-me"})
        assert resp.status_code == 503 and resp.headers["Retry-After"] == "30", resp.text
        assert c.keys.get("public", "retry-me") is None
        assert c.store.list("public", 0, 10)[1] == 0
    with embedded_client(redis_settings) as c:
        retry = c.post("/generate", json=SUBTYPE, headers={KEY: "retry-me"})
        assert retry.status_code == 202, retry.text
        assert c.post("/generate", json=SUBTYPE, headers={KEY: "retry-me"}).json()["id"] == retry.json()["id"]
