"""Job records and the job store: the single source of truth for a job's status.

Celery's result backend is not used for status (its PENDING also means "unknown id").
Two stores share one interface:

* :class:`RedisJobStore` — a Redis hash per job under ``{prefix}:job:{id}``, a per-tenant sorted
  set ``{prefix}:tenant:{tenant}:jobs`` (score = creation time) and a cancel flag
  ``{prefix}:job:{id}:cancel``. Status transitions are atomic (a Lua compare-and-set).
* :class:`FileJobStore` — ``{data_dir}/jobs/{id}/job.json`` guarded by ``fcntl`` locks, for the
  embedded mode that runs without any server.
"""
from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from abc import ABC, abstractmethod
from contextlib import contextmanager
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, Field


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.canceled)


class Stage(str, Enum):
    mask = "mask"
    sampling = "sampling"
    decoding = "decoding"
    writing = "writing"


class JobSpec(BaseModel):
    """A validated, normalised request: everything the worker needs to run the job."""

    model: str
    engine: Literal["diffinfinite", "infinity-brush"]
    conditioning: Literal["mask", "subtype", "embedding"]
    width: int
    height: int
    mpp: float
    seed: int
    steps: int
    guidance: float
    eta: float = 1.0
    sampler: Literal["random", "tiled"] = "tiled"
    decoder: Literal["tukey", "hann", "four-pass"] = "tukey"
    outputs: list[Literal["tiff", "zarr"]] = Field(default_factory=lambda: ["tiff"])
    compression: Literal["jpeg", "deflate", "zstd"] = "jpeg"
    quality: int = 90
    zarr_version: Literal["0.4", "0.5"] = "0.4"
    subtype: str | None = None
    subtype_id: int | None = None
    embedding: list[float] | None = None
    encoder: str | None = None
    mask_file: str | None = None  # relative to the job directory
    mask_width: int | None = None
    mask_height: int | None = None
    mask_mpp: float | None = None


class JobRecord(BaseModel):
    id: str
    tenant: str = "public"
    status: JobStatus = JobStatus.queued
    stage: Stage | None = None
    progress: float = 0.0
    eta_seconds: float | None = None
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    spec: JobSpec
    outputs: dict[str, str] = Field(default_factory=dict)  # kind → file name in the job directory
    metrics: dict[str, float] = Field(default_factory=dict)
    untrained: bool = False
    cancel_requested: bool = False
    attempts: int = 0
    worker: str | None = None
    step: int | None = None
    total_steps: int | None = None


def new_job_id() -> str:
    return uuid.uuid4().hex


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat()


class JobStore(ABC):
    """Where job records live. Every method is safe to call from the API and workers concurrently."""

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)

    def job_dir(self, job_id: str) -> Path:
        """The job's folder for inputs and outputs (ids are server-made hex, so no traversal)."""
        if not job_id.isalnum():
            raise ValueError(f"invalid job id {job_id!r}")
        return self.data_dir / "jobs" / job_id

    @abstractmethod
    def create(self, job: JobRecord) -> None: ...

    @abstractmethod
    def get(self, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    def update(self, job_id: str, **fields: Any) -> None:
        """Set fields unconditionally (progress, stage, …)."""

    @abstractmethod
    def transition(self, job_id: str, allowed: set[JobStatus], **fields: Any) -> bool:
        """Set fields only if the current status is in ``allowed``; True when applied (atomic)."""

    @abstractmethod
    def list(self, tenant: str, offset: int, limit: int) -> tuple[list[JobRecord], int]:
        """The tenant's jobs, newest first, and their total count."""

    @abstractmethod
    def delete(self, job_id: str) -> None:
        """Remove the record (files are the caller's business)."""

    @abstractmethod
    def request_cancel(self, job_id: str) -> None: ...

    @abstractmethod
    def cancel_requested(self, job_id: str) -> bool: ...

    def ping(self) -> bool:
        return True


def _encode(fields: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in fields.items():
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        elif isinstance(value, Enum):
            value = value.value
        out[key] = json.dumps(value)
    return out


_TRANSITION_LUA = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return 0 end
for i = 1, tonumber(ARGV[1]) do
  if cur == ARGV[1 + i] then
    for j = 2 + tonumber(ARGV[1]), #ARGV, 2 do
      redis.call('HSET', KEYS[1], ARGV[j], ARGV[j + 1])
    end
    return 1
  end
end
return 0
"""


class RedisJobStore(JobStore):
    def __init__(self, url: str, data_dir: Path, prefix: str = "slidesynth"):
        import redis

        super().__init__(data_dir)
        self.redis = redis.Redis.from_url(url)
        self.prefix = prefix
        self._transition = self.redis.register_script(_TRANSITION_LUA)

    def _key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"

    def _tenant_key(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:jobs"

    def create(self, job: JobRecord) -> None:
        data = _encode(dict(job))
        pipe = self.redis.pipeline()
        pipe.hset(self._key(job.id), mapping=data)
        pipe.zadd(self._tenant_key(job.tenant), {job.id: job.created_at})
        pipe.execute()

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.hgetall(self._key(job_id))
        if not raw:
            return None
        data = {k.decode(): json.loads(v) for k, v in raw.items()}
        data["cancel_requested"] = data.get("cancel_requested", False) or self.cancel_requested(job_id)
        return JobRecord.model_validate(data)

    def update(self, job_id: str, **fields: Any) -> None:
        self.redis.hset(self._key(job_id), mapping=_encode(fields))

    def transition(self, job_id: str, allowed: set[JobStatus], **fields: Any) -> bool:
        encoded = _encode(fields)
        args: list[str] = [str(len(allowed))]
        args += [json.dumps(s.value) for s in allowed]
        for k, v in encoded.items():
            args += [k, v]
        return bool(self._transition(keys=[self._key(job_id)], args=args))

    def list(self, tenant: str, offset: int, limit: int) -> tuple[list[JobRecord], int]:
        key = self._tenant_key(tenant)
        total = self.redis.zcard(key)
        ids = self.redis.zrevrange(key, offset, offset + limit - 1)
        jobs = [j for j in (self.get(i.decode()) for i in ids) if j is not None]
        return jobs, total

    def delete(self, job_id: str) -> None:
        job = self.get(job_id)
        pipe = self.redis.pipeline()
        pipe.delete(self._key(job_id), self._key(job_id) + ":cancel")
        if job is not None:
            pipe.zrem(self._tenant_key(job.tenant), job_id)
        pipe.execute()

    def request_cancel(self, job_id: str) -> None:
        self.redis.set(self._key(job_id) + ":cancel", 1, ex=7 * 24 * 3600)
        self.update(job_id, cancel_requested=True)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.redis.exists(self._key(job_id) + ":cancel"))

    def ping(self) -> bool:
        try:
            return bool(self.redis.ping())
        except Exception:
            return False


class FileJobStore(JobStore):
    """Job records as JSON files; for the embedded single-machine mode."""

    def _path(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "job.json"

    @contextmanager
    def _locked(self, job_id: str) -> Iterator[None]:
        lock_path = self.job_dir(job_id) / "job.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read(self, job_id: str) -> dict | None:
        try:
            return json.loads(self._path(job_id).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _write(self, job_id: str, data: dict) -> None:
        path = self._path(job_id)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)

    def create(self, job: JobRecord) -> None:
        with self._locked(job.id):
            self._write(job.id, job.model_dump(mode="json"))

    def get(self, job_id: str) -> JobRecord | None:
        try:
            data = self._read(job_id)
        except ValueError:
            return None
        return None if data is None else JobRecord.model_validate(data)

    def update(self, job_id: str, **fields: Any) -> None:
        with self._locked(job_id):
            data = self._read(job_id)
            if data is None:
                return
            data.update({k: json.loads(v) for k, v in _encode(fields).items()})
            self._write(job_id, data)

    def transition(self, job_id: str, allowed: set[JobStatus], **fields: Any) -> bool:
        with self._locked(job_id):
            data = self._read(job_id)
            if data is None or data["status"] not in {s.value for s in allowed}:
                return False
            data.update({k: json.loads(v) for k, v in _encode(fields).items()})
            self._write(job_id, data)
            return True

    def list(self, tenant: str, offset: int, limit: int) -> tuple[list[JobRecord], int]:
        root = self.data_dir / "jobs"
        jobs = []
        if root.is_dir():
            for child in root.iterdir():
                job = self.get(child.name) if child.name.isalnum() else None
                if job is not None and job.tenant == tenant:
                    jobs.append(job)
        jobs.sort(key=lambda j: j.created_at, reverse=True)
        return jobs[offset : offset + limit], len(jobs)

    def delete(self, job_id: str) -> None:
        for name in ("job.json", "cancel"):
            (self.job_dir(job_id) / name).unlink(missing_ok=True)

    def request_cancel(self, job_id: str) -> None:
        (self.job_dir(job_id) / "cancel").touch()
        self.update(job_id, cancel_requested=True)

    def cancel_requested(self, job_id: str) -> bool:
        return (self.job_dir(job_id) / "cancel").exists()


def open_store(settings) -> JobStore:
    """The store the settings call for: Redis when a Redis URL is configured, else files."""
    url = settings.job_store_url
    if url:
        return RedisJobStore(url, settings.data_dir, prefix=settings.key_prefix)
    return FileJobStore(settings.data_dir)
