"""One streaming pyramid writer; each output format is a sink.

::

    sinks = [TiffSink("slide.tif", compression="jpeg"), ZarrSink("slide.zarr")]
    with PyramidWriter(width=W, height=H, mpp=0.5, sinks=sinks) as w:
        for band in bands:                  # or w.write_tile(ty, tx, tile), row-major
            w.write_band(band)
    w.thumbnail                             # the smallest level, uint8 (h, w, 3)

:class:`PyramidWriter` owns the life cycle every format shares: it checks each sink's target, computes
every level with a :class:`writers.pyramid.PyramidCascade` (bounded memory), pads each tile once into a
recycled buffer shared by all sinks, runs the sinks' encoders on one thread pool (at most ``max_pending``
tiles in flight), and hands each result back to its sink on the feeding thread in submission order.
Outputs are written under temporary names and appear under their final names only by :meth:`close`,
complete and flushed to disk (:func:`writers.atomic.commit`).  An error, :meth:`~PyramidWriter.abort` or
an exception inside the ``with`` block removes every temporary output (and any output of this writer
already renamed into place).

A new format is a new class implementing :class:`PyramidSink`; see :class:`writers.tiff.TiffSink` and
:class:`writers.zarr.ZarrSink`.
"""
from __future__ import annotations

import math
import os
import threading
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import cv2
import numpy as np

from writers.atomic import check_target, commit, partial_path, remove_path
from writers.pyramid import BandTiler, PyramidCascade, PyramidLayout, pad_tile, tile_size_for


class PyramidSink(Protocol):
    """An output format fed by a :class:`PyramidWriter`.

    ``path`` is where the output appears on success (``None``: the sink keeps nothing on disk).  The writer
    calls, in this order:

    * ``start(target, layout)`` once: create the output at ``target`` (a unique temporary sibling of
      ``path``; ``None`` when ``path`` is ``None``) for the levels of ``layout``;
    * ``encode_tile(level, ty, tx, tile)`` for every tile of every level, on an encode thread, possibly
      several at once; each level's tiles come in row-major order, the levels interleaved.  ``tile`` is a
      (layout.tile, layout.tile, 3) uint8 array (edge tiles padded by edge replication) that stays
      unchanged until the matching ``store_tile`` has returned;
    * ``store_tile(level, ty, tx, encoded)`` on the feeding thread, in the order of the ``encode_tile``
      calls, with that call's result;
    * ``finish(thumbnail)`` after the last ``store_tile``: complete the output at ``target``
      (``thumbnail``: the smallest level, (h, w, 3) uint8, unpadded).

    ``abort()`` may come at any time instead, even before ``start`` and more than once: release what the
    sink holds (the writer removes ``target``).
    """

    path: Path | None

    def start(self, target: Path | None, layout: PyramidLayout) -> None: ...

    def encode_tile(self, level: int, ty: int, tx: int, tile: np.ndarray) -> Any: ...

    def store_tile(self, level: int, ty: int, tx: int, encoded: Any) -> None: ...

    def finish(self, thumbnail: np.ndarray) -> None: ...

    def abort(self) -> None: ...


def default_workers() -> int:
    """Encode threads when not given: the CPU count, capped at 4 (2 on a 2-core machine)."""
    return max(1, min(4, os.cpu_count() or 2))


def rows_contiguous(a: np.ndarray) -> bool:
    """Whether each row of an (h, w, c) array is one run of memory, rows in order (what the JPEG encoder
    reads without a copy); views that reverse or transpose axes are not."""
    return a.strides[2] == a.itemsize and a.strides[1] == a.shape[2] * a.itemsize \
        and a.strides[0] >= a.shape[1] * a.strides[1]


class SerialOpenCV:
    """OpenCV's own thread pool is off (``cv2.setNumThreads(0)``) while at least one of these is held;
    the previous setting comes back when the last one is released (reference-counted, thread-safe) —
    unless other code changed the setting meanwhile, which is then left as it is.

    Why: a writer's 2×2 means run on the thread that feeds it while its encode threads keep every core
    busy.  OpenCV would split each 512² resize over its own threads, which then wait for a core: that cost
    10–15 % of the TIFF writer's throughput on 2 cores (``python -m bench.writer``); serial, the resize
    of a 512² tile takes ~70 µs.  Other OpenCV calls in the process (mask resizing) run serially meanwhile.

    The hold is released by :meth:`release` or, for an owner dropped without it (a writer never closed),
    when ``owner`` is garbage-collected.
    """

    _lock = threading.RLock()  # re-entrant: a finalizer may run on a thread that is inside the lock
    _holders = 0
    _saved: int | None = None

    def __init__(self, owner: object) -> None:
        with SerialOpenCV._lock:
            if SerialOpenCV._holders == 0:
                SerialOpenCV._saved = cv2.getNumThreads()
                cv2.setNumThreads(0)
            SerialOpenCV._holders += 1
            self._held = True
        weakref.finalize(owner, self.release)

    def release(self) -> None:
        """Give this hold back (idempotent)."""
        with SerialOpenCV._lock:
            if not self._held:
                return
            self._held = False
            SerialOpenCV._holders -= 1
            if SerialOpenCV._holders == 0 and cv2.getNumThreads() == 1:  # 1: still serial, as set above
                cv2.setNumThreads(SerialOpenCV._saved)


class TileBuffers:
    """Recycled (size, size, c) uint8 buffers for padded tiles in flight to the encode threads.

    Why: a fresh 0.8 MB array per tile is above glibc's mmap threshold, so every tile paid for an mmap,
    192 page faults and an munmap — a fifth of the TIFF writer's CPU time in a fresh process.  A buffer
    returns to the pool when its release function has been called once per user (one per sink it was sent
    to); the number of buffers is bounded by the tiles in flight.  Not thread-safe: take and release on the
    thread that feeds the writer.
    """

    def __init__(self, size: int, channels: int = 3):
        self.size, self.channels = size, channels
        self._free: list[np.ndarray] = []
        self.allocated = 0

    def padded(self, tile: np.ndarray, users: int = 1) -> tuple[np.ndarray, Callable[[], None]]:
        """Copy ``tile`` (edge-padded) into a free buffer; return it and its release function."""
        if self._free:
            buf = self._free.pop()
        else:
            buf = np.empty((self.size, self.size, self.channels), np.uint8)
            self.allocated += 1
        pad_tile(tile, self.size, out=buf)
        left = [users]

        def release() -> None:
            left[0] -= 1
            if left[0] == 0:
                self._free.append(buf)

        return buf, release


def cancel_futures(futures: Iterable[Future]) -> None:
    """Cancel pending futures and wait out the ones already running (errors ignored: the output is being
    thrown away)."""
    futures = list(futures)
    for fut in futures:
        fut.cancel()
    for fut in futures:
        if not fut.cancelled():
            try:
                fut.result()
            except BaseException:
                pass


class PyramidWriter:
    """Tiles or bands of a ``width`` × ``height`` RGB slide in; every level of its pyramid out to ``sinks``.

    Feed it either full-resolution tiles, ``write_tile(ty, tx, tile)`` in row-major order, or full-width
    row bands of any height, ``write_band(band)`` in row order — not both; then :meth:`close` (or use it as
    a context manager).  ``tile`` is the tile side (smaller for a slide of at most 128 px, see
    :func:`writers.pyramid.tile_size_for`: read it back as ``cascade.tile``); levels are halved while the
    longest side is ≥ ``min_size``.  ``workers`` encode threads (default :func:`default_workers`) and at
    most ``max_pending`` tiles in flight (default 8 per thread and sink) bound the memory.  With
    ``overwrite=False`` an existing output is an error, raised before anything is written.  After
    :meth:`close`, ``thumbnail`` is the smallest level, (h, w, 3) uint8.

    Bad input (shape, dtype, order, too many rows) raises ``ValueError`` naming the tile or row and aborts.
    """

    def __init__(self, width: int, height: int, mpp: float, sinks: Iterable[PyramidSink], *, tile: int = 512,
                 min_size: int = 1024, workers: int | None = None, max_pending: int | None = None,
                 overwrite: bool = True):
        self.sinks = list(sinks)
        if not self.sinks:
            raise ValueError("PyramidWriter needs at least one sink")
        if not isinstance(width, (int, np.integer)) or not isinstance(height, (int, np.integer)) \
                or width < 1 or height < 1:
            raise ValueError(f"width and height must be positive integers, got {width!r} x {height!r}")
        if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
            raise ValueError(f"mpp must be a positive number of µm per pixel, got {mpp!r}")
        for sink in self.sinks:
            if sink.path is not None:
                check_target(sink.path, overwrite)
        self.width, self.height, self.overwrite = int(width), int(height), overwrite
        tile = tile_size_for(width, height, tile)
        self.cascade = PyramidCascade(self.width, self.height, self._on_tile, tile=tile, min_size=min_size)
        self.layout = PyramidLayout(self.cascade.levels, self.cascade.tile, float(mpp))
        self.thumbnail: np.ndarray | None = None
        self._state = "open"
        self._targets = [None if sink.path is None else partial_path(sink.path) for sink in self.sinks]
        self._tiler: BandTiler | None = None  # made by the first write_band (it holds a whole tile row)
        self._lent = False  # the level-0 tile being pushed is lent by the caller (write_tile(copy=False))
        self.workers = max(1, int(workers)) if workers else default_workers()
        self.max_pending = max_pending or 8 * self.workers * len(self.sinks)
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="pyramid-encode")
        self._pending: deque[tuple[PyramidSink, int, int, int, Future, Callable[[], None] | None]] = deque()
        self._buffers = TileBuffers(self.cascade.tile)
        self._serial = SerialOpenCV(self)
        try:
            for sink, target in zip(self.sinks, self._targets):
                sink.start(target, self.layout)
        except BaseException:
            self.abort()
            raise

    @property
    def levels(self) -> list[tuple[int, int]]:
        """(width, height) of every level, level 0 first."""
        return self.layout.levels

    def write_tile(self, ty: int, tx: int, tile: np.ndarray, copy: bool = True) -> None:
        """Feed the next full-resolution tile, (th, tw, 3) uint8 with th = min(tile, H − ty·tile), tw likewise.

        ``copy=True`` (default): the tile is copied before this returns, so the caller may reuse its array.
        ``copy=False`` lends the array instead: a full-size tile is encoded straight from it, so it must stay
        unchanged until :meth:`close` returns — pass a fresh array per tile, or views of an image that does
        not change.  That saves one copy of the slide (a tenth of the TIFF writer's time on some CPUs).
        Edge tiles, which need padding, and views whose rows are not contiguous in memory (e.g. channels
        reversed, or a transposed image) are copied either way.
        """
        self._check_open(f"tile ({ty}, {tx})")
        try:
            if self._tiler is not None:
                raise ValueError(f"tile ({ty}, {tx}): this writer is fed bands; use write_band")
            self._lent = not copy
            self.cascade.push_tile(ty, tx, tile)
        except BaseException:
            self.abort()
            raise

    def write_band(self, band: np.ndarray) -> None:
        """Append a full-width uint8 band (rows, width, 3); bands come in row order, of any height."""
        rows = self._tiler.rows_done if self._tiler is not None else 0
        self._check_open(f"band at row {rows}")
        try:
            if self._tiler is None:
                if self.cascade.tiles_in:
                    raise ValueError("band at row 0: this writer is fed tiles; use write_tile")
                self._tiler = BandTiler(self.width, self.height, self.cascade.push_tile, tile=self.cascade.tile)
            self._lent = False  # the tiler's row buffer is reused
            self._tiler.write_band(band)
        except BaseException:
            self.abort()
            raise

    def _check_open(self, what: str) -> None:
        if self._state != "open":
            raise ValueError(f"{what}: the writer is already {self._state}")

    def _on_tile(self, level: int, ty: int, tx: int, tile: np.ndarray) -> None:
        t = self.cascade.tile
        if level == 0 and self._lent and tile.shape[0] == tile.shape[1] == t and rows_contiguous(tile):
            padded, release = tile, None  # lent by the caller: encoded straight from its array
        else:
            padded, release = self._buffers.padded(tile, users=len(self.sinks))  # one copy for every sink
        for sink in self.sinks:
            fut = self.pool.submit(sink.encode_tile, level, ty, tx, padded)
            self._pending.append((sink, level, ty, tx, fut, release))
        self._drain()

    def _drain(self, wait_all: bool = False) -> None:
        """Store finished encodes in submission order; block while more than ``max_pending`` are in flight."""
        p = self._pending
        while p and (wait_all or len(p) > self.max_pending or p[0][4].done()):
            sink, level, ty, tx, fut, release = p.popleft()
            sink.store_tile(level, ty, tx, fut.result())
            if release is not None:
                release()

    def close(self) -> None:
        """Finish every output and rename it into place; raises (and removes them all) if anything fails,
        e.g. tiles or rows are missing."""
        if self._state != "open":
            raise ValueError(f"the writer is already {self._state}")
        committed: list[Path] = []
        try:
            if self._tiler is not None and not self._tiler.complete:
                raise ValueError(f"slide incomplete: {self._tiler.rows_done} of {self.height} rows written")
            self.cascade.check_complete()
            self._drain(wait_all=True)
            for sink in self.sinks:
                sink.finish(self.cascade.smallest)
            self.pool.shutdown(wait=True)
            for sink, target in zip(self.sinks, self._targets):
                if target is not None:
                    commit(target, sink.path, self.overwrite)
                    committed.append(sink.path)
        except BaseException:
            self.abort()
            for path in committed:  # the slide failed: do not leave part of its outputs behind
                remove_path(path)
            raise
        self._state = "closed"
        self._serial.release()
        self.thumbnail = self.cascade.smallest

    def abort(self) -> None:
        """Stop encoding and remove every temporary output (idempotent; final paths are not touched)."""
        self._state = "aborted"
        try:
            cancel_futures(entry[4] for entry in self._pending)
            self._pending.clear()
            self.pool.shutdown(wait=True, cancel_futures=True)
            for sink in self.sinks:
                sink.abort()
        finally:  # whatever failed above, the hold is given back and no partial output stays
            self._serial.release()
            for target in self._targets:
                remove_path(target)

    def __enter__(self) -> "PyramidWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            if self._state == "open":
                self.abort()
            return False
        self.close()
        return False
