"""GET /jobs/{id}/events (server-sent events) through the ASGI app served by a real uvicorn, read with httpx
streaming: on the file store of the embedded mode and on a real Redis. The job's writes are made through the real
stores, as a worker makes them (tests/test_e2e_events_webhooks.py runs a real worker)."""
from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from core.jobs import FileJobStore, JobRecord, JobSpec, JobStatus, RedisJobStore, Stage
from tests.conftest import free_port
from tests.webhook_helpers import sse_events, uvicorn_thread


def spec(**fields) -> JobSpec:
    return JobSpec(model="diffinfinite-untrained", engine="diffinfinite", conditioning="subtype", width=64, height=64,
                   mpp=0.5, seed=1, steps=5, guidance=1.0, subtype="adenocarcinoma", subtype_id=0, **fields)


def new_job(store, job_id: str, tenant: str = "public") -> JobRecord:
    job = JobRecord(id=job_id, tenant=tenant, spec=spec())
    store.job_dir(job_id).mkdir(parents=True, exist_ok=True)
    store.create(job)
    return job


def run_steps(store, job_id: str, steps: int, pause: float, finish: JobStatus = JobStatus.succeeded) -> None:
    """What a worker writes: running, one progress write per step, then the terminal status."""
    store.transition(job_id, {JobStatus.queued}, status=JobStatus.running, started_at=time.time(), total_steps=steps)
    for step in range(1, steps + 1):
        time.sleep(pause)
        store.update(job_id, stage=Stage.sampling, step=step, progress=round(step / (steps + 1), 4),
                     eta_seconds=float(steps - step), heartbeat_at=time.time())
    time.sleep(pause)
    store.transition(job_id, {JobStatus.running}, status=finish, finished_at=time.time(), progress=1.0,
                     eta_seconds=0.0)


def read_stream(base: str, job_id: str, headers=None, timeout: float = 60, stop_after: int | None = None):
    """(status, content type, the events and pings read until the stream ends)."""
    out = []
    with httpx.Client(base_url=base, timeout=timeout) as client:
        with client.stream("GET", f"/jobs/{job_id}/events", headers=headers or {}) as resp:
            if resp.status_code != 200:
                return resp.status_code, resp.headers.get("content-type"), []
            for event in sse_events(resp.iter_lines()):
                out.append(event)
                if stop_after is not None and len([e for e in out if e != "ping"]) >= stop_after:
                    break
            return resp.status_code, resp.headers["content-type"], out


def check_contract(events: list, get_json) -> list[dict]:
    """Every event is `event: job`, an integer id increasing, data the JSON of GET /jobs/{id}; returns the data."""
    real = [e for e in events if e != "ping"]
    ids = [int(e["id"]) for e in real]
    assert ids == sorted(set(ids)), ids
    assert all(e["event"] == "job" for e in real)
    datas = [json.loads(e["data"]) for e in real]
    assert set(datas[-1]) == set(get_json())  # the same fields as GET /jobs/{id}
    assert datas[-1] == get_json()  # the last event is the final state, as GET shows it
    return datas


@pytest.fixture
def embedded(embedded_settings):
    from service.app import create_app

    embedded_settings.events_ping_seconds = 0.5
    embedded_settings.api_keys = "lab-a:key-a,lab-b:key-b"
    app = create_app(embedded_settings)
    with uvicorn_thread(app, free_port()) as base:
        yield base, app.state.services.store


def test_file_store_stream_first_state_changes_pings_and_end(embedded):
    base, store = embedded
    assert isinstance(store, FileJobStore)
    key_a = {"X-API-Key": "key-a"}
    job = new_job(store, "feed01", tenant="lab-a")
    writer = threading.Thread(target=run_steps, args=(store, job.id, 4, 1.2))
    # writes 1.2 s apart: pings (every 0.5 s) keep the stream open between them
    status, ctype, events = None, None, None

    def get_json():
        return httpx.get(f"{base}/jobs/{job.id}", headers=key_a).json()

    started = time.time()
    with httpx.Client(base_url=base, timeout=30) as client:
        with client.stream("GET", f"/jobs/{job.id}/events", headers=key_a) as resp:
            status, ctype = resp.status_code, resp.headers["content-type"]
            assert resp.headers["cache-control"] == "no-cache"
            events = []
            for event in sse_events(resp.iter_lines()):
                events.append(event)
                if len(events) == 1:
                    writer.start()
    assert status == 200 and ctype.startswith("text/event-stream")
    datas = check_contract(events, get_json)
    assert datas[0]["status"] == "queued" and datas[0]["progress"] == 0.0  # the first event: the current state
    steps = [d["step"] for d in datas if d["status"] == "running" and d["step"] is not None]
    assert steps == [1, 2, 3, 4]  # polled every 0.4 s, writes 1.2 s apart: each step seen
    progress = [d["progress"] for d in datas]
    assert progress == sorted(progress)
    assert datas[-1]["status"] == "succeeded" and datas[-1]["progress"] == 1.0
    assert "ping" in events
    assert time.time() - started < 20
    writer.join()

    # the client had the terminal event: nothing more will ever come — 204, which stops EventSource reconnecting
    last = max(int(e["id"]) for e in events if e != "ping")
    assert read_stream(base, job.id, {**key_a, "Last-Event-ID": str(last)})[0] == 204
    # an id the file store cannot resume from (it keeps no history): the current state, then the end
    for stale in ("1", "999999", "not-a-number"):
        status, _, again = read_stream(base, job.id, {**key_a, "Last-Event-ID": stale})
        assert status == 200 and [json.loads(e["data"])["status"] for e in again] == ["succeeded"]
        assert int(again[0]["id"]) == last


def test_stream_tenants_and_unknown_jobs(embedded):
    base, store = embedded
    job = new_job(store, "feed02", tenant="lab-a")
    assert read_stream(base, job.id, {"X-API-Key": "key-b"})[0] == 404  # another tenant's job: 404, as GET
    assert read_stream(base, "0123456789abcdef", {"X-API-Key": "key-a"})[0] == 404
    assert read_stream(base, "..%2Fetc", {"X-API-Key": "key-a"})[0] == 404
    assert read_stream(base, job.id)[0] == 401
    # a canceled queued job: one event, canceled, and the end
    assert httpx.delete(f"{base}/jobs/{job.id}", headers={"X-API-Key": "key-a"}).status_code == 200
    status, _, events = read_stream(base, job.id, {"X-API-Key": "key-a"})
    assert status == 200 and [json.loads(e["data"])["status"] for e in events] == ["canceled"]


@pytest.fixture
def redis_app(redis_url, key_prefix, embedded_settings):
    import redis

    from service.app import create_app

    embedded_settings.broker_url = redis_url
    embedded_settings.key_prefix = key_prefix
    embedded_settings.queue = key_prefix
    embedded_settings.events_ping_seconds = 15.0
    app = create_app(embedded_settings)
    try:
        with uvicorn_thread(app, free_port()) as base:
            yield base, app.state.services.store, app.state.services
    finally:
        r = redis.Redis.from_url(redis_url)
        for key in r.scan_iter(f"{key_prefix}*"):
            r.delete(key)


def test_redis_store_writes_bump_the_sequence_and_append_snapshots(redis_url, key_prefix, tmp_path):
    import redis

    from core.jobs import event_channel, event_stream_key

    store = RedisJobStore(redis_url, tmp_path, prefix=key_prefix)
    r = redis.Redis.from_url(redis_url)
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(event_channel(key_prefix))
    try:
        job = new_job(store, "seq01")
        assert store.get(job.id).event_seq == 0
        store.update(job.id, progress=0.25, step=1)
        assert r.ttl(event_stream_key(key_prefix, job.id)) > 2 * 24 * 3600  # active: longer than any job
        assert not store.transition(job.id, {JobStatus.running}, status=JobStatus.failed)  # not applied: no event
        assert store.transition(job.id, {JobStatus.queued}, status=JobStatus.canceled, finished_at=1.0)
        store.update("nosuchjob", progress=0.5)  # a write to no job creates nothing
        assert store.get(job.id).event_seq == 2
        entries = r.xrange(event_stream_key(key_prefix, job.id))
        assert [e[0] for e in entries] == [b"0-1", b"0-2"]
        assert b"spec" not in entries[0][1] and json.loads(entries[0][1][b"progress"]) == 0.25
        assert json.loads(entries[1][1][b"status"]) == "canceled"
        assert 3500 < r.ttl(event_stream_key(key_prefix, job.id)) <= 3600  # finished: kept an hour for resumes
        messages = []
        deadline = time.time() + 5
        while len(messages) < 2 and time.time() < deadline:
            message = pubsub.get_message(timeout=0.5)
            if message:
                messages.append(message["data"])
        assert messages == [b"seq01 1", b"seq01 2"]
        assert not r.exists(event_stream_key(key_prefix, "nosuchjob"))
        store.delete(job.id)
        assert not r.exists(event_stream_key(key_prefix, job.id))
        assert store.running() == []  # the stream keys are not mistaken for jobs
    finally:
        pubsub.close()
        for key in r.scan_iter(f"{key_prefix}*"):
            r.delete(key)


def test_redis_stream_resumes_with_last_event_id(redis_app):
    base, store, _ = redis_app
    job = new_job(store, "resume01")
    run_steps(store, job.id, 6, 0.0)  # the whole job happens before anyone listens

    def get_json():
        return httpx.get(f"{base}/jobs/{job.id}").json()

    status, ctype, events = read_stream(base, job.id)
    assert status == 200 and ctype.startswith("text/event-stream")
    assert len(events) == 1 and json.loads(events[0]["data"]) == get_json()  # the current (terminal) state
    final = int(events[0]["id"])
    assert final == 8  # running, 6 steps, succeeded
    # resume after event 3 (step 2): exactly the later events, in order, from the stream's history
    status, _, later = read_stream(base, job.id, {"Last-Event-ID": "3"})
    datas = check_contract(later, get_json)
    assert [int(e["id"]) for e in later] == [4, 5, 6, 7, 8]
    assert [d["step"] for d in datas] == [3, 4, 5, 6, 6] and datas[-1]["status"] == "succeeded"
    assert read_stream(base, job.id, {"Last-Event-ID": str(final)})[0] == 204
    # ids the stream no longer holds (trimmed here by hand) or never had: the current state
    import redis

    from core.jobs import event_stream_key

    redis.Redis.from_url(store.url).xtrim(event_stream_key(store.prefix, job.id), minid="0-6", approximate=False)
    for stale in ("2", "42"):
        status, _, again = read_stream(base, job.id, {"Last-Event-ID": stale})
        assert [int(e["id"]) for e in again] == [final]


def test_redis_live_stream_and_many_streams_share_one_connection(redis_app, redis_url):
    import redis

    from core.jobs import event_channel

    base, store, services = redis_app
    job = new_job(store, "live01")
    other = new_job(store, "live02")
    r = redis.Redis.from_url(redis_url)
    n_streams = 60

    def channel_subscribers() -> int:
        return dict(r.pubsub_numsub(event_channel(store.prefix)))[event_channel(store.prefix).encode()]

    async def follow_many():
        limits = httpx.Limits(max_connections=n_streams + 5)
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits) as client:
            async def one(job_id, ready):
                got = []
                async with client.stream("GET", f"/jobs/{job_id}/events") as resp:
                    assert resp.status_code == 200
                    async for line in resp.aiter_lines():
                        if line.startswith("data: "):
                            got.append(json.loads(line[6:]))
                            if len(got) == 1:
                                ready.set()
                return got

            readies = [asyncio.Event() for _ in range(n_streams)]
            tasks = [asyncio.create_task(one(job.id if i % 2 == 0 else other.id, readies[i]))
                     for i in range(n_streams)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in readies)), 60)
            # every stream open: the API holds one pub/sub subscription for all of them (once its listener has
            # subscribed, which it does beside the streams' first events)
            numsub = channel_subscribers()
            deadline = time.time() + 10
            while numsub == 0 and time.time() < deadline:
                await asyncio.sleep(0.05)
                numsub = channel_subscribers()
            writers = [threading.Thread(target=run_steps, args=(store, j, 5, 0.15)) for j in (job.id, other.id)]
            for w in writers:
                w.start()
            results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
            for w in writers:
                w.join()
            return numsub, results

    numsub, results = asyncio.run(follow_many())
    assert numsub == 1
    for datas in results:
        assert datas[0]["status"] == "queued" and datas[-1]["status"] == "succeeded"
        # every write is an event (the stream keeps each snapshot, even those the reader was too slow for)
        assert [d["step"] for d in datas if d["status"] == "running"] == [None, 1, 2, 3, 4, 5]
    # each snapshot's data was made once for all 30 streams of its job, not once per stream
    distinct = {(d["id"], json.dumps(d, sort_keys=True)) for datas in results for d in datas}
    assert services.event_data.misses <= len(distinct) + 4, (services.event_data.misses, len(distinct))
    # all closed: the listener let go of its subscription
    deadline = time.time() + 5
    while channel_subscribers() and time.time() < deadline:
        time.sleep(0.1)
    assert channel_subscribers() == 0


@pytest.mark.parametrize("processes", [1, 2])
def test_a_stopping_server_ends_its_open_streams(tmp_path, processes):
    """SIGTERM to `slidesynth serve` (one HTTP process, or several under uvicorn's supervisor) with a stream open on a
    job that will not end: the stream closes and the server exits within seconds (uvicorn's graceful shutdown would
    otherwise wait for the job)."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIDESYNTH_")}
    env.update(SLIDESYNTH_DATA_DIR=str(tmp_path / "data"), SLIDESYNTH_MODELS_DIR=str(tmp_path / "weights"),
               SLIDESYNTH_EVENTS_PING_SECONDS="1")
    port = free_port()
    api = subprocess.Popen([sys.executable, "-m", "slidesynth.cli", "serve", "--port", str(port), "--no-worker",
                            "--processes", str(processes), "--log-level", "warning"], cwd=REPO, env=env,
                           stdout=subprocess.DEVNULL,
                           stderr=subprocess.STDOUT)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        deadline = time.time() + 60
        while True:
            try:
                client.get("/healthz")
                break
            except httpx.HTTPError:
                assert time.time() < deadline and api.poll() is None, "the API did not start"
                time.sleep(0.2)
        resp = client.post("/generate", json={"conditioning": {"type": "subtype", "subtype": "LUAD"}, "width": 64,
                                              "height": 64})
        job_id = resp.json()["id"]  # queued for good: no worker runs
        with client.stream("GET", f"/jobs/{job_id}/events") as stream:
            lines = stream.iter_lines()
            assert next(lines) == "event: job"
            api.send_signal(signal.SIGTERM)
            stopped = time.time()
            for line in lines:  # ends when the server closes the stream (pings come every second meanwhile)
                assert line in ("", ": ping") or line.startswith(("id:", "data:")), line
                assert time.time() - stopped < 10, "the stream outlived the server's shutdown"
        api.wait(timeout=15)
        assert time.time() - stopped < 10
    finally:
        if api.poll() is None:
            api.kill()


def test_rendered_events_are_made_once_per_snapshot_and_bounded():
    from core.events import RenderedEvents

    calls = []

    def render(record):
        calls.append((record.id, record.event_seq))
        return f"{record.id}:{record.event_seq}"

    cache = RenderedEvents(render, size=3)
    a1, a2, b1 = (JobRecord(id=i, spec=spec(), event_seq=n) for i, n in (("a", 1), ("a", 2), ("b", 1)))
    assert [cache(r) for r in (a1, a1, a2, b1, a2)] == ["a:1", "a:1", "a:2", "b:1", "a:2"]
    assert calls == [("a", 1), ("a", 2), ("b", 1)] and cache.misses == 3
    cache(JobRecord(id="c", spec=spec(), event_seq=1))  # a fourth entry pushes out the oldest
    cache(a1)
    assert calls[-1] == ("a", 1) and cache.misses == 5
