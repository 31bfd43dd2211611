"""Both job stores behave the same: a real Redis for RedisJobStore, real files for FileJobStore."""
from __future__ import annotations

import threading

import pytest

from core.jobs import FileJobStore, JobRecord, JobSpec, JobStatus, RedisJobStore, Stage

SPEC = JobSpec(model="m", engine="diffinfinite", conditioning="mask", width=64, height=64, mpp=0.5, seed=1,
               steps=3, guidance=3.0)


@pytest.fixture(params=["redis", "file"])
def store(request, tmp_path, key_prefix):
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        s = RedisJobStore(url, tmp_path, prefix=key_prefix)
        yield s
        for key in s.redis.scan_iter(f"{key_prefix}:*"):
            s.redis.delete(key)
    else:
        yield FileJobStore(tmp_path)


def test_create_get_update(store):
    store.create(JobRecord(id="a1", spec=SPEC, created_at=100.0))
    job = store.get("a1")
    assert job.status == JobStatus.queued and job.spec == SPEC and job.created_at == 100.0
    store.update("a1", stage=Stage.sampling, progress=0.25, step=2, outputs={"tiff": "slide.tiff"})
    job = store.get("a1")
    assert (job.stage, job.progress, job.step, job.outputs) == (Stage.sampling, 0.25, 2, {"tiff": "slide.tiff"})
    assert store.get("missing") is None


def test_transition_is_conditional(store):
    store.create(JobRecord(id="b1", spec=SPEC))
    assert store.transition("b1", {JobStatus.queued}, status=JobStatus.running, attempts=1)
    assert not store.transition("b1", {JobStatus.queued}, status=JobStatus.canceled)
    assert store.get("b1").status == JobStatus.running
    assert not store.transition("nope", {JobStatus.queued}, status=JobStatus.running)


def test_concurrent_transitions_only_one_wins(store):
    store.create(JobRecord(id="c1", spec=SPEC))
    wins = []

    def claim(name):
        if store.transition("c1", {JobStatus.queued}, status=JobStatus.running, worker=name):
            wins.append(name)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and store.get("c1").worker == wins[0]


def test_list_is_per_tenant_newest_first_paginated(store):
    for i in range(5):
        store.create(JobRecord(id=f"j{i}", tenant="lab", spec=SPEC, created_at=1000.0 + i))
    store.create(JobRecord(id="other", tenant="else", spec=SPEC, created_at=2000.0))
    jobs, total = store.list("lab", 0, 2)
    assert total == 5 and [j.id for j in jobs] == ["j4", "j3"]
    jobs, _ = store.list("lab", 4, 10)
    assert [j.id for j in jobs] == ["j0"]
    store.delete("j4")
    assert store.list("lab", 0, 10)[1] == 4 and store.get("j4") is None


def test_cancel_flag(store):
    store.create(JobRecord(id="d1", spec=SPEC))
    assert not store.cancel_requested("d1")
    store.request_cancel("d1")
    assert store.cancel_requested("d1") and store.get("d1").cancel_requested


def test_job_dir_rejects_traversal(store):
    with pytest.raises(ValueError):
        store.job_dir("../etc")


def test_transition_with_expected_claim(store):
    store.create(JobRecord(id="f1", spec=SPEC))
    assert store.transition("f1", {JobStatus.queued}, status=JobStatus.running, claim="run-1")
    assert store.transition("f1", {JobStatus.running}, status=JobStatus.running, claim="run-2")  # a redelivery
    # The first run no longer holds the claim: it cannot finish the job.
    assert not store.transition("f1", {JobStatus.running}, expect={"claim": "run-1"}, status=JobStatus.succeeded)
    assert store.transition("f1", {JobStatus.running}, expect={"claim": "run-2"}, status=JobStatus.succeeded)
    assert store.get("f1").status == JobStatus.succeeded


def test_updates_never_resurrect_deleted_jobs(store):
    store.create(JobRecord(id="g1", spec=SPEC))
    store.delete("g1")
    store.update("g1", progress=0.5)
    store.request_cancel("g1") if isinstance(store, RedisJobStore) else None
    assert store.get("g1") is None
    assert not store.transition("g1", {JobStatus.queued}, status=JobStatus.running)


def test_running_lists_only_running_jobs(store):
    store.create(JobRecord(id="h1", spec=SPEC))
    store.create(JobRecord(id="h2", spec=SPEC))
    store.transition("h2", {JobStatus.queued}, status=JobStatus.running)
    assert [j.id for j in store.running()] == ["h2"]
