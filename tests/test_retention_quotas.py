"""Retention (finished jobs expire, their files go, downloads answer 410) and per-tenant quotas (429 with
Retry-After): both job stores (a real Redis, real files), the HTTP API on the embedded configuration, and end to
end with uvicorn, a real Redis, a real Celery worker and the embedded worker."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import httpx
import pytest

from core.jobs import FINISHED, FileJobStore, JobRecord, JobSpec, JobStatus, RedisJobStore
from core.quotas import PIXEL_WINDOW_SECONDS, Quota, QuotaExceeded
from tests.conftest import REPO, make_mask, png_bytes
from tests.services import running_stack, stop_processes, wait_for as _wait

SPEC = JobSpec(model="m", engine="diffinfinite", conditioning="embedding", width=64, height=64, mpp=0.5, seed=1,
               steps=3, guidance=3.0, embedding=[0.5] * 8)
HOUR = 3600.0


@pytest.fixture(params=["redis", "file"])
def store(request, tmp_path, key_prefix):
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        s = RedisJobStore(url, tmp_path, prefix=key_prefix)
        s.url = url
        yield s
        for key in s.redis.scan_iter(f"{key_prefix}:*"):
            s.redis.delete(key)
    else:
        yield FileJobStore(tmp_path)


def another(store):
    """A second store on the same data, with its own connections (another process's view)."""
    if isinstance(store, RedisJobStore):
        return RedisJobStore(store.url, store.data_dir, prefix=store.prefix)
    return FileJobStore(store.data_dir)


def settings_for(tmp_path, **fields):
    from core.settings import Settings

    return Settings(data_dir=tmp_path, models_dir=tmp_path / "weights", **fields)


def job(job_id: str, tenant: str = "public", size: int = 64, **fields) -> JobRecord:
    spec = SPEC.model_copy(update={"width": size, "height": size})
    return JobRecord(id=job_id, tenant=tenant, spec=spec, **fields)


def finished(store, job_id: str, hours_ago: float, status: JobStatus = JobStatus.succeeded, tenant="public",
             now: float | None = None) -> JobRecord:
    """A finished job with its files on disk, as a worker leaves it."""
    now = time.time() if now is None else now
    end = now - hours_ago * HOUR
    outputs = {"tiff": "slide.tiff", "thumbnail": "thumbnail.png", "zarr": "slide.zarr"} \
        if status == JobStatus.succeeded else {}
    record = job(job_id, tenant, status=status, created_at=end - 60, started_at=end - 50, finished_at=end,
                 outputs=outputs)
    folder = store.job_dir(job_id)
    (folder / "slide.zarr" / "0").mkdir(parents=True)
    (folder / "slide.zarr" / "0" / "0.0").write_bytes(b"chunk")
    (folder / "slide.tiff").write_bytes(b"II+\x00" + b"\x01" * 4096)
    (folder / "thumbnail.png").write_bytes(png_bytes(make_mask(8, 8)))
    (folder / "mask.png").write_bytes(png_bytes(make_mask(8, 8)))
    (folder / "sampler_state.pt").write_bytes(b"state")
    store.create(record)
    return record


def files_left(store, job_id: str) -> list[str]:
    folder = store.job_dir(job_id)
    own = FileJobStore.RECORD_FILES if isinstance(store, FileJobStore) else set()
    return sorted(p.name for p in folder.iterdir() if p.name not in own) if folder.exists() else []


def age_ledger(store, tenant: str, job_id: str, seconds: float) -> None:
    """Move a job's entry in the pixel ledger ``seconds`` into the past (as if submitted that long ago)."""
    if isinstance(store, RedisJobStore):
        key = f"{store.prefix}:tenant:{tenant}:pixels"
        store.redis.zadd(key, {job_id: store.redis.zscore(key, job_id) - seconds})
    else:
        path = store.data_dir / "quota" / "pixels.json"
        ledger = json.loads(path.read_text())
        ledger[tenant][job_id][0] -= seconds
        path.write_text(json.dumps(ledger))


# ---------------------------------------------------------------------------------------------------- quotas


def test_the_queued_limit_is_exact_under_concurrent_submits(store):
    accepted, refused, errors = [], [], []
    start = threading.Barrier(12)

    def submit(i):
        own = another(store)  # each thread its own client, as separate API processes would be
        start.wait()
        try:
            own.create(job(f"c{i}", "t1"), quota=Quota(queued=3))
            accepted.append(i)
        except QuotaExceeded as exc:
            refused.append(exc)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(accepted) == 3 and len(refused) == 9
    assert {e.limit for e in refused} == {"queued"} and all(e.used == 3 for e in refused)
    assert "quota: 3 queued jobs for tenant t1 (SLIDESYNTH_QUOTA_QUEUED)" in refused[0].detail
    assert refused[0].retry_after == 30  # no running job with an ETA: the default
    assert store.usage("t1")["queued"] == 3 and store.list("t1", 0, 100)[1] == 3
    assert store.usage("t2")["queued"] == 0


def test_counts_follow_every_transition_cancel_and_delete(store):
    quota = Quota(running=1, queued=2)
    store.create(job("a", "t1"), quota=quota)
    store.create(job("b", "t1"), quota=quota)
    with pytest.raises(QuotaExceeded) as refused:
        store.create(job("c", "t1"), quota=quota)
    assert refused.value.limit == "queued"
    store.create(job("x", "t2"), quota=quota)  # another tenant has its own counts
    assert store.transition("a", {JobStatus.queued}, status=JobStatus.running, started_at=time.time())
    store.update("a", eta_seconds=12.3)
    assert store.usage("t1") | {"pixels": 0} == {"queued": 1, "running": 1, "pixels": 0}
    with pytest.raises(QuotaExceeded) as refused:  # one running: the running limit is reached
        store.create(job("c", "t1"), quota=quota)
    assert refused.value.limit == "running" and refused.value.retry_after == 13  # the running job's ETA
    assert "SLIDESYNTH_QUOTA_RUNNING" in refused.value.detail
    # a lost run re-queued by recovery moves back between the counts
    assert store.transition("a", {JobStatus.running}, status=JobStatus.queued, claim=None)
    assert store.usage("t1")["queued"] == 2 and store.usage("t1")["running"] == 0
    assert store.transition("a", {JobStatus.queued}, status=JobStatus.running)
    assert store.transition("a", {JobStatus.running}, status=JobStatus.succeeded, finished_at=time.time())
    store.create(job("c", "t1"), quota=quota)  # nothing running now; b and c queued
    assert store.transition("b", {JobStatus.queued}, status=JobStatus.canceled, finished_at=time.time())
    assert store.usage("t1")["queued"] == 1
    store.delete("c")  # a queued job's record deleted: its place frees
    assert store.usage("t1") | {"pixels": 0} == {"queued": 0, "running": 0, "pixels": 0}
    for i in range(2):
        store.create(job(f"d{i}", "t1"), quota=quota)


def test_counts_recover_when_a_record_vanishes_behind_the_stores_back(store):
    """A record removed without the store (a key deleted by hand, a lost file) must not hold a place forever."""
    quota = Quota(queued=1, running=1)
    store.create(job("gone", "t1"), quota=quota)
    store.create(job("gonerun", "t2"), quota=quota)
    store.transition("gonerun", {JobStatus.queued}, status=JobStatus.running)
    if isinstance(store, RedisJobStore):
        store.redis.delete(f"{store.prefix}:job:gone", f"{store.prefix}:job:gonerun")
    else:
        for job_id in ("gone", "gonerun"):
            (store.job_dir(job_id) / "job.json").unlink()
    store.create(job("next", "t1"), quota=quota)
    store.create(job("next2", "t2"), quota=quota)
    assert store.usage("t1")["queued"] == 1 and store.usage("t2")["running"] == 0


def test_the_pixel_budget_is_a_sliding_24_hours_with_retry_after(store):
    quota = Quota(pixels_per_day=2 * 64 * 64 + 100)
    store.create(job("p1", "t1"), quota=quota)
    age_ledger(store, "t1", "p1", 20 * HOUR)  # submitted 20 h ago: frees in 4 h
    store.create(job("p2", "t1"), quota=quota)
    age_ledger(store, "t1", "p2", 2 * HOUR)
    assert store.usage("t1")["pixels"] == 2 * 64 * 64
    with pytest.raises(QuotaExceeded) as refused:
        store.create(job("p3", "t1"), quota=quota)
    exc = refused.value
    assert exc.limit == "pixels" and exc.used == 2 * 64 * 64 and exc.requested == 64 * 64
    assert 4 * HOUR - 60 <= exc.retry_after <= 4 * HOUR + 1, exc.retry_after
    assert f"quota: {2 * 64 * 64 + 100} output pixels per day for tenant t1 (SLIDESYNTH_QUOTA_PIXELS_PER_DAY)" \
        in exc.detail
    # a larger job needs both older entries gone: p2 ages out in 22 h
    with pytest.raises(QuotaExceeded) as refused:
        store.create(job("big", "t1", size=80), quota=quota)
    assert 22 * HOUR - 60 <= refused.value.retry_after <= 22 * HOUR + 1
    # a job larger than the whole budget never fits: no Retry-After
    with pytest.raises(QuotaExceeded) as refused:
        store.create(job("huge", "t1", size=128), quota=quota)
    assert refused.value.retry_after is None and "never" in refused.value.detail
    store.create(job("p3", "t2"), quota=quota)  # other tenants have their own budget
    age_ledger(store, "t1", "p1", 4 * HOUR + 1)  # p1 is now older than 24 h
    store.create(job("p3", "t1"), quota=quota)
    assert store.usage("t1")["pixels"] == 2 * 64 * 64
    assert store.get("p3") is not None


def test_a_job_that_never_started_gives_its_pixels_back_one_that_ran_does_not(store):
    quota = Quota(pixels_per_day=2 * 64 * 64)
    store.create(job("r1", "t1"), quota=quota)
    store.create(job("q1", "t1"), quota=quota)
    with pytest.raises(QuotaExceeded):
        store.create(job("q2", "t1"), quota=quota)
    # q1 canceled while queued: refunded
    assert store.transition("q1", {JobStatus.queued}, status=JobStatus.canceled, finished_at=time.time())
    assert store.usage("t1")["pixels"] == 64 * 64
    store.create(job("q2", "t1"), quota=quota)
    # r1 ran and was deleted afterwards: still counted (its GPU time was spent)
    store.transition("r1", {JobStatus.queued}, status=JobStatus.running, started_at=time.time())
    store.transition("r1", {JobStatus.running}, status=JobStatus.succeeded, finished_at=time.time())
    store.delete("r1")
    assert store.usage("t1")["pixels"] == 2 * 64 * 64
    with pytest.raises(QuotaExceeded):
        store.create(job("q3", "t1"), quota=quota)
    store.delete("q2")  # deleted before it ever ran (as the API does when the broker refuses it): refunded
    assert store.usage("t1")["pixels"] == 64 * 64


# ---------------------------------------------------------------------------------------------------- retention


def test_the_sweep_expires_only_jobs_finished_longer_ago_than_the_retention(store, tmp_path):
    from worker.retention import sweep

    now = time.time()
    for status in FINISHED:
        finished(store, f"old{status.value}", 200, status, now=now)
    finished(store, "recent", 100, now=now)  # finished 100 h ago, retention 168 h: kept
    store.create(job("queued", created_at=now - 1000 * HOUR))  # queued or running for ages: never touched
    store.create(job("running", created_at=now - 1000 * HOUR))
    store.transition("running", {JobStatus.queued}, status=JobStatus.running, started_at=now - 999 * HOUR)
    for job_id in ("queued", "running"):
        store.job_dir(job_id).mkdir(parents=True, exist_ok=True)
        (store.job_dir(job_id) / "mask.png").write_bytes(b"input")
        (store.job_dir(job_id) / "sampler_state.pt").write_bytes(b"state")
    settings = settings_for(tmp_path, retention_hours=168)

    result = sweep(store, settings, now=now)
    old = sorted(f"old{s.value}" for s in FINISHED)
    assert sorted(result.expired) == old and sorted(result.purged) == old
    for job_id in old:
        record = store.get(job_id)
        assert record.status == JobStatus.expired and record.expired_at == now
        assert record.outputs == {} and record.spec.embedding is None  # the vectors are dropped
        assert record.finished_at == pytest.approx(now - 200 * HOUR)
        assert files_left(store, job_id) == []
    assert store.get("oldfailed").started_at is not None
    assert store.get("recent").status == JobStatus.succeeded and "slide.tiff" in files_left(store, "recent")
    assert store.get("queued").status == JobStatus.queued and store.get("running").status == JobStatus.running
    assert files_left(store, "queued") == files_left(store, "running") == ["mask.png", "sampler_state.pt"]
    assert store.usage("public") | {"pixels": 0} == {"queued": 1, "running": 1, "pixels": 0}
    assert store.list("public", 0, 100)[1] == 6  # records stay
    # idempotent: nothing more to do, and a sweep past the recent one's time takes it too
    again = sweep(store, settings, now=now)
    assert again.expired == again.purged == again.deleted == []
    assert sweep(store, settings, now=now + 69 * HOUR).expired == ["recent"]
    # retention 0 keeps everything
    finished(store, "ancient", 10_000, now=now)
    assert sweep(store, settings_for(tmp_path, retention_hours=0), now=now).expired == []


def test_two_sweepers_at_once_expire_each_job_once_and_never_fail(store, tmp_path):
    from worker.retention import sweep

    now = time.time()
    ids = [f"s{i}" for i in range(24)]
    for job_id in ids:
        finished(store, job_id, 200, now=now)
    settings = settings_for(tmp_path, retention_hours=1)
    results, errors = [], []
    start = threading.Barrier(4)

    def run():
        own = another(store)
        start.wait()
        try:
            results.append(sweep(own, settings, now=now))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    expired = [job_id for r in results for job_id in r.expired]
    assert sorted(expired) == sorted(ids)  # each exactly once
    for job_id in ids:
        assert store.get(job_id).status == JobStatus.expired and files_left(store, job_id) == []
    assert store.purge_pending() == []


def test_a_sweeper_that_died_after_expiring_leaves_the_files_to_the_next_sweep(store, tmp_path):
    from worker.retention import sweep

    finished(store, "half", 200)
    # what a sweeper that died between the status change and the removal leaves
    assert store.transition("half", set(FINISHED), status=JobStatus.expired, expired_at=time.time())
    assert store.purge_pending() == ["half"] and "slide.tiff" in files_left(store, "half")
    result = sweep(store, settings_for(tmp_path, retention_hours=168))
    assert result.expired == [] and result.purged == ["half"]
    assert files_left(store, "half") == [] and store.purge_pending() == []


def test_expired_records_are_deleted_after_the_record_retention(store, tmp_path):
    from worker.retention import sweep

    now = time.time()
    finished(store, "older", 800, now=now)
    finished(store, "old", 300, now=now)
    settings = settings_for(tmp_path, retention_hours=168, record_retention_hours=720)
    result = sweep(store, settings, now=now)
    assert sorted(result.expired) == ["old", "older"] and result.deleted == ["older"]
    assert store.get("older") is None and not store.job_dir("older").exists()
    assert store.get("old").status == JobStatus.expired
    assert [j.id for j in store.list("public", 0, 10)[0]] == ["old"]


def test_settings_validate_limits_and_retention():
    from pydantic import ValidationError

    from core.settings import Settings

    s = Settings(quota_queued="4,t2:1", quota_running="t1:2", quota_pixels_per_day=1000)
    assert s.quota_for("t1") == Quota(running=2, queued=4, pixels_per_day=1000)
    assert s.quota_for("t2") == Quota(running=0, queued=1, pixels_per_day=1000)
    assert not Settings().quota_for("anyone").limited and Settings().retention_hours == 168
    for bad in ("x", "t1:", ":3", "-1", "²"):
        with pytest.raises(ValidationError, match="quota_queued"):
            Settings(quota_queued=bad)
    with pytest.raises(ValidationError, match="RECORD_RETENTION"):
        Settings(retention_hours=100, record_retention_hours=50)


# ---------------------------------------------------------------------------------------------------- the API


@pytest.fixture
def client(embedded_settings):
    from fastapi.testclient import TestClient

    from service.app import create_app

    settings = embedded_settings.model_copy(update={"retention_hours": 168.0, "quota_queued": "2",
                                                    "quota_pixels_per_day": "0,big:1000000"})
    app = create_app(settings)
    with TestClient(app) as c:
        c.settings, c.store = settings, app.state.services.store
        yield c


def test_an_expired_job_says_so_its_downloads_answer_410_and_delete_removes_it(client):
    from worker.retention import sweep

    now = time.time()
    finished(client.store, "gone1", 200, now=now)
    view = client.get("/jobs/gone1").json()
    assert view["status"] == "succeeded" and view["links"]["slide"] == "/jobs/gone1/slide.tiff"
    assert view["expires_at"].startswith(time.strftime("%Y-%m-%d", time.gmtime(now - 32 * HOUR)))
    assert sweep(client.store, client.settings, now=now).expired == ["gone1"]

    view = client.get("/jobs/gone1").json()
    assert view["status"] == "expired" and view["links"]["slide"] is None
    assert view["expires_at"] is not None and view["finished_at"] is not None
    assert client.get("/jobs").json()["items"][0]["status"] == "expired"
    for url in ("slide.tiff", "slide.dzi", "slide_files/0/0_0.jpeg", "thumbnail.png", "mask.png",
                "slide.zarr/", "slide.zarr/0/0.0"):
        resp = client.get(f"/jobs/gone1/{url}")
        assert resp.status_code == 410, (url, resp.text)
        assert "expired at" in resp.json()["detail"] and "SLIDESYNTH_RETENTION_HOURS" in resp.json()["detail"]
    assert client.head("/jobs/gone1/slide.tiff").status_code == 410
    assert client.delete("/jobs/gone1").status_code == 204
    assert client.get("/jobs/gone1").status_code == 404
    assert not client.store.job_dir("gone1").exists()


def test_a_download_whose_file_vanished_answers_410_or_404_not_500(client):
    """The sweep (or a DELETE) removing files between the record read and the open."""
    now = time.time()
    finished(client.store, "due", 200, now=now)  # past its retention, not swept yet
    finished(client.store, "fresh", 1, now=now)
    for job_id in ("due", "fresh"):
        for name in ("slide.tiff", "thumbnail.png"):
            (client.store.job_dir(job_id) / name).unlink()
        shutil.rmtree(client.store.job_dir(job_id) / "slide.zarr")
    for url in ("slide.tiff", "thumbnail.png", "slide.dzi", "slide_files/0/0_0.jpeg", "slide.zarr/",
                "slide.zarr/0/0.0"):
        resp = client.get(f"/jobs/due/{url}")
        assert resp.status_code == 410 and "being removed" in resp.json()["detail"], (url, resp.text)
        resp = client.get(f"/jobs/fresh/{url}")
        assert resp.status_code == 404, (url, resp.text)


def test_download_of_a_file_removed_after_the_response_was_made(tmp_path):
    """The response holds the file open from the start: a sweep removing it mid-answer does not cut it off."""
    import asyncio

    from service.routes.jobs import DownloadResponse

    path = tmp_path / "slide.tiff"
    payload = os.urandom(200_000)
    path.write_bytes(payload)

    def serve(headers=()):
        response = DownloadResponse(path, media_type="image/tiff")
        path.unlink()  # removed between the route's answer and the first byte
        sent = []

        async def receive():
            await asyncio.sleep(10)
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "headers": list(headers), "asgi": {"spec_version": "2.4"}}
        asyncio.run(response(scope, receive, send))
        path.write_bytes(payload)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    assert serve() == (200, payload)
    assert serve([(b"range", b"bytes=100-199")]) == (206, payload[100:200])
    assert serve([(b"range", b"bytes=0-9,20-29")])[0] == 206


def test_submissions_over_a_quota_are_429_and_store_nothing(client):
    def submit(size=64):
        return client.post("/generate", json={"conditioning": {"type": "subtype", "subtype": "LUAD"},
                                              "width": size, "height": size})

    first, second = submit(), submit()
    assert first.status_code == second.status_code == 202
    resp = submit()
    assert resp.status_code == 429 and resp.headers["retry-after"] == "30"
    assert resp.json()["detail"].startswith("quota: 2 queued jobs for tenant public (SLIDESYNTH_QUOTA_QUEUED)")
    jobs_dir = client.settings.data_dir / "jobs"
    assert sorted(p.name for p in jobs_dir.iterdir()) == sorted([first.json()["id"], second.json()["id"]])
    assert client.delete(f"/jobs/{first.json()['id']}").status_code == 200  # canceled: a place frees
    assert submit().status_code == 202


def test_the_contract_declares_410_and_429():
    import yaml

    spec = yaml.safe_load((REPO / "openapi.yaml").read_text())
    generate = spec["paths"]["/generate"]["post"]["responses"]
    assert "429" in generate and "Retry-After" in generate["429"]["headers"]
    for path in ("/jobs/{job_id}/slide.tiff", "/jobs/{job_id}/slide.dzi", "/jobs/{job_id}/thumbnail.png",
                 "/jobs/{job_id}/mask.png", "/jobs/{job_id}/slide.zarr/{path}",
                 "/jobs/{job_id}/slide_files/{level}/{tile}"):
        assert "410" in spec["paths"][path]["get"]["responses"], path
    assert "expired" in spec["components"]["schemas"]["Job"]["properties"]["status"]["enum"]


# ---------------------------------------------------------------------------------------------------- end to end


@pytest.fixture
def service(redis_url, key_prefix, tmp_path):
    """uvicorn serving the API, one real Celery worker, a real Redis; tenants t1, t2, t3."""
    with running_stack(redis_url, key_prefix, tmp_path, api_keys="t1:k1,t2:k2,t3:k3", quota_queued="3",
                       quota_running="t2:1", quota_pixels_per_day=f"t3:{2 * 64 * 64 + 100}", retention_hours="1",
                       retention_sweep_seconds="1") as stack:
        clients = {t: stack.new_client(**{"X-API-Key": f"k{t[1]}"}) for t in ("t1", "t2", "t3")}
        yield clients, RedisJobStore(redis_url, stack.data_dir, prefix=key_prefix), stack.logs


def _small(client, steps=2):
    return client.post("/generate", json={"conditioning": {"type": "subtype", "subtype": "LUAD"}, "width": 64,
                                          "height": 64, "steps": steps, "seed": 1})


def _status(client, job_id):
    return client.get(f"/jobs/{job_id}").json()["status"]


@pytest.mark.integration
def test_quotas_end_to_end_with_redis_and_a_worker(service):
    clients, store, logs = service
    t1, t2, t3 = clients["t1"], clients["t2"], clients["t3"]
    # t2's long job occupies the only worker process: what is submitted next stays queued
    resp = t2.post("/generate", files={"mask": ("m.png", png_bytes(make_mask(256, 256)), "image/png")},
                   data={"params": json.dumps({"steps": 400, "seed": 1})})
    assert resp.status_code == 202, resp.text
    blocker = resp.json()["id"]
    try:
        _wait(lambda: _status(t2, blocker) == "running", 120, "t2's job to start")
    except AssertionError:
        print((logs / "worker.log").read_text()[-4000:])
        raise
    # running limit (t2: 1), at submission
    resp = _small(t2)
    assert resp.status_code == 429, resp.text
    assert resp.json()["detail"].startswith("quota: 1 running jobs for tenant t2 (SLIDESYNTH_QUOTA_RUNNING)")
    assert int(resp.headers["retry-after"]) >= 1

    # queued limit (3 for everyone): up to it, then 429 naming it
    queued = [_small(t1).json()["id"] for _ in range(3)]
    assert all(_status(t1, j) == "queued" for j in queued)
    resp = _small(t1)
    assert resp.status_code == 429 and int(resp.headers["retry-after"]) >= 1
    assert resp.json()["detail"].startswith("quota: 3 queued jobs for tenant t1 (SLIDESYNTH_QUOTA_QUEUED)")
    assert t1.get("/jobs").json()["total"] == 3  # nothing stored for the refused one
    # other tenants are unaffected: t3 submits while t1 is full
    first = _small(t3)
    assert first.status_code == 202, first.text
    # cancel one of t1's → accepted again
    assert t1.delete(f"/jobs/{queued[0]}").status_code == 200
    again = _small(t1)
    assert again.status_code == 202, again.text
    queued = queued[1:] + [again.json()["id"]]
    assert _small(t1).status_code == 429

    # pixels per day (t3: two 64² jobs): the third is refused until the first ages out of the 24 h window
    second = _small(t3)
    assert second.status_code == 202
    resp = _small(t3)
    assert resp.status_code == 429, resp.text
    assert resp.json()["detail"].startswith(
        f"quota: {2 * 64 * 64 + 100} output pixels per day for tenant t3 (SLIDESYNTH_QUOTA_PIXELS_PER_DAY)")
    assert PIXEL_WINDOW_SECONDS - 120 <= int(resp.headers["retry-after"]) <= PIXEL_WINDOW_SECONDS
    # t1 (no pixel limit) is unaffected by t3's budget
    assert store.usage("t3")["pixels"] == 2 * 64 * 64 and store.usage("t1")["queued"] == 3
    # a job canceled before it started gives its pixels back
    assert t3.delete(f"/jobs/{first.json()['id']}").status_code == 200
    third = _small(t3)
    assert third.status_code == 202, third.text

    # concurrent submissions never exceed the limit: free t1's places, then 10 threads at once
    for job_id in queued:
        assert t1.delete(f"/jobs/{job_id}").status_code == 200
    codes, start = [], threading.Barrier(10)

    def submit():
        with httpx.Client(base_url=str(t1.base_url), timeout=60, headers={"X-API-Key": "k1"}) as own:
            start.wait()
            codes.append(_small(own).status_code)

    threads = [threading.Thread(target=submit) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [202] * 3 + [429] * 7, codes
    assert store.usage("t1")["queued"] == 3

    # the running job ends (canceled): t2 may submit again; counts never leak through deletes
    assert t2.delete(f"/jobs/{blocker}").status_code == 202
    _wait(lambda: _status(t2, blocker) == "canceled", 60, "t2's job to stop")
    resp = _small(t2)
    assert resp.status_code == 202, resp.text
    for c in (t1, t2, t3):
        for item in c.get("/jobs").json()["items"]:
            c.delete(f"/jobs/{item['id']}")  # cancel what is queued, delete what is finished
            if c.get(f"/jobs/{item['id']}").status_code == 200:
                _wait(lambda: _status(c, item["id"]) not in ("queued", "running"), 60, "the job to stop")
                assert c.delete(f"/jobs/{item['id']}").status_code == 204
    for tenant in ("t1", "t2", "t3"):
        assert store.usage(tenant)["queued"] == store.usage(tenant)["running"] == 0


@pytest.mark.integration
def test_retention_end_to_end_with_redis_and_a_worker(service):
    """The worker's sweep expires a job finished longer ago than SLIDESYNTH_RETENTION_HOURS while a client keeps
    downloading its slide: every answer is the whole slide or a 410, never a 500 or a cut-off body."""
    clients, store, logs = service
    t1 = clients["t1"]
    ids = [_small(t1).json()["id"] for _ in range(2)]
    try:
        for job_id in ids:
            _wait(lambda: _status(t1, job_id) == "succeeded", 300, "the jobs to succeed")
    except AssertionError:
        print((logs / "worker.log").read_text()[-4000:])
        raise
    old, recent = ids
    view = t1.get(f"/jobs/{old}").json()
    finished_at = store.get(old).finished_at
    assert view["expires_at"] == datetime_iso(finished_at + HOUR)
    whole = t1.get(f"/jobs/{old}/slide.tiff")
    assert whole.status_code == 200 and len(whole.content) > 1000

    seen, failures, stop = [], [], threading.Event()

    def download():
        with httpx.Client(base_url=str(t1.base_url), timeout=30, headers={"X-API-Key": "k1"}) as own:
            while not stop.is_set():
                try:
                    for headers in ({}, {"Range": "bytes=0-99"}):
                        resp = own.get(f"/jobs/{old}/slide.tiff", headers=headers)
                        seen.append(resp.status_code)
                        if resp.status_code == 200 and resp.content != whole.content:
                            failures.append("a cut-off or different body")
                        if resp.status_code == 410:
                            return
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    downloader = threading.Thread(target=download)
    downloader.start()
    try:
        _wait(lambda: len(seen) >= 4, 30, "the first downloads")
        store.update(old, finished_at=time.time() - 2 * HOUR)  # finished two hours ago: past the retention
        _wait(lambda: _status(t1, old) == "expired", 30, "the worker's sweep to expire the job")
        _wait(lambda: not downloader.is_alive(), 30, "the downloader to see the 410")
    finally:
        stop.set()
        downloader.join()
    assert failures == [] and set(seen) <= {200, 206, 410} and seen[-1] == 410, (failures, seen)
    resp = t1.get(f"/jobs/{old}/slide.tiff")
    assert resp.status_code == 410 and "expired at" in resp.json()["detail"]
    assert t1.get(f"/jobs/{old}/thumbnail.png").status_code == 410
    assert t1.get(f"/jobs/{old}").json()["status"] == "expired"
    assert not store.job_dir(old).exists()
    assert "expired" in (logs / "worker.log").read_text()
    # the recent one is kept through several sweeps
    time.sleep(3)
    assert _status(t1, recent) == "succeeded" and t1.get(f"/jobs/{recent}/slide.tiff").status_code == 200
    # DELETE of an expired job removes its record
    assert t1.delete(f"/jobs/{old}").status_code == 204 and t1.get(f"/jobs/{old}").status_code == 404


def datetime_iso(ts: float) -> str:
    from core.jobs import iso

    return iso(ts)


@pytest.mark.integration
def test_the_embedded_worker_sweeps_the_file_store(tmp_path):
    """No Redis: `slidesynth worker` on the file store (what `slidesynth serve` starts) expires old jobs too."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIDESYNTH_")}
    env.update(SLIDESYNTH_DATA_DIR=str(tmp_path / "data"), SLIDESYNTH_MODELS_DIR=str(tmp_path / "weights"),
               SLIDESYNTH_DEVICE="cpu", SLIDESYNTH_RETENTION_HOURS="24", SLIDESYNTH_RETENTION_SWEEP_SECONDS="1",
               PYTHONUNBUFFERED="1")
    store = FileJobStore(tmp_path / "data")
    finished(store, "old", 30)
    finished(store, "recent", 20)
    log = tmp_path / "worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "slidesynth.cli", "worker"], cwd=REPO, env=env,
                              stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        _wait(lambda: store.get("old").status == JobStatus.expired or worker.poll() is not None, 120,
              "the embedded worker to expire the old job")
        assert worker.poll() is None, log.read_text()[-3000:]
        _wait(lambda: files_left(store, "old") == [], 10, "the old job's files to go")
        finished(store, "later", 25)  # finished while the worker runs: the next sweep takes it
        _wait(lambda: store.get("later").status == JobStatus.expired, 30, "the next sweep")
        assert store.get("recent").status == JobStatus.succeeded and "slide.tiff" in files_left(store, "recent")
    finally:
        stop_processes(worker)


def test_the_redis_pixel_ledger_expires_with_its_window(redis_url, key_prefix, tmp_path):
    store = RedisJobStore(redis_url, tmp_path, prefix=key_prefix)
    try:
        store.create(job("l1", "t1"))
        for what in ("pixels", "pixel-sizes"):
            ttl = store.redis.ttl(f"{key_prefix}:tenant:t1:{what}")
            assert PIXEL_WINDOW_SECONDS - 60 <= ttl <= PIXEL_WINDOW_SECONDS, (what, ttl)
    finally:
        for key in store.redis.scan_iter(f"{key_prefix}:*"):
            store.redis.delete(key)
