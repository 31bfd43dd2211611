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

from pydantic import BaseModel, Field, model_validator

from models.engine import Stage, get_engine


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.canceled)


class Priority(str, Enum):
    """A job's priority: which of the job queues it waits in (``core.queue.job_queue``); workers take from
    ``high`` first, then ``normal``, then ``low``."""

    high = "high"
    normal = "normal"
    low = "low"


class EmbeddingGrid(BaseModel):
    """A grid of embeddings laid over the slide: row r·cols + c of :meth:`array` conditions cell (r, c).

    The vectors are kept as base64 of little-endian float32 (the precision the engines compute in; the API has
    checked they fit): a 64 × 64 grid of 512-d vectors is 11 MB in the record rather than ≈ 40 MB of decimal
    JSON, and reading the record — every status poll and progress write — decodes one string, not two million
    numbers."""

    rows: int
    cols: int
    dim: int
    data: str  # base64 of float32 little-endian, row-major (rows·cols, dim)

    @classmethod
    def from_vectors(cls, rows: int, cols: int, vectors) -> "EmbeddingGrid":
        import base64

        import numpy as np

        arr = np.asarray(vectors, dtype="<f4").reshape(rows * cols, -1)
        return cls(rows=rows, cols=cols, dim=arr.shape[1], data=base64.b64encode(arr.tobytes()).decode("ascii"))

    def array(self):
        """The vectors, a float32 numpy array (rows·cols, dim)."""
        import base64

        import numpy as np

        return np.frombuffer(base64.b64decode(self.data), dtype="<f4").reshape(self.rows * self.cols, self.dim)


class JobSpec(BaseModel):
    """A validated, normalised request: everything the worker needs to run the job.

    ``options``: the engine's options (its options model, :mod:`models.engine`), resolved and dumped to JSON."""

    model: str
    engine: str
    conditioning: Literal["mask", "subtype", "embedding", "embedding_grid"]
    width: int
    height: int
    mpp: float
    seed: int
    steps: int
    guidance: float
    eta: float = 1.0
    options: dict[str, Any] = Field(default_factory=dict)
    outputs: list[Literal["tiff", "zarr"]] = Field(default_factory=lambda: ["tiff"])
    compression: Literal["jpeg", "deflate", "zstd"] = "jpeg"
    quality: int = 90
    zarr_version: Literal["0.4", "0.5"] = "0.4"
    subtype: str | None = None
    subtype_id: int | None = None
    embedding: list[float] | None = None
    embedding_grid: EmbeddingGrid | None = None  # records from before grids have none
    encoder: str | None = None
    mask_file: str | None = None  # relative to the job directory
    mask_width: int | None = None
    mask_height: int | None = None
    mask_mpp: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _options_of_older_records(cls, data: Any) -> Any:
        # records written before engine options existed kept DiffInfinite's as flat fields
        if isinstance(data, dict) and any(k in data for k in _FLAT_DIFFINFINITE_OPTIONS):
            data = dict(data)
            flat = {k: data.pop(k) for k in _FLAT_DIFFINFINITE_OPTIONS if k in data}
            try:
                takes = get_engine(str(data.get("engine"))).options_model.model_fields
            except KeyError:
                takes = {}
            if "options" not in data:  # only what the job's engine takes: the others were ignored then
                data["options"] = {k: v for k, v in flat.items() if v is not None and k in takes}
        return data


_FLAT_DIFFINFINITE_OPTIONS = ("sampler", "decoder", "decode_tile", "decode_overlap", "decode_context")


class JobRecord(BaseModel):
    id: str
    tenant: str = "public"
    status: JobStatus = JobStatus.queued
    priority: Priority = Priority.normal  # records from before priorities are normal: they were on that queue
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
    worker: str | None = None  # "hostname/pid" of the process running it
    claim: str | None = None  # fencing token of the current run; only its holder may finish the job
    heartbeat_at: float | None = None  # last progress write of the running job
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
        """Set fields of an existing job (progress, stage, …); a deleted job stays deleted."""

    @abstractmethod
    def transition(self, job_id: str, allowed: set[JobStatus], expect: dict[str, Any] | None = None,
                   **fields: Any) -> bool:
        """Set fields only if the status is in ``allowed`` and every ``expect`` field has the given value
        (e.g. the run's claim token); True when applied. Atomic."""

    @abstractmethod
    def running(self) -> list[JobRecord]:
        """Every job whose status is ``running`` (for recovery after a worker dies)."""

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


# ARGV: n_allowed, allowed statuses…, n_expect, (field, value)×n_expect, (field, value)… to set.
_TRANSITION_LUA = """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return 0 end
local n = tonumber(ARGV[1])
local ok = false
for i = 1, n do
  if cur == ARGV[1 + i] then ok = true end
end
if not ok then return 0 end
local m = tonumber(ARGV[2 + n])
local k = 3 + n
for i = 1, m do
  if redis.call('HGET', KEYS[1], ARGV[k]) ~= ARGV[k + 1] then return 0 end
  k = k + 2
end
for j = k, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[j], ARGV[j + 1])
end
return 1
"""

# Update only while the job exists, so a late progress write cannot resurrect a deleted job.
_UPDATE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for j = 1, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[j], ARGV[j + 1])
end
return 1
"""


class RedisJobStore(JobStore):
    def __init__(self, url: str, data_dir: Path, prefix: str = "slidesynth"):
        import redis

        super().__init__(data_dir)
        self.redis = redis.Redis.from_url(url)
        self.prefix = prefix
        self._transition = self.redis.register_script(_TRANSITION_LUA)
        self._update = self.redis.register_script(_UPDATE_LUA)

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
        args = [x for kv in _encode(fields).items() for x in kv]
        self._update(keys=[self._key(job_id)], args=args)

    def transition(self, job_id: str, allowed: set[JobStatus], expect: dict[str, Any] | None = None,
                   **fields: Any) -> bool:
        args: list[str] = [str(len(allowed))]
        args += [json.dumps(s.value) for s in allowed]
        expected = _encode(expect or {})
        args.append(str(len(expected)))
        args += [x for kv in expected.items() for x in kv]
        args += [x for kv in _encode(fields).items() for x in kv]
        return bool(self._transition(keys=[self._key(job_id)], args=args))

    def running(self) -> list[JobRecord]:
        jobs = []
        for key in self.redis.scan_iter(f"{self.prefix}:job:*", count=1000):
            name = key.decode()
            if name.count(":") != 2 or name.endswith(":cancel"):
                continue
            if self.redis.hget(key, "status") == json.dumps(JobStatus.running.value).encode():
                job = self.get(name.rsplit(":", 1)[1])
                if job is not None:
                    jobs.append(job)
        return jobs

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
    def _locked(self, job_id: str, create: bool = False) -> Iterator[bool]:
        """Hold the job's lock; yields False (without creating anything) when the job folder is gone."""
        lock_path = self.job_dir(job_id) / "job.lock"
        if create:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
        elif not lock_path.parent.is_dir():
            yield False
            return
        with open(lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield True
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
        with self._locked(job.id, create=True):
            self._write(job.id, job.model_dump(mode="json"))

    def get(self, job_id: str) -> JobRecord | None:
        try:
            data = self._read(job_id)
        except ValueError:
            return None
        return None if data is None else JobRecord.model_validate(data)

    def update(self, job_id: str, **fields: Any) -> None:
        with self._locked(job_id) as exists:
            data = self._read(job_id) if exists else None
            if data is None:
                return
            data.update({k: json.loads(v) for k, v in _encode(fields).items()})
            self._write(job_id, data)

    def transition(self, job_id: str, allowed: set[JobStatus], expect: dict[str, Any] | None = None,
                   **fields: Any) -> bool:
        with self._locked(job_id) as exists:
            data = self._read(job_id) if exists else None
            if data is None or data["status"] not in {s.value for s in allowed}:
                return False
            for key, value in _encode(expect or {}).items():
                if data.get(key) != json.loads(value):
                    return False
            data.update({k: json.loads(v) for k, v in _encode(fields).items()})
            self._write(job_id, data)
            return True

    def running(self) -> list[JobRecord]:
        root = self.data_dir / "jobs"
        jobs = [self.get(child.name) for child in root.iterdir() if child.name.isalnum()] if root.is_dir() else []
        return [j for j in jobs if j is not None and j.status == JobStatus.running]

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
        with self._locked(job_id) as exists:
            if exists:
                for name in ("job.json", "cancel"):
                    (self.job_dir(job_id) / name).unlink(missing_ok=True)

    def request_cancel(self, job_id: str) -> None:
        with self._locked(job_id) as exists:
            if exists:
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
