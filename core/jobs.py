"""Job records and the job store: the single source of truth for a job's status.

Celery's result backend is not used for status (its PENDING also means "unknown id").
Two stores share one interface:

* :class:`RedisJobStore` — a Redis hash per job under ``{prefix}:job:{id}``, a per-tenant sorted
  set ``{prefix}:tenant:{tenant}:jobs`` (score = creation time) and a cancel flag
  ``{prefix}:job:{id}:cancel``. Status transitions are atomic (a Lua compare-and-set) and keep the indexes
  the quotas and the retention sweep read in step with the records, in the same script: per tenant the sets
  ``…:tenant:{tenant}:queued`` / ``…:running`` and the pixel ledger ``…:tenant:{tenant}:pixels`` (sorted set,
  score = submission time) + ``…:pixel-sizes`` (hash id → pixels); globally ``{prefix}:finished`` and
  ``{prefix}:expired`` (sorted sets, score = finish time) and ``{prefix}:purge`` (expired jobs whose files are
  still to be removed).
* :class:`FileJobStore` — ``{data_dir}/jobs/{id}/job.json`` guarded by ``fcntl`` locks, for the
  embedded mode that runs without any server; quotas count the records under one lock
  (``{data_dir}/quota/lock``) and keep the pixel ledger in ``{data_dir}/quota/pixels.json``.

Every write to a job (``update``, a ``transition`` that applies) increments the record's ``event_seq``. The Redis
store also appends, in the same Lua call, a snapshot of the record without its spec to a capped Redis Stream
``{prefix}:job:{id}:events`` (entry id ``0-<event_seq>``) and publishes ``"<job id> <event_seq>"`` on
``{prefix}:job-events``: what ``GET /jobs/{id}/events`` follows (:mod:`core.events`).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
import uuid
from abc import ABC, abstractmethod
from contextlib import contextmanager
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, Iterator, Literal

from pydantic import BaseModel, Field, model_validator

from core.quotas import PIXEL_WINDOW_SECONDS, Quota, QuotaExceeded, busy_retry_after, pixel_retry_after
from models.engine import Stage, get_engine


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"
    expired = "expired"  # finished, and its files removed after SLIDESYNTH_RETENTION_HOURS; the record stays

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.canceled, JobStatus.expired)


# Finished jobs whose files are still there: what the retention sweep expires.
FINISHED = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.canceled})


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
    webhook: str | None = None  # http(s) URL the job's events are POSTed to (core.webhooks)
    webhook_events: list[Literal["start", "progress", "completed"]] = Field(default_factory=list)

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
    expired_at: float | None = None  # when the retention sweep removed its files
    event_seq: int = 0  # incremented by every write: the id of the job's server-sent events
    webhook_deliveries: int = 0  # webhook events delivered (2xx)
    webhook_failures: int = 0  # webhook delivery attempts that failed (each retry counts)
    webhook_last_error: str | None = None
    webhook_completed_at: float | None = None  # when the `completed` webhook was claimed (sent once per job)

    @property
    def pixels(self) -> int:
        """Output pixels, what the daily pixel quota counts."""
        return self.spec.width * self.spec.height


def new_job_id() -> str:
    return uuid.uuid4().hex


def iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat()


class JobStore(ABC):
    """Where job records live. Every method is safe to call from the API and workers concurrently."""

    # What a method raises while the store cannot be reached (a Redis restart: refused connections, then LOADING
    # while it reads its AOF): a moment of the store, not a fault of the job.
    unavailable: tuple[type[BaseException], ...] = ()

    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)

    def job_dir(self, job_id: str) -> Path:
        """The job's folder for inputs and outputs (ids are server-made hex, so no traversal)."""
        if not job_id.isalnum():
            raise ValueError(f"invalid job id {job_id!r}")
        return self.data_dir / "jobs" / job_id

    @abstractmethod
    def create(self, job: JobRecord, quota: Quota | None = None) -> None:
        """Store a new job. With a ``quota``, first check the tenant's limits and reserve in the same atomic step:
        :class:`QuotaExceeded` when the tenant already has ``quota.running`` running or ``quota.queued`` queued
        jobs, or when ``job.pixels`` would take the pixels it submitted in the last 24 h over
        ``quota.pixels_per_day``. Every job's pixels go into the tenant's ledger (a job that finishes or is deleted
        without ever having started is taken out again)."""

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
    def usage(self, tenant: str, now: float | None = None) -> dict[str, int]:
        """What the tenant's quotas count now: ``queued`` and ``running`` jobs, ``pixels`` submitted in the last
        24 h."""

    @abstractmethod
    def finished_before(self, cutoff: float, limit: int = 1000) -> list[str]:
        """Ids of succeeded, failed or canceled (not yet expired) jobs that finished at or before ``cutoff``,
        oldest first."""

    @abstractmethod
    def expired_before(self, cutoff: float, limit: int = 1000) -> list[str]:
        """Ids of expired jobs that had finished at or before ``cutoff``, oldest first."""

    @abstractmethod
    def purge_pending(self) -> list[str]:
        """Ids of expired jobs whose files may still be there."""

    @abstractmethod
    def purge(self, job_id: str) -> None:
        """Remove the job's files (its folder, but the store's own record files), then take it off
        :meth:`purge_pending`. Idempotent; safe beside another sweeper purging the same job."""

    def reindex(self) -> int:
        """Rebuild the indexes quotas and retention read from the records (records written before them); the
        number of records seen."""
        return 0

    @abstractmethod
    def status_counts(self) -> dict[str, int]:
        """The number of job records of each status (every :class:`JobStatus`, 0 when none): what the metrics
        read at scrape time. One pass over the records."""

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


# A script that writes a job ends with publish(stream key) (_PUBLISH_LUA): it increments the record's event_seq,
# appends a snapshot of the record (every field but the spec, which never changes and can be megabytes) to the
# job's capped event stream with the id 0-<event_seq>, and publishes "<job id> <event_seq>". Such a script's last
# four ARGV (after E - 1) are: the channel, the stream's length, its ttl while the job is active and once it has
# finished. pcall: a notification never fails the write itself.
_PUBLISH_LUA = """
local E = #ARGV - 3
local function publish(stream)
  local seq = redis.call('HINCRBY', KEYS[1], 'event_seq', 1)
  local fields = {}
  for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
    if f ~= 'spec' and f ~= 'event_seq' then fields[#fields + 1] = f end
  end
  local vals = redis.call('HMGET', KEYS[1], unpack(fields))
  local entry = {}
  for i, f in ipairs(fields) do
    if vals[i] then
      entry[#entry + 1] = f
      entry[#entry + 1] = vals[i]
    end
  end
  redis.pcall('XADD', stream, 'MAXLEN', '~', ARGV[E + 1], '0-' .. seq, unpack(entry))
  local status = redis.call('HGET', KEYS[1], 'status')
  local ttl = ARGV[E + 2]
  if status ~= '"queued"' and status ~= '"running"' then ttl = ARGV[E + 3] end
  redis.pcall('EXPIRE', stream, tonumber(ttl))
  redis.pcall('PUBLISH', ARGV[E], string.match(KEYS[1], '([^:]+)$') .. ' ' .. seq)
end
"""

# Every script that changes a job takes the same keys (RedisJobStore._keys): 1 the job's hash, 2 and 3 its
# tenant's queued and running sets, 4 the finished and 5 the expired sorted sets, 6 the purge set, 7 and 8 the
# tenant's pixel ledger (sorted set id → submission time, hash id → pixels), 9 the tenant's job list, 10 the
# cancel flag, 11 the job's event stream; ARGV[1] is the job id. _INDEX puts the job into the indexes its record
# calls for (none once the record is gone), so the quota counts and the retention sweep can never disagree with
# the records.
_INDEX_LUA = _PUBLISH_LUA + """
local function num(v)
  if v then return tonumber(v) end
  return nil
end
local function refund(id)
  redis.call('ZREM', KEYS[7], id)
  redis.call('HDEL', KEYS[8], id)
end
local function reindex(id)
  local f = redis.call('HMGET', KEYS[1], 'status', 'finished_at', 'created_at', 'started_at')
  local status = nil
  if f[1] then status = string.sub(f[1], 2, -2) end
  if status == 'queued' then redis.call('SADD', KEYS[2], id) else redis.call('SREM', KEYS[2], id) end
  if status == 'running' then redis.call('SADD', KEYS[3], id) else redis.call('SREM', KEYS[3], id) end
  local finished = num(f[2]) or num(f[3]) or 0
  if status == 'succeeded' or status == 'failed' or status == 'canceled' then
    redis.call('ZADD', KEYS[4], finished, id)
  else
    redis.call('ZREM', KEYS[4], id)
  end
  if status == 'expired' then redis.call('ZADD', KEYS[5], finished, id) else redis.call('ZREM', KEYS[5], id) end
  if status and status ~= 'queued' and status ~= 'running' and (not f[4] or f[4] == 'null') then
    refund(id)  -- finished without ever starting (canceled while queued): its pixels are not counted
  end
end
"""

# ARGV: id, n_allowed, allowed statuses…, n_expect, (field, value)×n_expect, (field, value)… to set.
_TRANSITION_LUA = _INDEX_LUA + """
local cur = redis.call('HGET', KEYS[1], 'status')
if not cur then return 0 end
local n = tonumber(ARGV[2])
local ok = false
for i = 1, n do
  if cur == ARGV[2 + i] then ok = true end
end
if not ok then return 0 end
local m = tonumber(ARGV[3 + n])
local k = 4 + n
for i = 1, m do
  if redis.call('HGET', KEYS[1], ARGV[k]) ~= ARGV[k + 1] then return 0 end
  k = k + 2
end
for j = k, E - 1, 2 do
  redis.call('HSET', KEYS[1], ARGV[j], ARGV[j + 1])
end
local new = redis.call('HGET', KEYS[1], 'status')
if new == '"expired"' and cur ~= new then redis.call('SADD', KEYS[6], ARGV[1]) end
reindex(ARGV[1])
publish(KEYS[11])
return 1
"""

# ARGV: id, created_at, now, pixels, running limit, queued limit, pixels-per-day limit, window seconds,
# (field, value)… of the record. Checks the limits (0 = none) and stores the job in one atomic step. Answers
# {'ok'}, {'running'|'queued', count}, or {'pixels', used, (submitted_at, pixels)… oldest first}.
_CREATE_LUA = _INDEX_LUA + """
local id = ARGV[1]
local now, px = tonumber(ARGV[3]), tonumber(ARGV[4])
local max_running, max_queued, max_pixels = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
if max_running > 0 then
  local c = redis.call('SCARD', KEYS[3])
  if c >= max_running then return {'running', tostring(c)} end
end
if max_queued > 0 then
  local c = redis.call('SCARD', KEYS[2])
  if c >= max_queued then return {'queued', tostring(c)} end
end
local cutoff = now - tonumber(ARGV[8])
for _, old in ipairs(redis.call('ZRANGEBYSCORE', KEYS[7], '-inf', cutoff)) do
  redis.call('HDEL', KEYS[8], old)
end
redis.call('ZREMRANGEBYSCORE', KEYS[7], '-inf', cutoff)
if max_pixels > 0 then
  local used = 0
  for _, v in ipairs(redis.call('HVALS', KEYS[8])) do used = used + tonumber(v) end
  if used + px > max_pixels then
    local out = {'pixels', tostring(used)}
    local entries = redis.call('ZRANGE', KEYS[7], 0, -1, 'WITHSCORES')
    for i = 1, #entries, 2 do
      table.insert(out, entries[i + 1])
      table.insert(out, redis.call('HGET', KEYS[8], entries[i]) or '0')
    end
    return out
  end
end
for j = 9, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[j], ARGV[j + 1])
end
redis.call('ZADD', KEYS[9], ARGV[2], id)
redis.call('ZADD', KEYS[7], now, id)
redis.call('HSET', KEYS[8], id, ARGV[4])
redis.call('EXPIRE', KEYS[7], ARGV[8])  -- a tenant that stops submitting leaves no ledger behind
redis.call('EXPIRE', KEYS[8], ARGV[8])
reindex(id)
return {'ok'}
"""

# Remove the record and its cancel flag, and the job from every index; a job that never started leaves the
# pixel ledger too.
_DELETE_LUA = _INDEX_LUA + """
local started = redis.call('HGET', KEYS[1], 'started_at')
redis.call('DEL', KEYS[1], KEYS[10], KEYS[11])
redis.call('ZREM', KEYS[9], ARGV[1])
redis.call('SREM', KEYS[6], ARGV[1])
if started == 'null' then refund(ARGV[1]) end
reindex(ARGV[1])
return 1
"""

_REINDEX_LUA = _INDEX_LUA + """
reindex(ARGV[1])
return 1
"""

# Take a job off an index its record no longer belongs to (the record was deleted behind the store's back, or
# lost with a Redis restart): KEYS 1 the job's hash, 2 the index; ARGV id, the status the index holds ('' =
# any: the record must only exist), 'set' or 'zset'.
_HEAL_LUA = """
local status = redis.call('HGET', KEYS[1], 'status')
if status and (ARGV[2] == '' or status == ARGV[2]) then return 0 end
if ARGV[3] == 'set' then return redis.call('SREM', KEYS[2], ARGV[1]) end
return redis.call('ZREM', KEYS[2], ARGV[1])
"""

# Update only while the job exists, so a late progress write cannot resurrect a deleted job. KEYS: the job's hash,
# its event stream.
_UPDATE_LUA = _PUBLISH_LUA + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for j = 1, E - 1, 2 do
  redis.call('HSET', KEYS[1], ARGV[j], ARGV[j + 1])
end
publish(KEYS[2])
return 1
"""

EVENT_STREAM_LENGTH = 1000  # events kept per job for Last-Event-ID resumes (approximate: XADD MAXLEN ~)
# seconds an event stream outlives the job's last write: while it is queued or running (longer than the longest
# job, SLIDESYNTH_TASK_TIME_LIMIT at most 24 h by default), and once it has finished (time to resume a stream)
EVENT_STREAM_TTL = 3 * 24 * 3600
EVENT_STREAM_TTL_FINISHED = 3600


def job_key(prefix: str, job_id: str) -> str:
    return f"{prefix}:job:{job_id}"


def event_stream_key(prefix: str, job_id: str) -> str:
    """The job's capped Redis Stream of record snapshots, entry ids ``0-<event_seq>``."""
    return f"{prefix}:job:{job_id}:events"


def event_channel(prefix: str) -> str:
    """The pub/sub channel every job write is announced on, as ``"<job id> <event_seq>"``."""
    return f"{prefix}:job-events"


def decode_snapshot(job: JobRecord, seq: int, fields: dict) -> JobRecord:
    """The record at event ``seq``: the snapshot's fields (JSON as stored in the hash) with ``job``'s spec."""
    data = {(k.decode() if isinstance(k, bytes) else k): json.loads(v) for k, v in fields.items()}
    data.update(id=job.id, spec=job.spec, event_seq=seq)
    return JobRecord.model_validate(data)


_INDEXED_FIELDS = {"status", "finished_at", "created_at", "started_at"}


class RedisJobStore(JobStore):
    def __init__(self, url: str, data_dir: Path, prefix: str = "slidesynth", **redis_options: Any):
        """``redis_options``: keyword arguments of the Redis client (e.g. ``socket_timeout``)."""
        import redis

        super().__init__(data_dir)
        self.url = url
        self.redis = redis.Redis.from_url(url, **redis_options)
        self.unavailable = (redis.ConnectionError, redis.TimeoutError)  # BusyLoadingError is a ConnectionError
        self.prefix = prefix
        self._transition = self.redis.register_script(_TRANSITION_LUA)
        self._update = self.redis.register_script(_UPDATE_LUA)
        self._create = self.redis.register_script(_CREATE_LUA)
        self._delete = self.redis.register_script(_DELETE_LUA)
        self._reindex = self.redis.register_script(_REINDEX_LUA)
        self._heal = self.redis.register_script(_HEAL_LUA)

    def _key(self, job_id: str) -> str:
        return job_key(self.prefix, job_id)

    def _publish_args(self) -> list:
        """The last ARGV of a script that writes a job (_PUBLISH_LUA)."""
        return [event_channel(self.prefix), EVENT_STREAM_LENGTH, EVENT_STREAM_TTL, EVENT_STREAM_TTL_FINISHED]

    def _tenant_key(self, tenant: str, what: str = "jobs") -> str:
        return f"{self.prefix}:tenant:{tenant}:{what}"

    def _keys(self, job_id: str, tenant: str) -> list[str]:
        return [self._key(job_id), self._tenant_key(tenant, "queued"), self._tenant_key(tenant, "running"),
                f"{self.prefix}:finished", f"{self.prefix}:expired", f"{self.prefix}:purge",
                self._tenant_key(tenant, "pixels"), self._tenant_key(tenant, "pixel-sizes"),
                self._tenant_key(tenant), self._key(job_id) + ":cancel", event_stream_key(self.prefix, job_id)]

    def _tenant_of(self, job_id: str) -> str | None:
        raw = self.redis.hget(self._key(job_id), "tenant")
        return None if raw is None else json.loads(raw)

    def create(self, job: JobRecord, quota: Quota | None = None) -> None:
        quota = quota or Quota()
        fields = [x for kv in _encode(dict(job)).items() for x in kv]
        keys = self._keys(job.id, job.tenant)
        for attempt in range(2):
            now = time.time()
            answer = self._create(keys=keys, args=[
                job.id, repr(job.created_at), repr(now), str(job.pixels), str(quota.running), str(quota.queued),
                str(quota.pixels_per_day), str(PIXEL_WINDOW_SECONDS), *fields])
            kind = answer[0].decode()
            if kind == "ok":
                return
            if kind in ("running", "queued"):
                # a member whose record is gone or moved on (deleted behind the store's back) must not count
                if attempt == 0 and self._heal_set(job.tenant, kind):
                    continue
                etas = [j.eta_seconds for j in self._tenant_jobs(job.tenant, "running")]
                allowed = quota.running if kind == "running" else quota.queued
                raise QuotaExceeded(job.tenant, kind, allowed, int(answer[1]), busy_retry_after(etas))
            used = int(float(answer[1]))
            entries = [(float(answer[i]), int(float(answer[i + 1]))) for i in range(2, len(answer), 2)]
            raise QuotaExceeded(job.tenant, "pixels", quota.pixels_per_day, used,
                                pixel_retry_after(entries, used, job.pixels, quota.pixels_per_day, now),
                                requested=job.pixels)

    def _heal_set(self, tenant: str, status: str) -> int:
        key = self._tenant_key(tenant, status)
        expected = json.dumps(status)
        return sum(self._heal(keys=[self._key(m.decode()), key], args=[m.decode(), expected, "set"])
                   for m in self.redis.smembers(key))

    def _tenant_jobs(self, tenant: str, status: str) -> list[JobRecord]:
        ids = [m.decode() for m in self.redis.smembers(self._tenant_key(tenant, status))]
        return [j for j in (self.get(i) for i in ids) if j is not None and j.status.value == status]

    def get(self, job_id: str) -> JobRecord | None:
        raw = self.redis.hgetall(self._key(job_id))
        if not raw:
            return None
        data = {k.decode(): json.loads(v) for k, v in raw.items()}
        data["cancel_requested"] = data.get("cancel_requested", False) or self.cancel_requested(job_id)
        return JobRecord.model_validate(data)

    def update(self, job_id: str, **fields: Any) -> None:
        if _INDEXED_FIELDS & fields.keys():  # what the indexes follow: through the script that keeps them
            self.transition(job_id, set(JobStatus), **fields)
            return
        args = [x for kv in _encode(fields).items() for x in kv]
        self._update(keys=[self._key(job_id), event_stream_key(self.prefix, job_id)], args=args + self._publish_args())

    def transition(self, job_id: str, allowed: set[JobStatus], expect: dict[str, Any] | None = None,
                   **fields: Any) -> bool:
        tenant = self._tenant_of(job_id)  # never changes once created
        if tenant is None:
            return False
        args: list[str] = [job_id, str(len(allowed))]
        args += [json.dumps(s.value) for s in allowed]
        expected = _encode(expect or {})
        args.append(str(len(expected)))
        args += [x for kv in expected.items() for x in kv]
        args += [x for kv in _encode(fields).items() for x in kv]
        return bool(self._transition(keys=self._keys(job_id, tenant), args=args + self._publish_args()))

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

    def status_counts(self) -> dict[str, int]:
        counts = {status.value: 0 for status in JobStatus}
        keys: list[bytes] = []

        def count(batch: list[bytes]) -> None:
            pipe = self.redis.pipeline(transaction=False)
            for key in batch:
                pipe.hget(key, "status")
            for raw in pipe.execute():
                if raw is not None:
                    status = json.loads(raw)
                    counts[status] = counts.get(status, 0) + 1

        for key in self.redis.scan_iter(f"{self.prefix}:job:*", count=1000):
            name = key.decode()
            if name.count(":") != 2 or name.endswith(":cancel"):
                continue
            keys.append(key)
            if len(keys) >= 1000:
                count(keys)
                keys = []
        if keys:
            count(keys)
        return counts

    def list(self, tenant: str, offset: int, limit: int) -> tuple[list[JobRecord], int]:
        key = self._tenant_key(tenant)
        total = self.redis.zcard(key)
        ids = self.redis.zrevrange(key, offset, offset + limit - 1)
        jobs = [j for j in (self.get(i.decode()) for i in ids) if j is not None]
        return jobs, total

    def delete(self, job_id: str) -> None:
        tenant = self._tenant_of(job_id)
        if tenant is None:  # no record: only what is not per tenant can be cleaned here
            pipe = self.redis.pipeline()
            pipe.delete(self._key(job_id), self._key(job_id) + ":cancel", event_stream_key(self.prefix, job_id))
            for index in ("finished", "expired"):
                pipe.zrem(f"{self.prefix}:{index}", job_id)
            pipe.srem(f"{self.prefix}:purge", job_id)
            pipe.execute()
            return
        self._delete(keys=self._keys(job_id, tenant), args=[job_id])

    def usage(self, tenant: str, now: float | None = None) -> dict[str, int]:
        now = time.time() if now is None else now
        pipe = self.redis.pipeline()
        pipe.scard(self._tenant_key(tenant, "queued"))
        pipe.scard(self._tenant_key(tenant, "running"))
        pipe.zrangebyscore(self._tenant_key(tenant, "pixels"), f"({now - PIXEL_WINDOW_SECONDS!r}", "+inf")
        queued, running, ids = pipe.execute()
        sizes = self.redis.hmget(self._tenant_key(tenant, "pixel-sizes"), ids) if ids else []
        return {"queued": queued, "running": running, "pixels": sum(int(float(s)) for s in sizes if s is not None)}

    def _index_range(self, index: str, cutoff: float, limit: int) -> list[str]:
        key = f"{self.prefix}:{index}"
        ids = [m.decode() for m in self.redis.zrangebyscore(key, "-inf", repr(cutoff), start=0, num=limit)]
        live = []
        for job_id in ids:
            if self._heal(keys=[self._key(job_id), key], args=[job_id, "", "zset"]) == 0:
                live.append(job_id)
        return live

    def finished_before(self, cutoff: float, limit: int = 1000) -> list[str]:
        return self._index_range("finished", cutoff, limit)

    def expired_before(self, cutoff: float, limit: int = 1000) -> list[str]:
        return self._index_range("expired", cutoff, limit)

    def purge_pending(self) -> list[str]:
        return sorted(m.decode() for m in self.redis.smembers(f"{self.prefix}:purge"))

    def purge(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        self.redis.srem(f"{self.prefix}:purge", job_id)

    def reindex(self) -> int:
        seen = 0
        for key in self.redis.scan_iter(f"{self.prefix}:job:*", count=1000):
            name = key.decode()
            if name.count(":") != 2:
                continue
            job_id = name.rsplit(":", 1)[1]
            tenant = self._tenant_of(job_id)
            if tenant is not None:
                self._reindex(keys=self._keys(job_id, tenant), args=[job_id])
                seen += 1
        return seen

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

    RECORD_FILES = frozenset({"job.json", "job.json.tmp", "job.lock", "cancel"})  # the store's own files

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

    @contextmanager
    def _quota_locked(self) -> Iterator[Path]:
        """Hold the store-wide quota lock (taken before a job's lock, never while holding one); yields the
        pixel ledger's path."""
        folder = self.data_dir / "quota"
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield folder / "pixels.json"
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @staticmethod
    def _ledger(path: Path, now: float) -> dict[str, dict[str, list[float]]]:
        """tenant → job id → [submitted_at, pixels], within the last 24 h."""
        try:
            ledger = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            ledger = {}
        cutoff = now - PIXEL_WINDOW_SECONDS
        return {tenant: kept for tenant, entries in ledger.items()
                if (kept := {i: e for i, e in entries.items() if e[0] > cutoff})}

    @staticmethod
    def _write_ledger(path: Path, ledger: dict) -> None:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(ledger))
        os.replace(tmp, path)

    def _refund(self, tenant: str, job_id: str) -> None:
        with self._quota_locked() as path:
            ledger = self._ledger(path, time.time())
            if ledger.get(tenant, {}).pop(job_id, None) is not None:
                self._write_ledger(path, ledger)

    def _refund_if_never_started(self, data: dict | None) -> None:
        if data is not None and JobStatus(data["status"]).terminal and data.get("started_at") is None:
            self._refund(data.get("tenant", "public"), data["id"])

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

    def _records(self) -> Iterator[JobRecord]:
        root = self.data_dir / "jobs"
        if root.is_dir():
            for child in root.iterdir():
                job = self.get(child.name) if child.name.isalnum() else None
                if job is not None:
                    yield job

    def create(self, job: JobRecord, quota: Quota | None = None) -> None:
        quota = quota or Quota()
        with self._quota_locked() as ledger_path:
            now = time.time()
            if quota.running or quota.queued:
                mine = [j for j in self._records() if j.tenant == job.tenant]
                running = [j for j in mine if j.status == JobStatus.running]
                queued = [j for j in mine if j.status == JobStatus.queued]
                etas = [j.eta_seconds for j in running]
                if quota.running and len(running) >= quota.running:
                    raise QuotaExceeded(job.tenant, "running", quota.running, len(running), busy_retry_after(etas))
                if quota.queued and len(queued) >= quota.queued:
                    raise QuotaExceeded(job.tenant, "queued", quota.queued, len(queued), busy_retry_after(etas))
            ledger = self._ledger(ledger_path, now)
            entries = ledger.setdefault(job.tenant, {})
            if quota.pixels_per_day:
                used = int(sum(e[1] for e in entries.values()))
                if used + job.pixels > quota.pixels_per_day:
                    oldest_first = sorted((e[0], int(e[1])) for e in entries.values())
                    raise QuotaExceeded(job.tenant, "pixels", quota.pixels_per_day, used,
                                        pixel_retry_after(oldest_first, used, job.pixels, quota.pixels_per_day, now),
                                        requested=job.pixels)
            entries[job.id] = [now, job.pixels]
            self._write_ledger(ledger_path, ledger)
            with self._locked(job.id, create=True):
                self._write(job.id, job.model_dump(mode="json"))
        if job.status.terminal and job.started_at is None:  # (a record stored finished: tests, imports)
            self._refund(job.tenant, job.id)

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
            data["event_seq"] = data.get("event_seq", 0) + 1
            self._write(job_id, data)
        if "status" in fields:
            self._refund_if_never_started(data)

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
            data["event_seq"] = data.get("event_seq", 0) + 1
            self._write(job_id, data)
        if "status" in fields:
            self._refund_if_never_started(data)
        return True

    def running(self) -> list[JobRecord]:
        return [j for j in self._records() if j.status == JobStatus.running]

    def status_counts(self) -> dict[str, int]:
        counts = {status.value: 0 for status in JobStatus}
        for job in self._records():
            counts[job.status.value] += 1
        return counts

    def list(self, tenant: str, offset: int, limit: int) -> tuple[list[JobRecord], int]:
        jobs = [j for j in self._records() if j.tenant == tenant]
        jobs.sort(key=lambda j: j.created_at, reverse=True)
        return jobs[offset : offset + limit], len(jobs)

    def delete(self, job_id: str) -> None:
        data = None
        with self._locked(job_id) as exists:
            if exists:
                data = self._read(job_id)
                for name in ("job.json", "cancel"):
                    (self.job_dir(job_id) / name).unlink(missing_ok=True)
        if data is not None and data.get("started_at") is None:
            self._refund(data.get("tenant", "public"), job_id)

    def usage(self, tenant: str, now: float | None = None) -> dict[str, int]:
        now = time.time() if now is None else now
        mine = [j for j in self._records() if j.tenant == tenant]
        with self._quota_locked() as path:
            pixels = int(sum(e[1] for e in self._ledger(path, now).get(tenant, {}).values()))
        return {"queued": sum(j.status == JobStatus.queued for j in mine),
                "running": sum(j.status == JobStatus.running for j in mine), "pixels": pixels}

    @staticmethod
    def _finished(job: JobRecord) -> float:
        return job.finished_at if job.finished_at is not None else job.created_at

    def finished_before(self, cutoff: float, limit: int = 1000) -> list[str]:
        jobs = sorted((self._finished(j), j.id) for j in self._records()
                      if j.status in FINISHED and self._finished(j) <= cutoff)
        return [job_id for _, job_id in jobs[:limit]]

    def expired_before(self, cutoff: float, limit: int = 1000) -> list[str]:
        jobs = sorted((self._finished(j), j.id) for j in self._records()
                      if j.status == JobStatus.expired and self._finished(j) <= cutoff)
        return [job_id for _, job_id in jobs[:limit]]

    def _leftovers(self, job_id: str) -> list[Path]:
        try:
            return [p for p in self.job_dir(job_id).iterdir() if p.name not in self.RECORD_FILES]
        except FileNotFoundError:
            return []

    def purge_pending(self) -> list[str]:
        return sorted(j.id for j in self._records() if j.status == JobStatus.expired and self._leftovers(j.id))

    def purge(self, job_id: str) -> None:
        for path in self._leftovers(job_id):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)

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
