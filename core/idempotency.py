"""Idempotency keys of ``POST /generate``: a client's key (per tenant) → the job its first request made.

An entry holds the job id, the fingerprint of the request body and a state: ``pending`` from the moment a request
takes the key until its job is stored and enqueued, then ``created``. A pending entry lives
:data:`PENDING_SECONDS` only, so a request that died half-way frees its key soon; a created one lives
``SLIDESYNTH_IDEMPOTENCY_HOURS``. Taking a key is atomic — of two concurrent requests with one key one takes it
and the other sees its entry — in both stores, beside the job store they go with:

* :class:`RedisIdempotencyKeys` — ``SET NX PX`` on ``{prefix}:idem:{tenant}:{sha256(key)}``; replacing or
  releasing an entry is a compare-and-set Lua script on its exact value (only its owner can).
* :class:`FileIdempotencyKeys` — ``{data_dir}/idempotency/{sha256(tenant, key)}.json`` read and written under
  one ``fcntl`` lock, for the embedded mode.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

PENDING_SECONDS = 60.0  # a request stores and enqueues its job in milliseconds; a dead one frees its key in this


@dataclass(frozen=True)
class KeyEntry:
    job_id: str
    fingerprint: str
    state: Literal["pending", "created"] = "pending"

    def dumps(self) -> str:
        return json.dumps({"job": self.job_id, "fingerprint": self.fingerprint, "state": self.state},
                          sort_keys=True, separators=(",", ":"))

    @classmethod
    def loads(cls, raw: str | bytes) -> "KeyEntry":
        data = json.loads(raw)
        return cls(job_id=data["job"], fingerprint=data["fingerprint"], state=data["state"])


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()


class IdempotencyKeys(ABC):
    """Where keys live. Every method is atomic and safe to call from several API processes."""

    @abstractmethod
    def claim(self, tenant: str, key: str, entry: KeyEntry, ttl: float) -> KeyEntry | None:
        """Store ``entry`` under the key for ``ttl`` seconds unless the key holds a live entry: None when stored,
        else the entry found (nothing is changed)."""

    @abstractmethod
    def replace(self, tenant: str, key: str, old: KeyEntry, new: KeyEntry, ttl: float) -> bool:
        """Swap ``old`` for ``new`` (with a fresh ``ttl``) if the key still holds ``old``; True when done."""

    @abstractmethod
    def release(self, tenant: str, key: str, old: KeyEntry) -> bool:
        """Forget the key if it still holds ``old``; True when done."""

    @abstractmethod
    def get(self, tenant: str, key: str) -> KeyEntry | None:
        """The live entry of the key, if any."""


# KEYS[1]: the key; ARGV: the value expected, the new value ('' = delete), the new time to live in ms.
_COMPARE_AND_SET_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return 1
"""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


class RedisIdempotencyKeys(IdempotencyKeys):
    def __init__(self, url: str, prefix: str):
        import redis

        self.redis = redis.Redis.from_url(url)
        self.prefix = prefix
        self._compare_and_set = self.redis.register_script(_COMPARE_AND_SET_LUA)

    def redis_key(self, tenant: str, key: str) -> str:
        return f"{self.prefix}:idem:{tenant}:{_digest(key)}"

    def claim(self, tenant: str, key: str, entry: KeyEntry, ttl: float) -> KeyEntry | None:
        name = self.redis_key(tenant, key)
        while True:
            if self.redis.set(name, entry.dumps(), nx=True, px=_ms(ttl)):
                return None
            raw = self.redis.get(name)
            if raw is not None:
                return KeyEntry.loads(raw)
            # it expired between SET and GET: try again

    def replace(self, tenant: str, key: str, old: KeyEntry, new: KeyEntry, ttl: float) -> bool:
        return bool(self._compare_and_set(keys=[self.redis_key(tenant, key)],
                                          args=[old.dumps(), new.dumps(), _ms(ttl)]))

    def release(self, tenant: str, key: str, old: KeyEntry) -> bool:
        return bool(self._compare_and_set(keys=[self.redis_key(tenant, key)], args=[old.dumps(), "", 0]))

    def get(self, tenant: str, key: str) -> KeyEntry | None:
        raw = self.redis.get(self.redis_key(tenant, key))
        return None if raw is None else KeyEntry.loads(raw)


class FileIdempotencyKeys(IdempotencyKeys):
    """One JSON file per key, ``{"entry": …, "expires_at": epoch seconds}``; expired files are swept at most
    every :attr:`sweep_every` seconds."""

    sweep_every = 600.0

    def __init__(self, data_dir: Path):
        self.root = Path(data_dir) / "idempotency"
        self._swept = 0.0

    def path(self, tenant: str, key: str) -> Path:
        return self.root / f"{_digest(tenant, key)}.json"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @staticmethod
    def _read(path: Path) -> KeyEntry | None:
        try:
            data = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return KeyEntry.loads(data["entry"]) if data["expires_at"] > time.time() else None

    @staticmethod
    def _write(path: Path, entry: KeyEntry | None, ttl: float = 0.0) -> None:
        if entry is None:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"entry": entry.dumps(), "expires_at": time.time() + ttl}))
        os.replace(tmp, path)

    def _sweep(self) -> None:
        if time.monotonic() - self._swept < self.sweep_every:
            return
        self._swept = time.monotonic()
        for path in self.root.glob("*.json"):
            if self._read(path) is None:
                path.unlink(missing_ok=True)

    def claim(self, tenant: str, key: str, entry: KeyEntry, ttl: float) -> KeyEntry | None:
        path = self.path(tenant, key)
        with self._locked():
            self._sweep()
            found = self._read(path)
            if found is not None:
                return found
            self._write(path, entry, ttl)
            return None

    def replace(self, tenant: str, key: str, old: KeyEntry, new: KeyEntry, ttl: float) -> bool:
        path = self.path(tenant, key)
        with self._locked():
            if self._read(path) != old:
                return False
            self._write(path, new, ttl)
            return True

    def release(self, tenant: str, key: str, old: KeyEntry) -> bool:
        path = self.path(tenant, key)
        with self._locked():
            if self._read(path) != old:
                return False
            self._write(path, None)
            return True

    def get(self, tenant: str, key: str) -> KeyEntry | None:
        with self._locked():
            return self._read(self.path(tenant, key))


def open_idempotency_keys(settings) -> IdempotencyKeys:
    """Beside the job store: Redis when a Redis URL is configured, else files under the data dir."""
    url = settings.job_store_url
    if url:
        return RedisIdempotencyKeys(url, settings.key_prefix)
    return FileIdempotencyKeys(settings.data_dir)
