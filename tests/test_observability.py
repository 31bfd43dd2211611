"""Metrics and logs, piece by piece (tests/test_observability_e2e.py runs them through real processes):
the JSON and text formats, the job context, redaction, route templates and real statuses in the HTTP metrics,
the job store's figures read at scrape time (real Redis), and prometheus_client's multiprocess mode as the
launchers set it up (real processes)."""
from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import textwrap
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, free_port, make_mask, png_bytes


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) → value."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(parsed: dict, name: str, **labels) -> float | None:
    return parsed.get((name, tuple(sorted(labels.items()))))


class Capture(logging.Handler):
    """The records that reach a handler with the service's filters, and their formatted lines."""

    def __init__(self, formatter: logging.Formatter, secrets: list[str] | None = None):
        from core.logs import ContextFilter, RedactFilter

        super().__init__(logging.DEBUG)
        self.addFilter(ContextFilter())
        self.addFilter(RedactFilter(secrets or []))
        self.setFormatter(formatter)
        self.records: list[logging.LogRecord] = []
        self.lines: list[str] = []

    def emit(self, record):
        self.records.append(record)
        self.lines.append(self.format(record))


@pytest.fixture
def capture():
    from core.logs import JsonFormatter

    root = logging.getLogger()
    handlers = []

    def install(formatter=None, secrets=None) -> Capture:
        handler = Capture(formatter or JsonFormatter(), secrets)
        root.addHandler(handler)
        handlers.append(handler)
        return handler

    level = root.level
    root.setLevel(logging.DEBUG)
    yield install
    root.setLevel(level)
    for handler in handlers:
        root.removeHandler(handler)


# --- log lines -------------------------------------------------------------------------------------------------

def test_json_lines_carry_the_job_and_tenant_only_inside_the_job_context(capture):
    from core import logs

    cap = capture()
    log = logging.getLogger("slidesynth.test")
    log.info("before")
    with logs.job_context(job_id="job123"):
        logs.set_context(tenant="lab-a")
        log.warning("inside %s", "it", extra={"figure": 3})
        try:
            raise RuntimeError("boom\nsecond line")
        except RuntimeError:
            log.exception("failed")
    log.info("after")
    lines = [json.loads(line) for line in cap.lines]
    assert all("\n" not in line for line in cap.lines)  # one object per line, whatever the message holds
    assert [x["message"] for x in lines] == ["before", "inside it", "failed", "after"]
    for line in lines:
        assert set(line) >= {"time", "level", "logger", "message", "pid"}
        assert line["logger"] == "slidesynth.test" and line["time"].endswith("+00:00")
    assert "job_id" not in lines[0] and "tenant" not in lines[0] and "job_id" not in lines[3]
    assert lines[1]["job_id"] == lines[2]["job_id"] == "job123" and lines[1]["tenant"] == "lab-a"
    assert lines[1]["level"] == "WARNING" and lines[1]["figure"] == 3
    assert "RuntimeError: boom\nsecond line" in lines[2]["exception"]


def test_text_lines_end_with_the_job_and_tenant(capture):
    from core import logs

    cap = capture(logs.TextFormatter())
    with logs.job_context(job_id="abc", tenant="t9"):
        logging.getLogger("slidesynth.test").info("sampling")
    assert cap.lines[0].endswith("INFO slidesynth.test [MainProcess] sampling job_id=abc tenant=t9")


def test_threads_of_a_request_share_its_context(capture):
    """FastAPI runs sync dependencies (the API key check) in threads with a copy of the context: the tenant
    they learn reaches the request's own lines."""
    import contextvars
    import threading

    from core import logs

    cap = capture()
    with logs.job_context(job_id="j1"):
        copy = contextvars.copy_context()
        t = threading.Thread(target=copy.run, args=(logs.set_context,), kwargs={"tenant": "lab-b"})
        t.start()
        t.join()
        logging.getLogger("x").info("done")
    assert json.loads(cap.lines[0])["tenant"] == "lab-b"


def test_celery_lines_about_a_job_task_name_the_job(capture):
    cap = capture()
    logging.getLogger("celery.worker.strategy").info(
        "Task %(name)s[%(id)s] received", {"name": "slidesynth.generate", "id": "j77"},
        extra={"data": {"name": "slidesynth.generate", "id": "j77"}})
    logging.getLogger("celery.worker.strategy").info("other", extra={"data": {"name": "slidesynth.embed", "id": "e"}})
    first, second = (json.loads(line) for line in cap.lines)
    assert first["job_id"] == "j77" and "job_id" not in second


def test_secrets_and_url_passwords_are_redacted_everywhere(capture):
    from core import logs
    from core.settings import Settings

    settings = Settings(api_keys="lab:k3y-abcdef,other:zz-987654", broker_url="redis://:pa55word-x@redis:6379/0",
                        redis_url="rediss://user:an0ther-pw@r2:6380/1", _env_file=None)
    secrets = logs.secrets_of(settings)
    assert set(secrets) == {"k3y-abcdef", "zz-987654", "pa55word-x", "an0ther-pw"}
    cap = capture(secrets=secrets)
    log = logging.getLogger("slidesynth.test")
    log.info("connecting to %s", settings.broker_url)
    log.info("key %s", "k3y-abcdef", extra={"header": "X-API-Key: zz-987654"})
    log.info("amqp://guest:guest-pass@rabbit// and https://user:tok3n@example.org/x")
    try:
        raise ValueError(f"bad url {settings.redis_url}")
    except ValueError:
        log.exception("failed with k3y-abcdef")
    text = "\n".join(cap.lines)
    for secret in secrets + ["guest-pass", "tok3n"]:
        assert secret not in text, secret
    parsed = [json.loads(line) for line in cap.lines]
    assert parsed[0]["message"] == "connecting to redis://:***@redis:6379/0"
    assert parsed[1]["message"] == "key ***" and parsed[1]["header"] == "X-API-Key: ***"
    assert "amqp://guest:***@rabbit//" in parsed[2]["message"] and "https://user:***@example.org" in parsed[2][
        "message"]
    assert "rediss://user:***@r2:6380/1" in parsed[3]["exception"] and parsed[3]["message"] == "failed with ***"
    assert logs.redact("redis://redis:6379/0") == "redis://redis:6379/0"  # nothing to hide: unchanged


def test_invalid_settings_are_reported_without_their_values(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIDESYNTH_")}
    env.update(SLIDESYNTH_API_KEYS="no-colon-s3cret-value", SLIDESYNTH_DATA_DIR=str(tmp_path), PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "slidesynth.cli", "worker"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "slidesynth: invalid settings: SLIDESYNTH_API_KEYS: " in proc.stderr
    assert "no-colon-s3cret-value" not in proc.stdout + proc.stderr


# --- HTTP metrics and access lines -----------------------------------------------------------------------------

def test_http_metrics_use_route_templates_and_the_status_the_client_got(embedded_settings, capture):
    from fastapi import APIRouter

    from core import logs
    from service.app import create_app

    embedded_settings.api_keys = "lab-a:key-aaaa"
    embedded_settings.max_upload_bytes = 4096
    app = create_app(embedded_settings)
    boom = APIRouter()

    @boom.get("/boom/{job_id}")
    def _boom(job_id: str):
        raise RuntimeError("boom")

    app.include_router(boom)
    cap = capture(secrets=logs.secrets_of(embedded_settings))
    key = {"X-API-Key": "key-aaaa"}
    with TestClient(app, raise_server_exceptions=False) as c:
        before = samples(c.get("/metrics").text)  # the counters are this test process's (earlier tests count too)
        created = c.post("/generate", headers=key, files={"mask": ("m.png", png_bytes(make_mask(32, 32)), "image/png")},
                         data={"params": json.dumps({"steps": 2})})
        assert created.status_code == 202
        job_id = created.json()["id"]
        assert c.get(f"/jobs/{job_id}", headers=key).status_code == 200
        assert c.get("/jobs/aaaa1111", headers=key).status_code == 404
        assert c.get("/jobs/bbbb2222", headers=key).status_code == 404
        assert c.get(f"/jobs/{job_id}", headers={"X-API-Key": "wrong-key"}).status_code == 401
        assert c.get("/no/such/path/1").status_code == 404 and c.get("/no/such/path/2").status_code == 404
        assert c.get("/boom/j5").status_code == 500
        assert c.post("/generate", content=b"x" * 10_000,
                      headers={"content-type": "application/json", **key}).status_code == 413
        parsed = samples(c.get("/metrics").text)
    def count(method, route, status, name="slidesynth_http_requests_total"):
        labels = dict(method=method, route=route) | ({} if status is None else {"status": str(status)})
        return (value(parsed, name, **labels) or 0) - (value(before, name, **labels) or 0)

    assert count("POST", "/generate", 202) == 1 and count("POST", "/generate", 413) == 1
    assert count("GET", "/jobs/{job_id}", 200) == 1 and count("GET", "/jobs/{job_id}", 404) == 2
    assert count("GET", "/jobs/{job_id}", 401) == 1
    assert count("GET", "<unmatched>", 404) == 2
    assert count("GET", "/boom/{job_id}", 500) == 1
    assert count("GET", "/jobs/{job_id}", None, "slidesynth_http_request_duration_seconds_count") == 4
    labels = {v for (name, lbls) in parsed for _, v in lbls if name.startswith("slidesynth_http")}
    assert not {job_id, "aaaa1111", "bbbb2222", "/no/such/path/1"} & labels  # no raw paths, no ids

    access = [json.loads(line) for line, r in zip(cap.lines, cap.records) if r.name == "slidesynth.access"]
    by_path = {}
    for line in access:
        by_path.setdefault((line["method"], line["message"].split()[1]), []).append(line)
    made = by_path[("POST", "/generate")][0]
    assert made["job_id"] == job_id and made["tenant"] == "lab-a" and made["status"] == 202
    polled = by_path[("GET", f"/jobs/{job_id}")]
    assert [(x["status"], x.get("tenant")) for x in polled] == [(200, "lab-a"), (401, None)]
    assert all(x["job_id"] == job_id for x in polled) and polled[0]["route"] == "/jobs/{job_id}"
    assert by_path[("GET", "/boom/j5")][0]["level"] == "WARNING"
    assert "key-aaaa" not in "\n".join(cap.lines)


# --- the job store's figures -----------------------------------------------------------------------------------

def _record(job_id: str, status: str, **fields):
    from core.jobs import JobRecord, JobSpec

    spec = JobSpec(model="m", engine="diffinfinite", conditioning="mask", width=64, height=64, mpp=0.5, seed=1,
                   steps=2, guidance=1.0)
    return JobRecord(id=job_id, status=status, spec=spec, **fields)


def test_jobs_by_status_and_queue_lengths_are_read_from_redis_at_scrape_time(redis_url, key_prefix, tmp_path):
    import redis

    from core.metrics import JobStoreCollector, render
    from core.settings import Settings

    settings = Settings(broker_url=redis_url, data_dir=tmp_path, key_prefix=key_prefix, queue=key_prefix,
                        _env_file=None)
    collector = JobStoreCollector(settings)
    r = redis.Redis.from_url(redis_url)
    try:
        for i, status in enumerate(["queued", "queued", "running", "succeeded", "succeeded", "succeeded", "failed"]):
            collector.store.create(_record(f"j{i}", status))
        collector.store.request_cancel("j0")  # a cancel flag key beside the record is not a job
        r.rpush(key_prefix, "m1", "m2")  # kombu keeps a queue's messages in a list named after it
        r.rpush(f"{key_prefix}.low", "m3")
        r.rpush(f"{key_prefix}.low\x06\x163", "m4")  # a message with a priority waits in a sibling list
        r.rpush(f"{key_prefix}.embed", "e1")
        parsed = samples(render(collector)[0].decode())
        jobs = {s: value(parsed, "slidesynth_jobs", status=s) for s in
                ("queued", "running", "succeeded", "failed", "canceled", "expired")}
        assert jobs == {"queued": 2, "running": 1, "succeeded": 3, "failed": 1, "canceled": 0, "expired": 0}
        queues = {p: value(parsed, "slidesynth_queue_length", queue=q, priority=p) for q, p in
                  ((f"{key_prefix}.high", "high"), (key_prefix, "normal"), (f"{key_prefix}.low", "low"),
                   (f"{key_prefix}.embed", "embed"))}
        assert queues == {"high": 0, "normal": 2, "low": 2, "embed": 1}
        assert value(parsed, "slidesynth_job_store_up") == 1
        collector.store.transition("j0", {__import__("core.jobs").jobs.JobStatus.queued}, status="running")
        r.lpop(key_prefix)
        again = samples(render(collector)[0].decode())  # read again: nothing cached
        assert value(again, "slidesynth_jobs", status="running") == 2
        assert value(again, "slidesynth_queue_length", queue=key_prefix, priority="normal") == 1
    finally:
        for key in r.scan_iter(f"{key_prefix}*"):
            r.delete(key)


def test_metrics_answer_at_once_while_redis_is_down(tmp_path, monkeypatch):
    from service.app import create_app
    from core.settings import Settings

    for key in list(os.environ):
        if key.startswith("SLIDESYNTH_"):
            monkeypatch.delenv(key)
    port = free_port()  # nothing listens: connections are refused
    settings = Settings(broker_url=f"redis://127.0.0.1:{port}/0", data_dir=tmp_path, _env_file=None)
    with TestClient(create_app(settings)) as c:
        t0 = time.perf_counter()
        resp = c.get("/metrics")
        assert resp.status_code == 200 and time.perf_counter() - t0 < 5
    parsed = samples(resp.text)
    assert value(parsed, "slidesynth_job_store_up") == 0
    assert not [k for k in parsed if k[0] in ("slidesynth_jobs", "slidesynth_queue_length")]


def test_embedded_mode_counts_job_files_and_message_files(embedded_settings):
    from core.metrics import render
    from service.app import create_app

    app = create_app(embedded_settings)
    with TestClient(app) as c:
        for _ in range(2):
            assert c.post("/generate", files={"mask": ("m.png", png_bytes(make_mask(32, 32)), "image/png")},
                          data={"params": json.dumps({"steps": 2, "priority": "high"})}).status_code == 202
        parsed = samples(render(app.state.store_metrics)[0].decode())
    assert value(parsed, "slidesynth_jobs", status="queued") == 2
    assert value(parsed, "slidesynth_queue_length", queue="gpu.high", priority="high") == 2
    assert value(parsed, "slidesynth_queue_length", queue="gpu", priority="normal") == 0


# --- prometheus_client's multiprocess mode as the launchers use it ---------------------------------------------

MULTIPROCESS = textwrap.dedent(r'''
    import os, sys, time
    from pathlib import Path
    from core.metrics import prepare_multiprocess, render, mark_dead
    folder = Path(sys.argv[1])
    (folder / "counter_999999.db").parent.mkdir(parents=True, exist_ok=True)
    (folder / "counter_999999.db").write_bytes(b"stale")  # a file from an earlier run: wiped at start
    prepare_multiprocess(folder)
    assert not (folder / "counter_999999.db").exists()
    from prometheus_client import Counter, Gauge, Histogram
    c = Counter("slidesynth_t_total", "t")
    g = Gauge("slidesynth_t_live", "t", multiprocess_mode="livesum")
    h = Histogram("slidesynth_t_seconds", "t", buckets=(1, 10))

    def child(n, goodbye):
        pid = os.fork()
        if pid == 0:
            c.inc(n); g.inc(n); h.observe(n)
            if goodbye:
                mark_dead()
            os._exit(0)
        os.waitpid(pid, 0)

    pid = os.fork()
    if pid == 0:  # a live process: its gauge counts
        g.inc(100); c.inc(1000)
        time.sleep(30)
        os._exit(0)
    time.sleep(0.5)
    child(2, goodbye=True)    # ended and said so: its gauge is dropped, its counter stays
    child(5, goodbye=False)   # ended without a word (SIGKILL): its gauge is pruned at the scrape
    text = render()[0].decode()
    os.kill(pid, 9); os.waitpid(pid, 0)
    after = render()[0].decode()
    print(text + "\n---\n" + after)
''')


def test_metrics_of_several_processes_are_merged_and_dead_processes_gauges_dropped(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", MULTIPROCESS, str(tmp_path / "metrics")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    during, after = (samples(part) for part in proc.stdout.split("\n---\n"))
    assert value(during, "slidesynth_t_total") == 1007  # counters of every process, live or ended
    assert value(during, "slidesynth_t_live") == 100  # only the live process's gauge
    assert value(during, "slidesynth_t_seconds_count") == 2 and value(during, "slidesynth_t_seconds_sum") == 7
    assert value(after, "slidesynth_t_live") in (None, 0) and value(after, "slidesynth_t_total") == 1007


def test_metrics_must_not_exist_before_the_folder_is_set():
    script = ("from prometheus_client import Counter; Counter('slidesynth_early_total', 'x'); "
              "from core.metrics import prepare_multiprocess; prepare_multiprocess(None)")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "metrics created before the multiprocess folder was set" in proc.stderr


def test_the_api_never_imports_the_worker_metrics():
    proc = subprocess.run([sys.executable, "-c", "import sys, service.app; print(sorted(m for m in sys.modules "
                           "if m.startswith('worker') or m == 'torch'))"], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_json_log_config_is_what_uvicorn_applies(capture):
    """`serve` hands uvicorn this dict (applied in every HTTP process): it must configure cleanly, send
    uvicorn's loggers through the one handler, and keep the secrets it was given."""
    import logging.config

    from core import logs

    stream = io.StringIO()
    config = logs.log_config("json", "info", ["s3cr3t-key"])
    config["handlers"]["main"]["stream"] = stream
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        logging.config.dictConfig(config)
        logging.getLogger("uvicorn.error").info("Started server process [%d] s3cr3t-key", 42)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    line = json.loads(stream.getvalue().strip())
    assert line["logger"] == "uvicorn.error" and line["message"] == "Started server process [42] ***"
    with pytest.raises(ValueError):
        logs.log_config("xml")


def test_gpu_memory_is_reported_for_cuda_workers_only(monkeypatch):
    """The gauge reads torch.cuda for a CUDA device (stubbed here: no GPU on the test machine) and stays absent
    for a CPU worker."""
    import torch

    from core.jobs import JobStatus
    from worker.metrics import GPU_MEMORY, GPU_MEMORY_PEAK, JobMeter

    def series(gauge):
        return {s.labels.get("device"): s.value for m in gauge.collect() for s in m.samples}

    cpu = JobMeter(_record("g1", "running"), device=torch.device("cpu"))
    cpu.started(first_run=True)
    cpu.step(0), cpu.step(1)
    cpu.finished(JobStatus.succeeded)
    assert "cpu" not in series(GPU_MEMORY) and "cpu" not in series(GPU_MEMORY_PEAK)

    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 123_456_789)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 987_654_321)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)
    gpu = JobMeter(_record("g2", "running"), device=torch.device("cuda", 7))  # a device object needs no GPU
    gpu.reset_peak()
    gpu.step(0)
    assert series(GPU_MEMORY)["cuda:7"] == 123_456_789 and series(GPU_MEMORY_PEAK)["cuda:7"] == 987_654_321
