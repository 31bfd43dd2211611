"""The deployment the service benches run: a private ``redis-server``, ``slidesynth serve --no-worker`` and N
``slidesynth worker`` processes under a key prefix and queue of their own, each logging to ``<folder>/logs``.

Workers are pinned to one torch thread and one pool process (``SLIDESYNTH_WORKER_CONCURRENCY=1``) so that
worker counts, not thread counts, are what a bench varies; metrics ports are off (several workers on one host).
"""
from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(predicate, timeout: float, what: str, interval: float = 0.2):
    """The first truthy value of ``predicate()``; TimeoutError naming ``what`` after ``timeout`` s."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def mask_png(size: int) -> bytes:
    """A 5-class striped label mask, ``size``² (PNG)."""
    import numpy as np
    from PIL import Image

    labels = np.zeros((size, size), np.uint8)
    for cls, cols in enumerate(np.array_split(np.arange(size), 5)):
        labels[:, cols] = cls
    buf = io.BytesIO()
    Image.fromarray(labels).save(buf, format="PNG")
    return buf.getvalue()


class RedisServer:
    """A private redis-server on a free port with its folder; ``aof``: append-only file (``everysec``), so a
    restart on the same port keeps the data."""

    def __init__(self, folder: Path, aof: bool = False):
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise SystemExit("this bench needs redis-server (apt-get install redis-server)")
        self.folder, self.aof = Path(folder), aof
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def answers(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=1,
                                             retry=None).ping())
        except Exception:
            return False

    def start(self) -> "RedisServer":
        persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.aof else ["--appendonly", "no"]
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      *persistence, "--dir", str(self.folder)],
                                     stdout=open(self.folder / "redis.log", "a"), stderr=subprocess.STDOUT)
        wait(self.answers, 30, "redis-server", interval=0.05)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # a clean shutdown: the AOF is flushed
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self, downtime: float) -> float:
        """SIGTERM, ``downtime`` seconds, start again (same port, same AOF): the seconds it did not answer."""
        t0 = time.time()
        self.stop()
        time.sleep(downtime)
        self.start()
        return time.time() - t0


class Deployment:
    """The API and ``workers`` workers (``--name w<i>``, logs ``worker<i>.log``) on one Redis.

    ``settings``: more ``SLIDESYNTH_*`` values by field name (``default_model="…"``); ``api_args``: extra
    ``slidesynth serve`` arguments (e.g. ``--processes 4``)."""

    def __init__(self, redis_url: str, folder: Path, *, workers: int = 1, name: str = "bench",
                 api_args: tuple[str, ...] = (), log_level: str = "warning", **settings):
        import httpx

        self.folder, self.redis_url = Path(folder), redis_url
        self.prefix = f"{name}-{uuid.uuid4().hex[:8]}"
        self.data = self.folder / "data"
        self.logs = self.folder / "logs"
        self.logs.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLIDESYNTH_")
               and k != "PROMETHEUS_MULTIPROC_DIR"}
        values = dict(broker_url=redis_url, data_dir=str(self.data), key_prefix=self.prefix, queue=self.prefix,
                      device="cpu", worker_concurrency="1", torch_threads="1", metrics_port="0", **settings)
        env.update({f"SLIDESYNTH_{k.upper()}": str(v) for k, v in values.items()})
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
        self.env = env
        self.workers = [self._start(f"worker{i}", ["worker", "--name", f"w{i}", "--log-level", "INFO"])
                        for i in range(workers)]
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api = self._start("api", ["serve", "--no-worker", "--port", str(self.port), "--log-level", log_level,
                                       *api_args])
        self.http = httpx.Client(base_url=self.base_url, timeout=60)

    def _start(self, log: str, args: list[str]) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "slidesynth.cli", *args], cwd=REPO, env=self.env,
                                stdout=open(self.logs / f"{log}.log", "w"), stderr=subprocess.STDOUT)

    def worker_logs(self) -> list[Path]:
        return [self.logs / f"worker{i}.log" for i in range(len(self.workers))]

    def ready(self, timeout: float) -> None:
        """Wait for the API's ``/healthz`` and every worker's "ready." (Celery logs it once it consumes);
        RuntimeError with the log's tail when a process exits meanwhile."""
        import httpx

        def api_up():
            if self.api.poll() is not None:
                raise RuntimeError(f"the API exited: {(self.logs / 'api.log').read_text()[-2000:]}")
            try:
                return self.http.get("/healthz").status_code == 200
            except httpx.HTTPError:
                return False

        def workers_up():
            for i, proc in enumerate(self.workers):
                if proc.poll() is not None:
                    raise RuntimeError(f"worker {i} exited: {self.worker_logs()[i].read_text()[-2000:]}")
            return all("ready." in path.read_text() for path in self.worker_logs())

        wait(api_up, timeout, "the API")
        wait(workers_up, timeout, "the workers")

    def stop(self) -> None:
        self.http.close()
        procs = (self.api, *self.workers)
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
