"""Priorities and idempotency on the Redis path: real Redis, the API served by uvicorn, real Celery worker
processes (``slidesynth worker``), HTTP requests. Jobs are tiny (64² mask, 2 steps, the untrained model)."""
from __future__ import annotations

import json
import socket
import subprocess
import threading
import time

import httpx
import pytest

from tests.conftest import make_mask, png_bytes
from tests.services import Stack, wait_for as _wait

pytestmark = pytest.mark.integration

MASK = png_bytes(make_mask(64, 64))


class Deployment(Stack):
    """The API (no worker of its own) on a free port; workers started by the test."""

    def __init__(self, redis_url: str, prefix: str, tmp_path):
        super().__init__(redis_url, prefix, tmp_path, recovery_seconds="2")
        self.start_api()

    def job(self, job_id: str) -> dict:
        return self.client.get(f"/jobs/{job_id}").json()

    def submit(self, priority: str | None, seed: int, **headers) -> httpx.Response:
        params = {"steps": 2, "seed": seed, **({"priority": priority} if priority else {})}
        return self.client.post("/generate", files={"mask": ("m.png", MASK, "image/png")},
                                data={"params": json.dumps(params)}, headers=headers)

    def queued_ids(self, queue: str) -> list[str]:
        """Task ids (= job ids) of the messages waiting in a queue's Redis list."""
        return [json.loads(raw)["headers"]["id"] for raw in self.redis().lrange(queue, 0, -1)]


@pytest.fixture
def deployment(redis_url, key_prefix, tmp_path):
    d = Deployment(redis_url, key_prefix, tmp_path)
    try:
        d.wait_healthy()
        yield d
    finally:
        d.close()


def test_high_jobs_start_before_queued_low_ones(deployment):
    """Jobs queued before any worker runs: three low, a normal, then two high ones. One worker with concurrency 1
    takes both high jobs first, then the normal one, then the low ones in the order they came. (Kombu's default
    round robin would take high, normal, low, high, …: the second high job tells them apart.)"""
    d, q = deployment, deployment.prefix
    order = [("low", 1), ("low", 2), ("low", 3), (None, 4), ("high", 5), ("high", 6)]
    ids = []
    for priority, seed in order:
        resp = d.submit(priority, seed)
        assert resp.status_code == 202, resp.text
        ids.append(resp.json()["id"])
    low1, low2, low3, normal, high1, high2 = ids
    priorities = ["low", "low", "low", "normal", "high", "high"]
    # each waits in its priority's Redis list; normal keeps the queue's own name
    assert d.queued_ids(f"{q}.low") == [low3, low2, low1]  # LPUSH: the oldest at the right, taken first
    assert d.queued_ids(q) == [normal] and d.queued_ids(f"{q}.high") == [high2, high1]
    assert [d.job(i)["priority"] for i in ids] == priorities

    d.start_worker()  # default queues, SLIDESYNTH_WORKER_CONCURRENCY=1

    def all_done():
        jobs = [d.job(i) for i in ids]
        return jobs if all(j["status"] in ("succeeded", "failed", "canceled") for j in jobs) else None

    try:
        jobs = _wait(all_done, 300, "the six jobs to finish", interval=0.5)
    except AssertionError:
        print(d.log("worker"))
        raise
    assert [j["status"] for j in jobs] == ["succeeded"] * 6, [j["error"] for j in jobs]
    started = {job_id: j["started_at"] for job_id, j in zip(ids, jobs)}
    assert sorted(ids, key=started.get) == [high1, high2, normal, low1, low2, low3], started
    listing = {j["id"]: j["priority"] for j in d.client.get("/jobs").json()["items"]}
    assert listing == dict(zip(ids, priorities))


def test_recovery_requeues_a_job_on_its_priority_queue(deployment):
    """A job left running by a dead process goes back on the queue it was sent to. The worker here consumes only
    the embed queue, so the re-queued messages stay where recovery put them."""
    d, q = deployment, deployment.prefix
    high = d.submit("high", 1).json()["id"]
    low = d.submit("low", 2).json()["id"]
    assert d.queued_ids(f"{q}.high") == [high] and d.queued_ids(f"{q}.low") == [low]
    d.redis().delete(f"{q}.high", f"{q}.low")  # their messages are gone (a run took them, then its process died)
    dead = subprocess.Popen(["true"])
    dead.wait()
    for job_id in (high, low):
        stuck = {"status": "running", "worker": f"{socket.gethostname()}/{dead.pid}", "claim": "lost-run",
                 "heartbeat_at": time.time(), "attempts": 1}
        d.redis().hset(f"{q}:job:{job_id}", mapping={k: json.dumps(v) for k, v in stuck.items()})
    d.start_worker("--queues", f"{q}.embed")
    try:
        _wait(lambda: d.queued_ids(f"{q}.high") == [high] and d.queued_ids(f"{q}.low") == [low], 120,
              "the worker to re-queue both jobs")
    except AssertionError:
        print(d.log("worker"))
        raise
    assert d.queued_ids(q) == []
    assert d.job(high)["status"] == d.job(low)["status"] == "queued"
    assert (d.job(high)["priority"], d.job(low)["priority"]) == ("high", "low")


def test_concurrent_requests_with_one_key_make_one_job(deployment):
    """Eight clients send one request with one Idempotency-Key at once to the served API (Redis keys): one job,
    one message; every answer names it."""
    d = deployment
    barrier, answers = threading.Barrier(8), []

    def post():
        with httpx.Client(base_url=str(d.client.base_url), timeout=30) as c:
            barrier.wait()
            resp = c.post("/generate", files={"mask": ("m.png", MASK, "image/png")},
                          data={"params": json.dumps({"steps": 2, "seed": 7, "priority": "high"})},
                          headers={"Idempotency-Key": "replicate-prediction-42"})
            answers.append((resp.status_code, resp.json().get("id"), resp.headers.get("location")))

    threads = [threading.Thread(target=post) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(code for code, _, _ in answers) == [200] * 7 + [202], answers
    job_id = answers[0][1]
    assert {(i, loc) for _, i, loc in answers} == {(job_id, f"/jobs/{job_id}")}
    assert d.client.get("/jobs").json()["total"] == 1
    assert d.queued_ids(f"{d.prefix}.high") == [job_id]
    other = d.client.post("/generate", files={"mask": ("m.png", MASK, "image/png")},
                          data={"params": json.dumps({"steps": 3, "seed": 7, "priority": "high"})},
                          headers={"Idempotency-Key": "replicate-prediction-42"})
    assert other.status_code == 409 and "different request body" in other.json()["detail"]
    assert d.queued_ids(f"{d.prefix}.high") == [job_id]
