"""Metrics and logs through real processes: a password-protected redis-server of its own, `slidesynth worker`
(Celery prefork, serving its metrics on a port) and `slidesynth serve --processes 2` (uvicorn, two HTTP
processes sharing one metrics folder), an API key, real jobs. `/metrics` of both is scraped while a job runs
and after, and every line either process wrote is read back: JSON (or text) with the job and tenant on the
job's lines, and never the API key nor the Redis password."""
from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, free_port, make_mask, png_bytes
from tests.services import wait_for

pytestmark = pytest.mark.integration
_wait = functools.partial(wait_for, interval=0.1)

API_KEY = "obs-key-7f3a9c1e5d"
REDIS_PASSWORD = "redis-pw-4b8e2d6a90"
TENANT = "lab-obs"


def scrape(client: httpx.Client, url: str) -> dict[tuple[str, tuple], float]:
    resp = client.get(url)
    assert resp.status_code == 200, resp.text
    out = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(parsed, name, **labels):
    return parsed.get((name, tuple(sorted(labels.items()))))


def names(parsed) -> set[str]:
    return {name for name, _ in parsed}


@pytest.fixture
def redis_with_password(tmp_path):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--requirepass", REDIS_PASSWORD, "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    import redis

    url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{port}/0"
    _wait(lambda: _pings(redis, url), 20, "the private redis-server")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


def _pings(redis, url) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except Exception:
        return False


class Service:
    def __init__(self, redis_url: str, tmp_path, log_format: str):
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.port, self.metrics_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLIDESYNTH_")
               and k != "PROMETHEUS_MULTIPROC_DIR"}
        env.update(SLIDESYNTH_BROKER_URL=redis_url, SLIDESYNTH_DATA_DIR=str(tmp_path / "data"),
                   SLIDESYNTH_DEVICE="cpu", SLIDESYNTH_API_KEYS=f"{TENANT}:{API_KEY},other:other-key-123456",
                   SLIDESYNTH_LOG_FORMAT=log_format, SLIDESYNTH_METRICS_PORT=str(self.metrics_port),
                   SLIDESYNTH_TORCH_THREADS="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
        self.worker = subprocess.Popen([sys.executable, "-m", "slidesynth.cli", "worker", "--log-level", "INFO"],
                                       cwd=REPO, env=env, stdout=open(self.logs / "worker.out", "w"),
                                       stderr=open(self.logs / "worker.err", "w"))
        self.api = subprocess.Popen([sys.executable, "-m", "slidesynth.cli", "serve", "--port", str(self.port),
                                     "--no-worker", "--processes", "2", "--log-level", "info"], cwd=REPO, env=env,
                                    stdout=open(self.logs / "api.out", "w"), stderr=open(self.logs / "api.err", "w"))
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30,
                                 headers={"X-API-Key": API_KEY})
        self.worker_metrics = f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self):
        def up(url):
            try:
                return self.http.get(url).status_code == 200
            except httpx.HTTPError:
                return False

        try:
            _wait(lambda: up("/healthz"), 90, "the API")
            _wait(lambda: up(self.worker_metrics), 120, "the worker's metrics endpoint")
            _wait(lambda: "ready." in self.output("worker"), 120, "the worker to be ready")
        except AssertionError:
            print(self.output("api")[-3000:], self.output("worker")[-3000:])
            raise
        return self

    def output(self, which: str) -> str:
        return "".join((self.logs / f"{which}.{ext}").read_text() for ext in ("out", "err"))

    def stop(self):
        self.http.close()
        for proc in (self.api, self.worker):
            proc.terminate()
        for proc in (self.api, self.worker):
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()

    def submit(self, steps: int, priority: str = "normal") -> str:
        resp = self.http.post("/generate", files={"mask": ("m.png", png_bytes(make_mask(256, 256)), "image/png")},
                              data={"params": json.dumps({"mask_mpp": 0.5, "steps": steps, "seed": 3,
                                                          "priority": priority})})
        assert resp.status_code == 202, resp.text
        return resp.json()["id"]

    def job(self, job_id: str) -> dict:
        return self.http.get(f"/jobs/{job_id}").json()

    def wait_done(self, job_id: str, timeout: float = 300) -> dict:
        try:
            return _wait(lambda: (j := self.job(job_id))["status"] in ("succeeded", "failed", "canceled") and j,
                         timeout, f"job {job_id} to finish", interval=0.25)
        except AssertionError:
            print(self.output("worker")[-5000:])
            raise


@pytest.fixture
def start_service(redis_with_password, tmp_path):
    started = []

    def start(log_format: str) -> Service:
        service = Service(redis_with_password, tmp_path, log_format)
        started.append(service)
        return service.start()

    yield start
    for service in started:
        service.stop()


def assert_no_secrets(service: Service) -> None:
    for which in ("api", "worker"):
        text = service.output(which)
        for secret in (API_KEY, REDIS_PASSWORD, "other-key-123456"):
            assert secret not in text, f"{secret!r} in the {which}'s output"


def test_metrics_during_and_after_a_job_and_json_logs(start_service):
    service = start_service("json")
    api_metrics = "/metrics"
    idle = scrape(service.http, service.worker_metrics)
    assert get(idle, "slidesynth_sampling_steps_total") == 0 and get(idle, "slidesynth_worker_jobs_running") == 0

    long_job = service.submit(steps=60)
    _wait(lambda: (service.job(long_job)["step"] or 0) >= 2, 180, "the first job to sample")
    queued_job = service.submit(steps=2, priority="low")  # waits behind it: one worker process
    assert service.http.get("/jobs/not0a0job").status_code == 404
    assert service.http.get(f"/jobs/{long_job}", headers={"X-API-Key": "wrong-key"}).status_code == 401

    # --- during: the job is running, the other one queued --------------------------------------------------------
    api = scrape(service.http, api_metrics)
    worker = scrape(service.http, service.worker_metrics)
    assert service.job(long_job)["status"] == "running", "the first job ended before the scrape: make it longer"
    assert get(api, "slidesynth_jobs", status="running") == 1 and get(api, "slidesynth_jobs", status="queued") == 1
    assert get(api, "slidesynth_jobs", status="succeeded") == 0
    assert get(api, "slidesynth_queue_length", queue="gpu.low", priority="low") == 1
    assert get(api, "slidesynth_queue_length", queue="gpu", priority="normal") == 0  # running: not in the list
    assert get(api, "slidesynth_job_store_up") == 1
    assert get(worker, "slidesynth_worker_jobs_running") == 1
    assert get(worker, "slidesynth_sampling_steps_total") >= 1
    assert get(worker, "slidesynth_job_queue_wait_seconds_count", priority="normal") == 1
    assert 0 <= get(worker, "slidesynth_job_queue_wait_seconds_sum", priority="normal") < 60
    assert get(worker, "slidesynth_job_duration_seconds_count", status="succeeded") == 0
    assert get(worker, "slidesynth_decoded_megapixels_total") == 0  # still sampling
    for name in ("slidesynth_sampling_patches_total", "slidesynth_sampling_seconds_total",
                 "slidesynth_decode_seconds_total", "slidesynth_written_megapixels_total",
                 "slidesynth_write_seconds_total"):
        assert get(worker, name) is not None, name
    assert get(worker, "slidesynth_output_bytes_total", kind="tiff") == 0
    assert not {"slidesynth_gpu_memory_allocated_bytes", "slidesynth_gpu_memory_peak_bytes"} & names(worker)  # CPU

    # --- after --------------------------------------------------------------------------------------------------
    first, second = service.wait_done(long_job), service.wait_done(queued_job)
    assert first["status"] == second["status"] == "succeeded", (first["error"], second["error"])
    polls_before = get(api, "slidesynth_http_requests_total", method="GET", route="/jobs/{job_id}", status="200")
    api = scrape(service.http, api_metrics)
    worker = scrape(service.http, service.worker_metrics)
    assert get(api, "slidesynth_jobs", status="succeeded") == 2
    assert get(api, "slidesynth_jobs", status="running") == get(api, "slidesynth_jobs", status="queued") == 0
    assert all(get(api, "slidesynth_queue_length", queue=q, priority=p) == 0
               for q, p in (("gpu.high", "high"), ("gpu", "normal"), ("gpu.low", "low"), ("gpu.embed", "embed")))
    # HTTP: both processes' counts, by route template, with the status the client got
    assert get(api, "slidesynth_http_requests_total", method="POST", route="/generate", status="202") == 2
    polls = get(api, "slidesynth_http_requests_total", method="GET", route="/jobs/{job_id}", status="200")
    assert polls > polls_before >= 2
    assert get(api, "slidesynth_http_requests_total", method="GET", route="/jobs/{job_id}", status="404") == 1
    assert get(api, "slidesynth_http_requests_total", method="GET", route="/jobs/{job_id}", status="401") == 1
    assert get(api, "slidesynth_http_request_duration_seconds_count", method="GET", route="/jobs/{job_id}") >= polls
    labels = {v for (_, lbls) in api for _, v in lbls}
    assert long_job not in labels and queued_job not in labels and "/jobs/not0a0job" not in labels
    # the worker
    assert get(worker, "slidesynth_worker_jobs_running") == 0
    assert get(worker, "slidesynth_job_duration_seconds_count", status="succeeded") == 2
    assert 0 < get(worker, "slidesynth_job_duration_seconds_sum", status="succeeded") < 600
    assert get(worker, "slidesynth_job_queue_wait_seconds_count", priority="low") == 1
    assert get(worker, "slidesynth_job_queue_wait_seconds_sum", priority="low") > 0.5  # it waited for the first
    assert get(worker, "slidesynth_sampling_steps_total") == 62
    assert get(worker, "slidesynth_sampling_patches_total") >= 62  # at least one window per step
    assert get(worker, "slidesynth_sampling_seconds_total") > 0
    megapixels = 2 * 256 * 256 / 1e6
    assert get(worker, "slidesynth_decoded_megapixels_total") == pytest.approx(megapixels)
    assert get(worker, "slidesynth_written_megapixels_total") == pytest.approx(megapixels)
    assert get(worker, "slidesynth_decode_seconds_total") > 0 and get(worker, "slidesynth_write_seconds_total") > 0
    tiff = service.http.get(f"/jobs/{long_job}/slide.tiff")
    assert get(worker, "slidesynth_output_bytes_total", kind="tiff") >= len(tiff.content) > 0
    assert get(worker, "slidesynth_output_bytes_total", kind="thumbnail") > 0
    assert not {"slidesynth_gpu_memory_allocated_bytes", "slidesynth_gpu_memory_peak_bytes"} & names(worker)

    # --- logs: one JSON object per line, the job and tenant on the job's lines, no secret ----------------------
    service.stop()
    lines = {}
    for which in ("api", "worker"):
        text = service.output(which)
        lines[which] = [json.loads(line) for line in text.splitlines() if line.strip()]  # fails on a non-JSON line
        assert all({"time", "level", "logger", "message"} <= set(x) for x in lines[which])
    about = lambda x, job: job in x["message"]  # noqa: E731
    for job in (long_job, queued_job):
        mine = [x for x in lines["worker"] if about(x, job) and x["logger"] != "celery.worker.strategy"]
        assert len(mine) >= 3, mine  # started, run ended, Celery's "succeeded"
        assert all(x.get("job_id") == job and x.get("tenant") == TENANT for x in mine), mine
        assert any(x["logger"] == "celery.app.trace" for x in mine)
        received = [x for x in lines["worker"] if about(x, job) and x["logger"] == "celery.worker.strategy"]
        assert received and all(x["job_id"] == job for x in received)
        access = [x for x in lines["api"] if x["logger"] == "slidesynth.access" and x.get("job_id") == job]
        assert {x["route"] for x in access} >= {"/generate", "/jobs/{job_id}"}
        assert all(x["tenant"] == TENANT for x in access if x["status"] != 401)
    assert any(x["logger"] == "uvicorn.error" for x in lines["api"])
    assert len({x["pid"] for x in lines["api"] if x["logger"] == "slidesynth.access"}) >= 1
    assert any("redis://:***@127.0.0.1" in x["message"] for x in lines["worker"])  # the broker URL, redacted
    assert_no_secrets(service)


def test_text_logs_name_the_job_and_hide_every_secret(start_service):
    service = start_service("text")
    assert service.http.get("/jobs", headers={"X-API-Key": "not-" + API_KEY}).status_code == 401
    job_id = service.submit(steps=2)
    assert service.wait_done(job_id)["status"] == "succeeded"
    assert service.http.get(f"/jobs/{job_id}/thumbnail.png").status_code == 200
    service.stop()
    worker, api = service.output("worker"), service.output("api")
    assert "transport:   redis://:**@127.0.0.1" in worker  # Celery's banner masks the password itself
    assert "broker redis://:***@127.0.0.1" in api and "broker redis://:***@127.0.0.1" in worker  # our start lines
    ended = [line for line in worker.splitlines() if f"job {job_id} run ended" in line]
    assert ended and ended[0].endswith(f"job_id={job_id} tenant={TENANT}")
    trace = [line for line in worker.splitlines() if f"slidesynth.generate[{job_id}] succeeded" in line]
    assert trace and f"job_id={job_id} tenant={TENANT}" in trace[0]
    access = [line for line in api.splitlines() if f"GET /jobs/{job_id}/thumbnail.png 200" in line]
    assert access and f"job_id={job_id} tenant={TENANT}" in access[0]
    assert_no_secrets(service)
