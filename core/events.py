"""The live events of a job, for ``GET /jobs/{id}/events`` (server-sent events).

Every write to a job increments its ``event_seq`` (:mod:`core.jobs`); an event is the record at one ``event_seq``.
Two feeds read them:

* :class:`RedisEventFeed` — the Redis store appends each write's snapshot to a capped stream per job and publishes
  ``"<job id> <event_seq>"`` on one channel. An API process holds **one** pub/sub connection for all its streams (a
  listener task wakes the streams of the job named in a message), and a woken stream reads the new entries with one
  ``XRANGE``: hundreds of open streams cost one connection and no polling. The entries also serve ``Last-Event-ID``:
  a reconnecting client gets exactly the events it missed while the stream still holds them. A stream that heard
  nothing re-reads every few seconds anyway (a pub/sub reconnect loses messages).
* :class:`PollingEventFeed` — the file store of the embedded mode keeps no history: each stream re-reads the record
  every 0.4 s and sends it when ``event_seq`` moved (intermediate writes between two reads are one event).

:class:`JobEventStream` turns a feed into what one client gets: the current state first (or, after
``Last-Event-ID``, what followed it), then every change of what ``GET /jobs/{id}`` shows, until a terminal status,
with a keep-alive between quiet stretches.
"""
from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import AsyncIterator, Callable

from core.jobs import (JobRecord, JobStore, RedisJobStore, decode_snapshot, event_channel, event_stream_key,
                       job_key)

log = logging.getLogger("slidesynth.events")

POLL_SECONDS = 0.4  # the file store: how often a stream re-reads the record
REDIS_RECHECK_SECONDS = 5.0  # Redis: a stream that heard nothing re-reads its entries this often


class Subscription(ABC):
    @abstractmethod
    async def wait(self, timeout: float) -> bool:
        """Until the job may have changed (True) or ``timeout`` seconds passed (False)."""

    def close(self) -> None:
        pass


_stopping = False


def stop_streams() -> None:
    """End every open stream of this process at its next check (within ``recheck_seconds``): a server asked to stop
    must not wait for jobs to end before its graceful shutdown completes; the clients resume elsewhere with
    ``Last-Event-ID``. Safe in a signal handler (it sets a flag)."""
    global _stopping
    _stopping = True


class EventFeed(ABC):
    recheck_seconds: float

    @abstractmethod
    async def history(self, job: JobRecord, after: int) -> list[JobRecord] | None:
        """The job's records from event ``after`` on (that one first when still known), oldest first; ``[job]``
        when ``after`` is its current event; None when what followed ``after`` is no longer known."""

    @abstractmethod
    async def changes(self, job: JobRecord, cursor: int, check_gone: bool) -> list[JobRecord] | None:
        """Records of the events after ``cursor``, oldest first (may be empty); None when the job is gone (looked
        at when ``check_gone``)."""

    @abstractmethod
    def subscribe(self, job_id: str) -> Subscription:
        """Wake-ups for the job's writes; the first ``wait`` returns at once."""

    async def aclose(self) -> None:
        pass


class _Sleep(Subscription):
    def __init__(self, interval: float):
        self.interval, self.first = interval, True

    async def wait(self, timeout: float) -> bool:
        if self.first:
            self.first = False
            return True
        await asyncio.sleep(max(0.0, min(timeout, self.interval)))
        return False


class PollingEventFeed(EventFeed):
    """For the file store: the record, re-read every ``interval`` seconds."""

    def __init__(self, store: JobStore, interval: float = POLL_SECONDS):
        self.store, self.recheck_seconds = store, interval

    async def _get(self, job_id: str) -> JobRecord | None:
        return await asyncio.to_thread(self.store.get, job_id)

    async def history(self, job: JobRecord, after: int) -> list[JobRecord] | None:
        return [job] if after == job.event_seq else None

    async def changes(self, job: JobRecord, cursor: int, check_gone: bool) -> list[JobRecord] | None:
        current = await self._get(job.id)
        if current is None:
            return None
        return [current] if current.event_seq > cursor else []

    def subscribe(self, job_id: str) -> Subscription:
        return _Sleep(self.recheck_seconds)


class _Wakeup(Subscription):
    def __init__(self, feed: "RedisEventFeed", job_id: str):
        self.feed, self.job_id, self.event = feed, job_id, asyncio.Event()
        self.event.set()

    async def wait(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.event.wait(), max(0.0, timeout))
        except asyncio.TimeoutError:
            return False
        finally:
            self.event.clear()  # cleared before the caller reads: a write after this wakes the next wait
        return True

    def close(self) -> None:
        self.feed._unwatch(self.job_id, self.event)


class RedisEventFeed(EventFeed):
    """One pub/sub listener per API process and event loop, waking the streams of the jobs it hears about."""

    def __init__(self, url: str, prefix: str, recheck_seconds: float = REDIS_RECHECK_SECONDS):
        self.url, self.prefix, self.recheck_seconds = url, prefix, recheck_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._redis = None
        self._listener: asyncio.Task | None = None
        self._watchers: dict[str, set[asyncio.Event]] = {}

    def _client(self):
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # connections belong to one event loop (a new server, a new test client)
            import redis.asyncio

            self._loop, self._listener, self._watchers = loop, None, {}
            self._redis = redis.asyncio.Redis.from_url(self.url)
        return self._redis

    async def history(self, job: JobRecord, after: int) -> list[JobRecord] | None:
        if not 0 <= after <= job.event_seq:
            return None
        entries = await self._client().xrange(event_stream_key(self.prefix, job.id), min=f"0-{after}", max="+")
        records = [self._record(job, entry_id, fields) for entry_id, fields in entries]
        if records and records[0].event_seq in (after, after + 1):
            return records
        if not records and after == job.event_seq:
            return [job]  # up to date (the stream expired or the job was never written since)
        return None

    async def changes(self, job: JobRecord, cursor: int, check_gone: bool) -> list[JobRecord] | None:
        client = self._client()
        entries = await client.xrange(event_stream_key(self.prefix, job.id), min=f"0-{cursor + 1}", max="+")
        if not entries and check_gone and not await client.exists(job_key(self.prefix, job.id)):
            return None
        return [self._record(job, entry_id, fields) for entry_id, fields in entries]

    @staticmethod
    def _record(job: JobRecord, entry_id: bytes, fields: dict) -> JobRecord:
        return decode_snapshot(job, int(entry_id.split(b"-")[1]), fields)

    def subscribe(self, job_id: str) -> Subscription:
        self._client()
        wakeup = _Wakeup(self, job_id)
        self._watchers.setdefault(job_id, set()).add(wakeup.event)
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(self._listen(), name="slidesynth-job-events")
        return wakeup

    def _unwatch(self, job_id: str, event: asyncio.Event) -> None:
        events = self._watchers.get(job_id)
        if events is not None:
            events.discard(event)
            if not events:
                del self._watchers[job_id]
        if not self._watchers and self._listener is not None:
            self._listener.cancel()  # nobody listens: no connection held, no messages read
            self._listener = None

    def _wake(self, job_ids=None) -> None:
        for job_id in list(self._watchers) if job_ids is None else job_ids:
            for event in self._watchers.get(job_id, ()):
                event.set()

    async def _listen(self) -> None:
        channel = event_channel(self.prefix)
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(channel)
                    self._wake()  # what was published before the subscription took is read now
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            job_id = message["data"].split(b" ", 1)[0].decode("ascii", "replace")
                            self._wake((job_id,))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis restarting: the streams re-read every few seconds meanwhile
                log.warning("job events listener: %s; reconnecting", exc)
                await asyncio.sleep(1.0)

    async def aclose(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            self._listener = None
        if self._redis is not None and self._loop is asyncio.get_running_loop():
            await self._redis.aclose()
        self._redis, self._loop, self._watchers = None, None, {}


def open_event_feed(store: JobStore) -> EventFeed:
    """The feed for the store: Redis streams and pub/sub for the Redis store, polling for the file store."""
    if isinstance(store, RedisJobStore):
        return RedisEventFeed(store.url, store.prefix)
    return PollingEventFeed(store)


class RenderedEvents:
    """``render`` memoised by (job id, event_seq), shared by every stream of an API process: a snapshot's data is
    made once however many clients follow the job (a record at a given ``event_seq`` never changes; ``render``
    must depend on nothing else that changes). Keeps the ``size`` most recent entries."""

    def __init__(self, render: Callable[[JobRecord], str], size: int = 4096):
        self.render, self.size = render, size
        self._data: OrderedDict[tuple[str, int], str] = OrderedDict()
        self.misses = 0

    def __call__(self, record: JobRecord) -> str:
        key = (record.id, record.event_seq)
        data = self._data.get(key)
        if data is None:
            self.misses += 1
            data = self._data[key] = self.render(record)
            if len(self._data) > self.size:
                self._data.popitem(last=False)
        return data


class JobEventStream:
    """What one client of ``GET /jobs/{id}/events`` gets. ``render`` makes an event's data (the JSON of
    ``GET /jobs/{id}``); a write that changes nothing it shows (e.g. a webhook delivery count the view lacks) is
    no event."""

    def __init__(self, feed: EventFeed, job: JobRecord, render: Callable[[JobRecord], str], ping_seconds: float):
        self.feed, self.job, self.render, self.ping_seconds = feed, job, render, ping_seconds
        self.pending: list[JobRecord] = []
        self.cursor = job.event_seq
        self.last_data: str | None = None

    async def open(self, last_event_id: int | None) -> bool:
        """Decide what comes first; False when nothing ever will: the client already has the job's terminal
        event (answer 204, which also stops a browser's EventSource from reconnecting)."""
        known = None if last_event_id is None else await self.feed.history(self.job, last_event_id)
        if known is None:  # no Last-Event-ID, or what followed it is no longer known: the current state
            self.pending, self.cursor = [self.job], self.job.event_seq
            return True
        had = [r for r in known if r.event_seq == last_event_id]
        if had:
            self.last_data = self.render(had[0])
        self.pending = [r for r in known if r.event_seq > last_event_id]
        self.cursor = max([last_event_id] + [r.event_seq for r in known])
        return bool(self.pending) or not (had and had[0].status.terminal)

    async def events(self) -> AsyncIterator[tuple[int, str] | None]:
        """``(id, data)`` per event, None for a keep-alive; ends after the terminal status, when the job is
        deleted, or when the server stops."""
        subscription = self.feed.subscribe(self.job.id)
        try:
            last_write = time.monotonic()
            while True:
                for record in self.pending:
                    data = self.render(record)
                    if data != self.last_data:
                        self.last_data, last_write = data, time.monotonic()
                        yield record.event_seq, data
                    if record.status.terminal:
                        return
                self.pending = []
                quiet = time.monotonic() - last_write
                if quiet >= self.ping_seconds:
                    last_write = time.monotonic()
                    yield None
                    quiet = 0.0
                woke = await subscription.wait(min(self.feed.recheck_seconds, self.ping_seconds - quiet))
                if _stopping:
                    return  # the server is stopping; the client reconnects with Last-Event-ID
                changes = await self.feed.changes(self.job, self.cursor, check_gone=not woke)
                if changes is None:
                    return
                if changes:
                    self.pending, self.cursor = changes, changes[-1].event_seq
        finally:
            subscription.close()


def sse_message(event: tuple[int, str] | None) -> str:
    """One server-sent event (``event: job``, ``id``, ``data``), or the keep-alive comment."""
    if event is None:
        return ": ping\n\n"
    seq, data = event
    return f"event: job\nid: {seq}\ndata: {data}\n\n"
