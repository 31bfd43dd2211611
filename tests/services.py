"""A real service stack for integration tests: the API (``slidesynth serve --no-worker``) and Celery workers
(``slidesynth worker``) as subprocesses on a real Redis, each logging to ``<tmp>/logs/<name>.log``.

    with running_stack(redis_url, key_prefix, tmp_path, checkpoint_every="5") as stack:
        stack.client.post("/generate", …)

Settings are given by field name (``checkpoint_every="5"`` → ``SLIDESYNTH_CHECKPOINT_EVERY=5``) on top of the
ones every stack gets: the Redis broker, a private key prefix and queue, data and models folders under the test's
temporary folder (no models installed: the untrained ones), CPU. Closing stops the processes and deletes every
Redis key of the prefix (job records, queues ``<prefix>``, ``.high``, ``.low``, ``.embed``, kombu bindings).
"""
from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

from bench._stack import wait as wait_for  # noqa: F401  (the one polling helper, for the tests too)
from tests.conftest import REPO, free_port


def stop_processes(*procs: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to all, then wait for each (SIGKILL after ``timeout`` s)."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Stack:
    """The processes of one test deployment. Nothing starts until :meth:`start_api` / :meth:`start_worker`."""

    def __init__(self, redis_url: str, prefix: str, tmp_path: Path, **settings: str):
        self.redis_url, self.prefix = redis_url, prefix
        self.data_dir = Path(tmp_path) / "data"
        self.logs = Path(tmp_path) / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SLIDESYNTH_")}
        base = dict(broker_url=redis_url, data_dir=str(self.data_dir), models_dir=str(Path(tmp_path) / "weights"),
                    key_prefix=prefix, queue=prefix, device="cpu")
        self.env.update({f"SLIDESYNTH_{k.upper()}": str(v) for k, v in {**base, **settings}.items()})
        self.env["PYTHONUNBUFFERED"] = "1"
        self.procs: dict[str, subprocess.Popen] = {}
        self.clients: list[httpx.Client] = []
        self.port: int | None = None
        self.client: httpx.Client | None = None

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "slidesynth.cli", *args], cwd=REPO, env=self.env,
                                stdout=open(self.logs / f"{name}.log", "w"), stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def start_api(self) -> httpx.Client:
        """``slidesynth serve --no-worker`` on a free port; returns (and keeps as ``client``) a client for it."""
        self.port = free_port()
        self._start("api", ["serve", "--port", str(self.port), "--no-worker", "--log-level", "warning"])
        self.client = self.new_client()
        return self.client

    def start_worker(self, *args: str) -> subprocess.Popen:
        """One more ``slidesynth worker`` (logs ``worker.log``, then ``worker-2.log``, …)."""
        n = sum(name.startswith("worker") for name in self.procs)
        return self._start("worker" if n == 0 else f"worker-{n + 1}", ["worker", "--log-level", "INFO", *args])

    def new_client(self, **headers: str) -> httpx.Client:
        client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=30, headers=headers)
        self.clients.append(client)
        return client

    def wait_healthy(self, timeout: float = 60) -> None:
        def healthy():
            try:
                return self.client.get("/healthz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, timeout, "the API to answer /healthz")

    def log(self, name: str = "worker", tail: int = 5000) -> str:
        return (self.logs / f"{name}.log").read_text()[-tail:]

    def redis(self):
        import redis

        return redis.Redis.from_url(self.redis_url)

    def close(self) -> None:
        for client in self.clients:
            client.close()
        stop_processes(*self.procs.values())
        r = self.redis()
        for pattern in (f"{self.prefix}*", f"_kombu.binding*{self.prefix}*"):
            for key in r.scan_iter(pattern):
                r.delete(key)


@contextmanager
def running_stack(redis_url: str, prefix: str, tmp_path: Path, *, workers: int = 1,
                  **settings: str) -> Iterator[Stack]:
    """A :class:`Stack` with the API and ``workers`` workers started and the API answering ``/healthz``."""
    stack = Stack(redis_url, prefix, tmp_path, **settings)
    try:
        stack.start_api()
        for _ in range(workers):
            stack.start_worker()
        stack.wait_healthy()
        yield stack
    finally:
        stack.close()
