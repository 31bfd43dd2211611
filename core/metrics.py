"""Prometheus metrics across processes: uvicorn's HTTP processes, Celery's pool processes.

prometheus_client keeps each process's values in memory, so a scrape answered by one of several processes would
see a fraction of them. Its multiprocess mode instead has every process write its values to files (mmap) in one
folder, ``PROMETHEUS_MULTIPROC_DIR``, and the process answering a scrape merges the files of them all
(``MultiProcessCollector``). Its rules, as followed here:

* The folder is chosen and emptied by the launcher (``slidesynth serve``, ``slidesynth worker``:
  :func:`prepare_multiprocess`) before any metric exists and before its processes start; every process it starts
  inherits the variable. (prometheus_client's documentation asks for the variable to be set by a start-up script
  rather than from Python, because a process that imported prometheus_client or started children before setting it
  would not use it; the launcher sets it first thing, re-reads prometheus_client's value class, refuses to go on if
  a metric already exists, and only then starts uvicorn's processes and Celery's pool.) One folder per launcher
  (``SLIDESYNTH_METRICS_DIR``; default a private temporary folder): two launchers sharing one would empty each
  other's files.
* Counters and histograms of processes that ended stay in the files and keep counting (counters only grow);
  gauges say how they combine across processes (``multiprocess_mode``), and the ``live*`` ones drop the values of
  dead processes: :func:`mark_dead` when a process ends, and every scrape prunes the files of pids that are gone
  (a process killed without a goodbye).
* No custom collector is merged across processes. The figures read from Redis at scrape time
  (:class:`JobStoreCollector`: jobs by status, queue lengths) are computed by the process that answers the
  scrape, from the shared store, so every process would give the same answer.

Who exposes what (the README's Deployment section):

* ``slidesynth serve``: the API's ``/metrics`` merges its HTTP processes' files and adds :class:`JobStoreCollector`.
* ``slidesynth worker``: an HTTP server in the pool's parent process on ``SLIDESYNTH_METRICS_PORT`` (9100)
  merges its pool processes' files (:func:`serve_worker_metrics`).
* The embedded mode (``slidesynth serve`` starting the worker): the worker shares the API's folder and serves no
  port; the API's ``/metrics`` shows both.

Outside a launcher (tests building the app in-process) no folder is set and the metrics live in the process's
default registry, which the same functions expose.
"""
from __future__ import annotations

import atexit
import glob
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "slidesynth_"
QUEUE_PRIORITY_STEPS = (3, 6, 9)  # kombu's Redis transport: a message with priority p waits in "<queue>\x06\x16<p>"
STORE_TIMEOUT = 1.0  # seconds each Redis read of a scrape may take (Kubernetes' liveness probe reads /metrics)
_LIVE_FILE = re.compile(r"gauge_live\w+?_(\d+)\.db$")

log = logging.getLogger("slidesynth.metrics")


def multiprocess_dir() -> Path | None:
    folder = os.environ.get(ENV)
    return Path(folder) if folder else None


def prepare_multiprocess(folder: Path | None, *, wipe: bool = True) -> Path:
    """Point this process (and every process it starts) at ``folder`` for metric files: emptied of metric files
    when ``wipe``; ``None``: a fresh private temporary folder, removed when this process exits.

    Must run before any metric of this service exists (their values are made for one mode when created)."""
    from prometheus_client import REGISTRY, values

    early = sorted(n for n in getattr(REGISTRY, "_names_to_collectors", {}) if n.startswith(PREFIX))
    if early:
        raise RuntimeError(f"metrics created before the multiprocess folder was set: {', '.join(early[:5])}")
    if folder is None:
        folder = Path(tempfile.mkdtemp(prefix="slidesynth-metrics-"))
        owner = os.getpid()
        # forked children (Celery's pool) inherit atexit handlers: only this process removes the folder
        atexit.register(lambda: os.getpid() == owner and shutil.rmtree(folder, ignore_errors=True))
    else:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if wipe:
            for path in folder.glob("*.db"):  # only metric files: the folder may be a volume with other things
                path.unlink(missing_ok=True)
    os.environ[ENV] = str(folder)
    values.ValueClass = values.get_value_class()  # prometheus_client chose its value class at import
    return folder


def mark_dead(pid: int | None = None) -> None:
    """Drop the ``live*`` gauges of a process that ends (by default this one). No-op outside multiprocess mode."""
    if multiprocess_dir() is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(os.getpid() if pid is None else pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prune_dead(folder: Path) -> list[int]:
    """mark_process_dead for every pid with ``live*`` gauge files whose process is gone (killed without a
    goodbye, e.g. a pool process SIGKILLed for its memory); the pids pruned."""
    from prometheus_client import multiprocess

    dead = set()
    for path in glob.glob(os.path.join(folder, "gauge_live*.db")):
        match = _LIVE_FILE.search(os.path.basename(path))
        if match and not _alive(int(match.group(1))):
            dead.add(int(match.group(1)))
    for pid in dead:
        multiprocess.mark_process_dead(pid, str(folder))
    return sorted(dead)


class _ProcessFiles:
    """The merged files of the multiprocess folder, dead processes' live gauges pruned first."""

    def __init__(self, folder: Path):
        self.folder = folder

    def collect(self):
        from prometheus_client.multiprocess import MultiProcessCollector

        prune_dead(self.folder)
        return MultiProcessCollector(None, str(self.folder)).collect()


class _DefaultRegistry:
    """This process's default registry (no multiprocess folder: tests, scripts)."""

    def collect(self):
        from prometheus_client import REGISTRY

        return REGISTRY.collect()


def scrape_registry(*collectors: Any):
    """A registry for one scrape: this launcher's metrics (every process's, merged), then ``collectors``."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    folder = multiprocess_dir()
    registry.register(_ProcessFiles(folder) if folder is not None else _DefaultRegistry())
    for collector in collectors:
        registry.register(collector)
    return registry


def render(*collectors: Any) -> tuple[bytes, str]:
    """The exposition text of :func:`scrape_registry` and its content type."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return generate_latest(scrape_registry(*collectors)), CONTENT_TYPE_LATEST


def serve_worker_metrics(port: int, addr: str = "0.0.0.0"):
    """Serve ``/metrics`` (every pool process's metrics, merged) from a thread of the calling process — the
    Celery pool's parent, which never runs a job. ``None`` (and an error line) when the port is taken: a worker
    runs without its metrics endpoint rather than not at all."""
    from prometheus_client import start_http_server

    try:
        server, _thread = start_http_server(port, addr=addr, registry=scrape_registry())
    except OSError as exc:
        log.error("worker metrics: cannot listen on %s:%d (%s); this worker serves no metrics", addr, port, exc)
        return None
    return server


# --- figures read from Redis (or the embedded mode's files) at scrape time ---------------------------------------

def queue_length(broker: Any, queue: str) -> int:
    """Messages waiting in ``queue``: with Redis the LLEN of the list kombu keeps under the queue's name (and its
    priority lists); with kombu's filesystem transport the message files named after it."""
    if isinstance(broker, Path):
        suffix = f"{queue}.msg"
        try:
            return sum(1 for name in os.listdir(broker) if name.partition(".")[2] == suffix)
        except FileNotFoundError:
            return 0
    pipe = broker.pipeline(transaction=False)
    for name in (queue, *(f"{queue}\x06\x16{step}" for step in QUEUE_PRIORITY_STEPS)):
        pipe.llen(name)
    return int(sum(pipe.execute()))


class JobStoreCollector:
    """At each scrape: ``slidesynth_jobs{status}`` (job records by status, every status, 0 when none),
    ``slidesynth_queue_length{queue,priority}`` (waiting messages per job queue and the embed queue) and
    ``slidesynth_job_store_up`` (1 when both could be read). Redis is read with short timeouts
    (:data:`STORE_TIMEOUT`), so that ``/metrics`` answers at once while Redis is down — only without these."""

    def __init__(self, settings: Any):
        from core.jobs import RedisJobStore, open_store
        from core.queue import PRIORITY_ORDER, job_queue

        self.settings = settings
        options = dict(socket_timeout=STORE_TIMEOUT, socket_connect_timeout=STORE_TIMEOUT)
        url = settings.job_store_url
        self.store = (RedisJobStore(url, settings.data_dir, prefix=settings.key_prefix, **options) if url
                      else open_store(settings))
        self.queues = [(job_queue(settings, p), p.value) for p in PRIORITY_ORDER]
        self.queues.append((settings.embed_queue_name, "embed"))
        broker = settings.broker_url or ""
        if broker.startswith(("redis://", "rediss://", "unix://")):
            import redis

            self.broker: Any = (self.store.redis if broker == url
                                else redis.Redis.from_url(broker, **options))
        elif not broker:
            self.broker = settings.data_dir / "broker" / "queue"  # kombu's filesystem transport (embedded mode)
        else:
            self.broker = None  # another transport: no queue lengths

    def describe(self):
        return []  # read at scrape time only: nothing to check at registration

    def collect(self) -> Iterable:
        from prometheus_client.core import GaugeMetricFamily

        up = 1
        t0 = time.perf_counter()
        jobs = GaugeMetricFamily("slidesynth_jobs", "Job records by status, read from the job store at scrape time "
                                 "(the same in every API process and replica: aggregate with max, not sum)",
                                 labels=["status"])
        try:
            for status, count in sorted(self.store.status_counts().items()):
                jobs.add_metric([status], count)
        except Exception as exc:  # Redis down or slow: the rest of /metrics still answers
            up = 0
            log.warning("metrics: job counts unavailable: %s", exc)
        yield jobs
        queues = GaugeMetricFamily("slidesynth_queue_length", "Messages waiting in each queue (Redis LLEN at scrape "
                                   "time; running jobs are not in it)", labels=["queue", "priority"])
        if self.broker is not None:
            try:
                for queue, priority in self.queues:
                    queues.add_metric([queue, priority], queue_length(self.broker, queue))
            except Exception as exc:
                up = 0
                log.warning("metrics: queue lengths unavailable: %s", exc)
        yield queues
        yield GaugeMetricFamily("slidesynth_job_store_up", "1 when this scrape read the job store and the queues",
                                value=up)
        yield GaugeMetricFamily("slidesynth_job_store_scrape_seconds", "Time this scrape spent reading the job "
                                "store and the queues", value=time.perf_counter() - t0)
