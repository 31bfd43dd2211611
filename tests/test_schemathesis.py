"""Schemathesis: the committed contract (openapi.yaml) fuzzed against the real app, at a bounded size.

Every schemathesis phase (coverage, fuzzing, stateful along the contract's links) and every check but the ones
``bench.schemathesis_full.CHECKS`` / ``OPERATIONS_CONFIG`` narrow, each with its reason: no 5xx, status codes,
content types, headers and bodies as documented, invalid data refused, valid data accepted, the API key enforced.
The app runs with API keys on and schemathesis sends the key, in the embedded mode (file job store) and with
Redis; no worker runs, jobs stay queued in a temporary data dir (and a Redis key prefix of their own, removed
afterwards). Passes on a succeeded, a failed and an expired job (``seed_jobs``) fuzz the downloads against real
files. A fixed seed and ``derandomize``: the same requests every run (but for the job ids the service draws, which
schemathesis reuses). ``python -m bench.schemathesis_full`` runs the same at a larger size.
"""
from __future__ import annotations

import collections
import os

import pytest

from bench import schemathesis_full as st_run


def _tree_bytes(folder) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _check(report: st_run.Report, min_requests: int) -> None:
    print(f"{report.total_requests} requests in {report.seconds:.1f} s\n{st_run.table(report)}")  # pytest -rP
    problems = report.problems()
    assert not problems, f"{len(problems)} problems in {report.total_requests} requests:\n\n" + "\n\n".join(problems)
    assert report.server_errors == 0
    assert report.total_requests >= min_requests, st_run.table(report)
    # the key got every operation past the 401: each one answered something else at least once
    answered = collections.defaultdict(set)
    for (operation, status), _ in report.requests.items():
        answered[operation].add(status)
    for operation in report.operations:
        assert answered[operation] - {401}, f"{operation} answered only {answered[operation]}\n{st_run.table(report)}"
    # valid submissions were made (steered masks and subtypes, the contract's example), and stateful testing
    # followed their links to the jobs
    assert any(s in (200, 202) for s in answered["POST /generate"]), st_run.table(report)
    assert 200 in answered["GET /jobs/{job_id}"], st_run.table(report)
    assert report.phases.get("stateful", "").startswith("success"), report.phases
    # the passes on the seeded jobs: the downloads answered from real files (whole and ranged), and 410 expired
    for operation in ("GET /jobs/{job_id}/slide.tiff", "GET /jobs/{job_id}/thumbnail.png",
                      "GET /jobs/{job_id}/mask.png", "HEAD /jobs/{job_id}/slide.tiff"):
        assert {200, 206, 409, 410} <= answered[operation], (operation, answered[operation])
    assert {200, 410} <= answered["GET /jobs/{job_id}/slide.dzi"], answered["GET /jobs/{job_id}/slide.dzi"]
    for operation in ("GET /jobs/{job_id}/slide_files/{level}/{tile}", "GET /jobs/{job_id}/slide.zarr/{path}"):
        assert {200, 404, 410} <= answered[operation], (operation, answered[operation])  # 404: no such tile, file


@pytest.fixture
def clean_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SLIDESYNTH_"):
            monkeypatch.delenv(key)


@pytest.mark.slow
def test_contract_fuzzed_in_embedded_mode(tmp_path, clean_env):
    from service.app import create_app

    settings = st_run.settings_for(tmp_path / "data")
    app = create_app(settings)
    report = st_run.run(app, max_examples=50, jobs=st_run.seed_jobs(app), **st_run.installed(settings))
    _check(report, min_requests=3000)
    # many submissions, no worker: jobs stay queued (or canceled by DELETE), a few KB each in the temporary dir
    jobs, total = app.state.services.store.list(st_run.TENANT, 0, 1000)
    # submissions got through (how many varies: the fuzzer also sends Idempotency-Key values, and a repeated
    # key replays a job (200) or is refused with another body (409); DELETE removes some), and with no worker
    # they stay queued or canceled
    assert total >= 1 and {j.status.value for j in jobs} <= {"queued", "canceled", "succeeded", "failed", "expired"}
    assert _tree_bytes(tmp_path / "data") < 50 * 1024 * 1024


@pytest.mark.integration
def test_contract_fuzzed_with_redis(tmp_path, clean_env, redis_url, key_prefix):
    import redis

    from service.app import create_app

    settings = st_run.settings_for(tmp_path / "data", redis_url, key_prefix)
    try:
        app = create_app(settings)
        report = st_run.run(app, max_examples=25, jobs=st_run.seed_jobs(app), **st_run.installed(settings))
        _check(report, min_requests=1500)
        # the submissions wait on the run's own queues, where no worker takes them
        r = redis.Redis.from_url(redis_url)
        assert sum(r.llen(f"{key_prefix}{suffix}") for suffix in ("", ".high", ".low")) >= 1
    finally:
        st_run.cleanup_redis(settings)
    assert not list(redis.Redis.from_url(redis_url).scan_iter(f"{key_prefix}*"))
