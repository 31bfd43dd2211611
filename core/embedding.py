"""Embedding requests: the API asks a worker to embed tiles and waits for its answer.

Why the worker computes: the API process imports no ML library (docs/architecture.md; a test runs ``import
service.app`` and looks for torch), while workers already hold torch, the device and the weights. The API does
everything that needs no network — header checks, decoding, and the encoder's own resize to its input size
(:mod:`models.encoders.preprocess`, torch-free) — and sends the prepared tiles (input_size² × 3 bytes each: 12 KB
for ``slidesynth-tile-v1``, 150 KB for QuiltNet), so the task only runs the network and every 4xx is answered
before anything is sent.

How, with no Celery result backend (job records live in the job store, not in Celery):

* the request is a :data:`core.queue.TASK_EMBED` task on the embed queue (``SLIDESYNTH_EMBED_QUEUE``, default
  ``<queue>.embed``). Every ``slidesynth worker`` consumes it beside the job queue; a consumer takes from its
  queues in turn, so an embedding does not wait behind a backlog of slides — only behind the job a worker is
  running (a busy worker answers when that job ends; a deployment that wants answers meanwhile runs a worker
  with ``--queues <embed queue>``);
* it expires when the API stops waiting (a worker reaching it later drops it unrun) and is acknowledged on
  receipt, not after: a lost request is the client's to repeat, not the broker's to redeliver hours later;
* the answer goes to a reply box in the job store's backend — a Redis list ``{prefix}:reply:{id}`` the API
  ``BLPOP``s (expiring), or in the embedded mode a file ``{data_dir}/replies/{id}.json`` it polls — and is
  removed when read. Nothing of a request outlives it.
"""
from __future__ import annotations

import base64
import json
import os
import time
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from core.queue import TASK_EMBED
from core.settings import Settings

REPLY_TTL = 3600  # s: a reply nobody collected (the API gave up) is removed after this


class NoWorkerAnswer(RuntimeError):
    """No worker answered in time (none running, or all busy)."""


class EmbedFailed(RuntimeError):
    """The worker answered with an error; ``field`` names the request field at fault, if any."""

    def __init__(self, msg: str, field: str | None = None):
        super().__init__(msg)
        self.field = field


class ReplyBox(ABC):
    """Where a worker leaves the answer to one request."""

    @abstractmethod
    def post(self, reply_id: str, payload: dict[str, Any]) -> None: ...

    @abstractmethod
    def wait(self, reply_id: str, timeout: float) -> dict[str, Any] | None:
        """The answer, removed from the box; None after ``timeout`` seconds."""


def _check_id(reply_id: str) -> str:
    if not reply_id.isalnum():
        raise ValueError(f"invalid reply id {reply_id!r}")
    return reply_id


class RedisReplyBox(ReplyBox):
    def __init__(self, url: str, prefix: str):
        import redis

        self.redis = redis.Redis.from_url(url)
        self.prefix = prefix

    def _key(self, reply_id: str) -> str:
        return f"{self.prefix}:reply:{_check_id(reply_id)}"

    def post(self, reply_id: str, payload: dict[str, Any]) -> None:
        pipe = self.redis.pipeline()
        pipe.rpush(self._key(reply_id), json.dumps(payload))
        pipe.expire(self._key(reply_id), REPLY_TTL)
        pipe.execute()

    def wait(self, reply_id: str, timeout: float) -> dict[str, Any] | None:
        try:
            got = self.redis.blpop([self._key(reply_id)], timeout=max(timeout, 0.01))
        finally:
            self.redis.delete(self._key(reply_id))
        return None if got is None else json.loads(got[1])


class FileReplyBox(ReplyBox):
    """Replies as files, for the embedded mode (no server)."""

    def __init__(self, data_dir: Path, poll: float = 0.05):
        self.folder = Path(data_dir) / "replies"
        self.poll = poll

    def _path(self, reply_id: str) -> Path:
        return self.folder / f"{_check_id(reply_id)}.json"

    def post(self, reply_id: str, payload: dict[str, Any]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(reply_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, path)

    def wait(self, reply_id: str, timeout: float) -> dict[str, Any] | None:
        path = self._path(reply_id)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    return json.loads(path.read_text())
                except FileNotFoundError:
                    pass
                if time.monotonic() >= deadline:
                    return None
                time.sleep(self.poll)
        finally:
            path.unlink(missing_ok=True)
            self._sweep()

    def _sweep(self) -> None:
        """Remove replies posted after their requester gave up (a worker racing the deadline)."""
        if not self.folder.is_dir():
            return
        cutoff = time.time() - REPLY_TTL
        for stale in self.folder.iterdir():
            try:
                if stale.stat().st_mtime < cutoff:
                    stale.unlink(missing_ok=True)
            except FileNotFoundError:
                pass


def open_reply_box(settings: Settings) -> ReplyBox:
    """The box of the settings' job-store backend: Redis when one is configured, else files."""
    url = settings.job_store_url
    if url:
        return RedisReplyBox(url, settings.key_prefix)
    return FileReplyBox(settings.data_dir)


def pack_tiles(tiles: np.ndarray) -> dict[str, Any]:
    tiles = np.ascontiguousarray(tiles, dtype=np.uint8)
    return {"shape": list(tiles.shape), "pixels": base64.b64encode(tiles.tobytes()).decode("ascii")}


def unpack_tiles(packed: dict[str, Any]) -> np.ndarray:
    shape = tuple(int(v) for v in packed["shape"])
    if len(shape) != 4 or shape[3] != 3:
        raise ValueError(f"tiles must be (N, S, S, 3), got {shape}")
    return np.frombuffer(base64.b64decode(packed["pixels"]), np.uint8).reshape(shape)


def pack_vectors(vectors: np.ndarray) -> dict[str, Any]:
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    return {"shape": list(vectors.shape), "data": base64.b64encode(vectors.tobytes()).decode("ascii")}


def unpack_vectors(packed: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(packed["data"]), "<f4").reshape(packed["shape"]).astype(np.float32)


def request_embeddings(celery, box: ReplyBox, settings: Settings, encoder_id: str, tiles: np.ndarray) -> np.ndarray:
    """Send prepared tiles (uint8 (N, S, S, 3) at the encoder's input size) to a worker and wait for the
    float32 (N, dim) answer. Raises :class:`NoWorkerAnswer` after ``settings.embed_timeout`` seconds,
    :class:`EmbedFailed` when the worker could not embed them; a broker error propagates."""
    reply_id = uuid.uuid4().hex
    timeout = settings.embed_timeout
    request = {"reply": reply_id, "encoder": encoder_id, "tiles": pack_tiles(tiles)}
    celery.send_task(TASK_EMBED, args=[request], queue=settings.embed_queue_name, expires=timeout)
    answer = box.wait(reply_id, timeout)
    if answer is None:
        raise NoWorkerAnswer(
            f"no worker answered within {timeout:g} s on queue {settings.embed_queue_name!r} (none is running, "
            f"or every worker is busy with a slide job; `slidesynth worker` consumes this queue)")
    if not answer.get("ok"):
        raise EmbedFailed(str(answer.get("error", "unknown error")), answer.get("field"))
    return unpack_vectors(answer["embeddings"])
